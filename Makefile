# One command each, on a fresh machine with Python 3.10+ (see README).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: install test bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: on these machines 2.13.0 is a local CPU wheel; an unpinned torch pulls CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps torchscale==0.3.0 fairscale==0.4.0  # the torchscale extra, without timm (docs/torchscale.md)
	touch $@

install: $(VENV)/.installed

test: install
	WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info

# One command each, on a fresh machine with Python 3.10+ (see README).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: install test bench clean demo

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: on these machines 2.13.0 is a local CPU wheel; an unpinned torch pulls CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest -q tests

# The main job in one command: a real pretrained Llama distilled into RetNet students, report in runs/demo/.
# Offline default: llama2.c stories260K on CPU. TEACHER=<Hub id or Llama folder> runs the real-size recipe.
DEMO_CONFIG ?= $(if $(TEACHER),examples/configs/demo_real.yaml,examples/configs/demo.yaml)
demo: install
	$(if $(TEACHER),,HF_HUB_OFFLINE=1) WANDB_MODE=offline TOKENIZERS_PARALLELISM=false \
		$(PY) -m training.demo --config $(DEMO_CONFIG) $(if $(TEACHER),--teacher $(TEACHER))

clean:
	rm -rf $(VENV) build *.egg-info

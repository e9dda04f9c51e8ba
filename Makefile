# One command each, on a fresh machine with Python 3.10+ (see README).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
OLDEST  = .venv-oldest
TEST_ENV = WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install install-oldest test test-oldest bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: on these machines 2.13.0 is a local CPU wheel; an unpinned torch pulls CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,eval]"
	touch $@

install: $(VENV)/.installed

# The declared lower bounds (ci/oldest.txt). torch 2.9.0 comes from PyPI as a CUDA build (about 3 GB; it runs on
# the CPU): there is no CPU wheel of it on the package index.
$(OLDEST)/.installed: setup.cfg pyproject.toml ci/oldest.txt
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q -c ci/oldest.txt torch
	$(OLDEST)/bin/python -m pip install -q -c ci/oldest.txt -e ".[dev]"
	touch $@

install-oldest: $(OLDEST)/.installed

# the newest releases the resolver picks
test: install
	$(TEST_ENV) $(PY) -m pytest -q tests

# the oldest releases setup.cfg admits
test-oldest: install-oldest
	$(OLDEST)/bin/python -m pip check
	$(TEST_ENV) $(OLDEST)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) $(OLDEST) build *.egg-info

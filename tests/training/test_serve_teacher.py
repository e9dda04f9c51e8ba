"""The teacher server as a real subprocess on 127.0.0.1: answers equal DirectTeacher, bounds, auth, load."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import psutil
import pytest
import torch

from tests.servers import ServerProcess
from training.teachers.server.app import main
from training.teachers.direct import DirectTeacher
from training.teachers.network import NetworkTeacher
from training.teachers.server.wire import BINARY_MEDIA_TYPE, decode_binary, decode_json, input_checksum

KEY = "test-key-123"
MAX_TOKENS, MAX_K = 2048, 64
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_teacher_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--model", tiny_teacher_dir, "--api-key", KEY, "--max-tokens-per-request", str(MAX_TOKENS),
            "--max-k", str(MAX_K)]
    # one thread: a tiny teacher gains nothing from more; they would only contend with the test process
    with ServerProcess(args, log_path=str(log), env={"OMP_NUM_THREADS": "1"}) as proc:
        yield proc


@pytest.fixture(scope="module")
def direct(tiny_teacher_dir):
    return DirectTeacher(tiny_teacher_dir)


def post_topk(server, body, binary: bool, headers=AUTH) -> httpx.Response:
    accept = BINARY_MEDIA_TYPE if binary else "application/json"
    return httpx.post(f"{server.url}/v1/topk", json=body, headers={**headers, "Accept": accept}, timeout=60)


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--adapter", "--host", "--port", "--api-key", "--engine", "--max-tokens-per-request",
                 "--max-k"):
        assert flag in out


@pytest.mark.parametrize("argv,message", [
    (["--model", "/no/such/teacher"], "does not exist"),
    (["--model", "x", "--engine", "vllm"], "pip install"),
    (["--model", "x", "--max-k", "0"], "--max-k must be positive"),
])
def test_bad_command_lines_exit_with_a_clear_message(argv, message, capsys):
    if "vllm" in argv:
        try:
            import vllm  # noqa: F401
            pytest.skip("vLLM is installed here")
        except ImportError:
            pass
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert message in str(exit_info.value.code) + capsys.readouterr().err


def test_health_and_models(server, direct):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["engine"] == "hf"
    entry = httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"][0]
    assert entry["vocab_size"] == direct.vocab_size
    assert (entry["max_k"], entry["max_tokens_per_request"]) == (MAX_K, MAX_TOKENS)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("batch,seq_len,k,temperature", [(1, 1, 1, 1.0), (3, 17, 8, 1.0), (2, 40, 64, 2.0)])
def test_topk_equals_direct(server, direct, binary, batch, seq_len, k, temperature):
    torch.manual_seed(batch * 100 + seq_len)
    input_ids = torch.randint(0, direct.vocab_size, (batch, seq_len))
    response = post_topk(server, {"input_ids": input_ids.tolist(), "k": k, "temperature": temperature}, binary)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(BINARY_MEDIA_TYPE if binary else "application/json")
    answer = decode_binary(response.content) if binary else decode_json(response.content)
    want = direct.topk(input_ids, None, k=k, temperature=temperature)
    assert answer.lengths.tolist() == [seq_len] * batch
    assert answer.input_crc32 == input_checksum(input_ids.tolist())
    np.testing.assert_array_equal(answer.token_ids.reshape(batch, seq_len, k), want.token_ids.numpy())
    np.testing.assert_allclose(answer.logprobs.reshape(batch, seq_len, k), want.logprobs.numpy(), rtol=0, atol=1e-5)
    assert "forward;dur=" in response.headers["server-timing"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_ragged_rows_equal_direct_on_the_right_padded_batch(server, direct, binary):
    torch.manual_seed(7)
    lengths = [12, 5, 1, 9]
    rows = [torch.randint(0, direct.vocab_size, (n,)).tolist() for n in lengths]
    response = post_topk(server, {"input_ids": rows, "k": 16}, binary)
    assert response.status_code == 200, response.text
    answer = decode_binary(response.content) if binary else decode_json(response.content)
    padded = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for b, row in enumerate(rows):
        padded[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    want = direct.topk(padded, mask, k=16)
    keep = mask.bool()
    assert answer.lengths.tolist() == lengths
    np.testing.assert_array_equal(answer.token_ids, want.token_ids[keep].numpy())
    np.testing.assert_allclose(answer.logprobs, want.logprobs[keep].numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}],
                         ids=["missing", "wrong", "no-bearer"])
def test_wrong_api_key_is_401(server, headers):
    response = post_topk(server, {"input_ids": [[1, 2, 3]], "k": 2}, binary=True, headers=headers)
    assert response.status_code == 401
    assert "API key" in response.json()["detail"]
    assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 401


@pytest.mark.parametrize("body,what", [
    ({"input_ids": [[1] * (MAX_TOKENS // 2 + 1)] * 2, "k": 4}, "max-tokens-per-request"),
    ({"input_ids": [[1, 2, 3]], "k": MAX_K + 1}, "max-k"),
])
def test_oversized_request_is_413(server, body, what):
    response = post_topk(server, body, binary=True)
    assert response.status_code == 413
    assert what in response.json()["detail"]


def test_oversized_body_is_413_before_parsing(server):
    body = b'{"input_ids": [[' + b"1," * (40 * MAX_TOKENS) + b'1]], "k": 2}'
    response = httpx.post(f"{server.url}/v1/topk", content=body, headers=AUTH)
    assert response.status_code == 413


@pytest.mark.parametrize("content", [
    b"{not json",
    b'{"input_ids": [[1, 2]]}',  # no k
    b'{"input_ids": [["a", "b"]], "k": 2}',
    b'{"input_ids": [[1, 2]], "k": 0}',
    b'{"input_ids": [[1, 2]], "k": 2, "temperature": 0}',
    b'{"input_ids": [[1, 2]], "k": 2, "surprise": 1}',
    b'{"input_ids": [], "k": 2}',
    b'{"input_ids": [[1, 2], []], "k": 2}',
    b'{"input_ids": [[1, 99999]], "k": 2}',
], ids=["bad-json", "no-k", "str-ids", "k0", "temp0", "extra-key", "no-rows", "empty-row", "id-out-of-vocab"])
def test_malformed_request_is_422(server, content):
    response = httpx.post(f"{server.url}/v1/topk", content=content,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


def test_concurrent_requests_share_a_forward(server, direct):
    """A burst of concurrent requests is grouped by the dynamic batcher and each still gets its own answer."""
    torch.manual_seed(3)
    inputs = [torch.randint(0, direct.vocab_size, (1, 24)) for _ in range(8)]
    results = [None] * 8

    def ask(i):
        results[i] = post_topk(server, {"input_ids": inputs[i].tolist(), "k": 8}, binary=True)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results)
    assert max(int(r.headers["x-batch-requests"]) for r in results) > 1
    for x, response in zip(inputs, results):
        values = decode_binary(response.content).logprobs.reshape(1, 24, 8)
        np.testing.assert_allclose(values, direct.topk(x, None, k=8).logprobs.numpy(), rtol=0, atol=1e-5)


def test_load_8_clients_x_50_requests_zero_errors_flat_memory(server, direct):
    torch.manual_seed(11)
    batches = [torch.randint(0, direct.vocab_size, (2, 16)) for _ in range(5)]
    # Sorted values are compared (not ids) because batching with other clients may pad differently,
    # which moves logits by float noise and can swap near-tied ids.
    expected = [direct.topk(x, None, k=8).logprobs for x in batches]
    errors: list[BaseException] = []

    def client(n_requests: int):
        with NetworkTeacher(server.url, api_key=KEY, retries=0) as teacher:
            for i in range(n_requests):
                try:
                    out = teacher.topk(batches[i % 5], None, k=8)
                    torch.testing.assert_close(out.logprobs, expected[i % 5], rtol=0, atol=1e-4)
                except BaseException as err:  # noqa: BLE001 - every failure counts as an error
                    errors.append(err)

    def run(n_requests: int):
        threads = [threading.Thread(target=client, args=(n_requests,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    run(5)  # warm-up: allocator pools, thread pools, connection buffers
    rss_before = psutil.Process(server.pid).memory_info().rss
    run(50)
    rss_after = psutil.Process(server.pid).memory_info().rss
    assert errors == []
    growth_mib = (rss_after - rss_before) / 2**20
    print(f"server RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB over 400 requests")
    assert growth_mib < 32, f"server RSS grew by {growth_mib:.1f} MiB over 400 requests"

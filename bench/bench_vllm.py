"""Teacher tokens/s and bytes on the wire for the same batch through three real servers, one at a time:

  (a) our `/v1/topk` (binary) with the hf engine     `python -m training.serve_teacher --engine hf`
  (b) a stock vLLM OpenAI server, prompt_logprobs      `vllm.entrypoints.openai.api_server` (JSON)
  (c) our `/v1/topk` (binary) with the vllm engine    `python -m training.serve_teacher --engine vllm`

plus the in-process DirectTeacher as the no-network reference. Every path is timed end to end through
`NetworkTeacher.topk` (request, server, transfer, decode, re-padding), median of --reps after one warm-up.
(b) and (c) run from the vLLM venv (`make test-vllm` builds `.venv-vllm`; or pass --vllm-python).

    python bench/bench_vllm.py            # CPU: a few minutes, most of it vLLM start-up

One compute thread each, float32: vLLM's CPU build binds its engine to one core on a 2-core machine (it
reserves the other), so the hf server runs with OMP_NUM_THREADS=1 and DirectTeacher with one torch
thread, for a like-for-like comparison. The teacher is a small
random Llama (head_dim 64) with the tiny tokenizer's vocabulary, so the forward is cheap and the per-token
costs beyond it (scheduling, log-prob extraction, serialization) weigh more than with a 1B+ teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import httpx
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.servers import VLLM_PYTHON_ENV, ServerProcess, VLLMServerProcess  # noqa: E402
from training.teachers.direct import DirectTeacher  # noqa: E402
from training.teachers.network import NetworkTeacher  # noqa: E402
from tests.tiny_models import save_tiny_teacher  # noqa: E402

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=20, help="top-k (stock vLLM refuses > 20 without --max-logprobs; "
                        "the bench starts it with --max-logprobs k)")
    parser.add_argument("--hidden-size", type=int, default=512, help="teacher width (4 heads: head_dim = width / 4)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--vllm-python", default=os.environ.get(VLLM_PYTHON_ENV, os.path.join(ROOT, ".venv-vllm/bin/python")),
                        help=f"interpreter of the vLLM venv (default ${VLLM_PYTHON_ENV}, else .venv-vllm/bin/python)")
    parser.add_argument("--log-dir", default=None, help="server logs (default: a temporary folder)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="vLLM without graph compilation (faster start-up; default: compiled, as deployed)")
    args = parser.parse_args(argv)
    if (args.hidden_size // 4) % 32:
        parser.error("--hidden-size / 4 must be a multiple of 32: vLLM's CPU attention has no smaller head sizes")
    return args


def timed(fn, reps: int) -> float:
    fn()  # warm-up (first-batch allocations, vLLM graph/cache set-up)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def request_bytes(payload: dict) -> int:
    return len(json.dumps(payload, separators=(",", ":")).encode())


def measure_topk(url: str, input_ids: torch.Tensor, k: int, reps: int) -> dict:
    rows = input_ids.tolist()
    with NetworkTeacher(url) as teacher:
        seconds = timed(lambda: teacher.topk(input_ids, None, k=k), reps)
        answer = teacher.last_timing["bytes"]
        forward = teacher.last_timing.get("server_forward", float("nan"))
    return {"seconds": seconds, "response_bytes": answer, "server_forward": forward,
            "request_bytes": request_bytes({"input_ids": rows, "k": k, "temperature": 1.0})}


def measure_openai(url: str, input_ids: torch.Tensor, k: int, vocab_size: int, reps: int) -> dict:
    with NetworkTeacher(url, protocol="openai", vocab_size=vocab_size) as teacher:
        seconds = timed(lambda: teacher.topk(input_ids, None, k=k), reps)
        model = teacher._first_model()["id"]
    # The same request once more, raw, to count the bytes NetworkTeacher received (vLLM does not compress).
    payload = {"model": model, "prompt": input_ids.tolist(), "max_tokens": 1, "temperature": 1.0,
               "prompt_logprobs": k, "logprobs": k, "return_tokens_as_token_ids": True, "echo": False}
    body = httpx.post(f"{url}/v1/completions", json=payload, timeout=600).content
    return {"seconds": seconds, "response_bytes": len(body), "server_forward": float("nan"),
            "request_bytes": request_bytes(payload)}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if not os.access(args.vllm_python, os.X_OK):
        raise SystemExit(f"no vLLM interpreter at {args.vllm_python}: run `make test-vllm` once (it builds .venv-vllm) "
                         "or pass --vllm-python")
    work = tempfile.mkdtemp(prefix="bench-vllm-")
    logs = args.log_dir or work
    teacher_dir = save_tiny_teacher(os.path.join(work, "teacher"), hidden_size=args.hidden_size, num_layers=args.layers)
    direct = DirectTeacher(teacher_dir, dtype="float32", device="cpu")
    vocab = direct.vocab_size
    torch.manual_seed(0)
    input_ids = torch.randint(0, vocab, (args.batch, args.seq_len))
    tokens = input_ids.numel()
    print(f"teacher: Llama hidden {args.hidden_size}, {args.layers} layers, vocab {vocab}; batch {args.batch} x "
          f"{args.seq_len} = {tokens} tokens, k = {args.k}, torch threads {torch.get_num_threads()}", flush=True)

    results = {"direct (in process, reference)": {
        "seconds": timed(lambda: direct.topk(input_ids, None, k=args.k), args.reps),
        "response_bytes": 0, "request_bytes": 0, "server_forward": float("nan")}}
    del direct

    servers = [
        ("(a) /v1/topk binary, --engine hf",
         lambda: ServerProcess(["--model", teacher_dir, "--dtype", "float32", "--device", "cpu", "--max-k", str(args.k)],
                               env={"OMP_NUM_THREADS": "1"}, log_path=os.path.join(logs, "hf.log")),
         lambda url: measure_topk(url, input_ids, args.k, args.reps)),
        ("(b) stock vLLM prompt_logprobs (JSON)",
         lambda: VLLMServerProcess(teacher_dir, args.vllm_python, max_model_len=max(256, args.seq_len + 8),
                                   max_logprobs=max(20, args.k), enforce_eager=args.enforce_eager,
                                   startup_timeout=900, log_path=os.path.join(logs, "vllm.log")),
         lambda url: measure_openai(url, input_ids, args.k, vocab, args.reps)),
        ("(c) /v1/topk binary, --engine vllm",
         lambda: ServerProcess(["--model", teacher_dir, "--engine", "vllm", "--dtype", "float32", "--max-k",
                                str(args.k), "--max-model-len", str(max(256, args.seq_len + 8))]
                               + (["--enforce-eager"] if args.enforce_eager else []),
                               python=args.vllm_python, env=VLLM_ENV, startup_timeout=900,
                               log_path=os.path.join(logs, "engine_vllm.log")),
         lambda url: measure_topk(url, input_ids, args.k, args.reps)),
    ]
    for name, make_server, measure in servers:  # one server (~3 GiB for vLLM) at a time
        started = time.perf_counter()
        with make_server() as server:
            startup = time.perf_counter() - started
            try:
                results[name] = {**measure(server.url), "startup": startup}
            except Exception as err:  # report and go on: the other paths are still worth measuring
                print(f"{name}: FAILED: {err!r} (log: {server.log_path})", flush=True)
                continue
        print(f"{name}: done (server start-up {startup:.0f}s)", flush=True)

    base = results.get("(a) /v1/topk binary, --engine hf", {}).get("seconds")
    print(f"\n{'path':40s} {'tokens/s':>10s} {'vs (a)':>7s} {'answer B/token':>15s} {'request B/token':>16s} "
          f"{'server fwd ms':>14s}")
    for name, r in results.items():
        ratio = f"{base / r['seconds']:.2f}x" if base else "-"
        fwd = r["server_forward"] * 1000
        print(f"{name:40s} {tokens / r['seconds']:10.0f} {ratio:>7s} {r['response_bytes'] / tokens:15.1f} "
              f"{r['request_bytes'] / tokens:16.1f} {fwd if fwd == fwd else float('nan'):14.1f}")


if __name__ == "__main__":
    main()

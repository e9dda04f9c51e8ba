"""Network teacher costs, measured side by side in one run.

1. Wire: one `/v1/topk` request at B x T = 8 x 1024, k = 512 against a real server subprocess. Splits
   the time into server forward, server parse/queue/encode, transfer (+ HTTP), client encode and decode,
   binary against JSON (goal: everything beyond the forward <= 10% of the forward for binary), and sizes
   the OpenAI-style `prompt_logprobs` JSON a stock vLLM server would send for the same top-k.
2. Trainer: DistillationTrainer step time in network mode against direct mode with the same teacher,
   with and without prefetch. The server runs with OMP_NUM_THREADS=1 and the trainer with 1 torch thread,
   so the two do not fight for this CPU's cores (on real hardware the teacher has its own machine).

    python bench/bench_network.py --quick     # CPU, < 2 minutes
    python bench/bench_network.py --device cuda --hidden-size 1024 --layers 8   # server on a GPU

The tiny teacher's forward is far cheaper than a real teacher's, so the "beyond forward" fraction here
is a pessimistic bound for a 1B-70B teacher, whose forward grows while the bytes on the wire do not.
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
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from tests.servers import ServerProcess  # noqa: E402
from training.teachers import TeacherSource  # noqa: E402
from training.teachers.network import NetworkTeacher, parse_vllm_completion  # noqa: E402
from training.teachers.server.wire import BINARY_MEDIA_TYPE, decode_binary  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and trainer steps (CPU, < 2 min)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None, help="requests per encoding (default 3 quick, 10 full)")
    parser.add_argument("--device", default="cpu", help="the server's device")
    parser.add_argument("--skip-trainer", action="store_true", help="only the wire measurements")
    parser.add_argument("--trainer-steps", type=int, default=None, help="default 8 quick, 30 full")
    return parser.parse_args(argv)


def measure_wire(url: str, rows: list[list[int]], k: int, binary: bool, reps: int, warmup: bool = True) -> dict:
    """NetworkTeacher.topk end to end, split with the server's Server-Timing header and the client's own clock."""
    input_ids = torch.tensor(rows)  # [B, T]
    samples = []
    with NetworkTeacher(url, binary=binary, retries=0) as teacher:
        for rep in range(reps + 1) if warmup else range(1, reps + 1):  # a first request warms up both sides
            start = time.perf_counter()
            teacher.topk(input_ids, None, k=k)
            wall = time.perf_counter() - start
            t = teacher.last_timing
            if rep:
                samples.append({
                    "forward": t["server_forward"], "server_parse": t["server_parse"], "queue": t["server_queue"],
                    "server_encode": t["server_encode"],
                    "transfer": t["request"] - t["server_total"],  # request JSON, HTTP both ways, body read
                    "client_decode": t["decode"],
                    "client_checks_repad": wall - t["request"] - t["decode"],
                    "wall": wall, "bytes": t["bytes"],
                })
    med = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    med["beyond"] = med["wall"] - med["forward"]
    return med


def openai_style_body(rows: list[list[int]], answer, k: int) -> dict:
    """The `/v1/completions` body a stock vLLM server sends for the same top-k: per prompt position a
    {str(id): {logprob, rank, decoded_token}} map (entry 0 None), plus the generated token's top-k.
    decoded_token strings are stand-ins of 4-6 characters (a Llama-3 token decodes to ~4 on average)."""
    choices = []
    for index, (row, span) in enumerate(zip(rows, answer.row_slices())):
        ids, lps = answer.token_ids[span], answer.logprobs[span].astype(np.float64)
        prompt_logprobs = [None]
        for t in range(len(row) - 1):
            prompt_logprobs.append({
                str(i): {"logprob": lp, "rank": r + 1, "decoded_token": f"t{i}"}
                for r, (i, lp) in enumerate(zip(ids[t].tolist(), lps[t].tolist()))
            })
        top = {f"token_id:{i}": lp for i, lp in zip(ids[-1].tolist(), lps[-1].tolist())}
        choices.append({
            "index": index, "text": "x", "finish_reason": "length",
            "logprobs": {"text_offset": [0], "token_logprobs": [lps[-1][0]], "tokens": [f"token_id:{ids[-1][0]}"],
                         "top_logprobs": [top]},
            "prompt_logprobs": prompt_logprobs,
        })
    return {"id": "cmpl-bench", "object": "text_completion", "model": "teacher", "choices": choices}


def measure_openai_shape(rows, url, k, json_result, sample_rows: int) -> dict:
    """Times json.dumps and the client's parse on `sample_rows` rows and scales to the whole batch (linear)."""
    scale = len(rows) / sample_rows
    rows = rows[:sample_rows]
    with httpx.Client(base_url=url, timeout=600) as client:
        response = client.post("/v1/topk", json={"input_ids": rows, "k": k}, headers={"Accept": BINARY_MEDIA_TYPE})
    answer = decode_binary(response.content)
    body = openai_style_body(rows, answer, k)
    t0 = time.perf_counter()
    content = json.dumps(body).encode()
    t1 = time.perf_counter()
    parsed = parse_vllm_completion(json.loads(content), rows, k)
    t2 = time.perf_counter()
    assert np.array_equal(parsed.logprobs, answer.logprobs)  # ids may differ only among exact ties
    throughput = json_result["bytes"] / max(json_result["transfer"], 1e-9)  # JSON bytes/s measured above
    return {"bytes": scale * len(content), "server_encode": scale * (t1 - t0), "client_decode": scale * (t2 - t1),
            "transfer_est": scale * len(content) / throughput, "sample_rows": sample_rows}


def wire_section(args, teacher_dir: str) -> None:
    reps = args.reps or (2 if args.quick else 10)
    server = ServerProcess(["--model", teacher_dir, "--device", args.device, "--max-k", str(args.k),
                            "--max-tokens-per-request", str(args.batch * args.seq_len),
                            "--max-batch-tokens", str(args.batch * args.seq_len), "--batch-window-ms", "0"],
                           log_path=os.path.join(tempfile.gettempdir(), "bench_network_server.log"))
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, args.vocab_size, (args.batch, args.seq_len), generator=g).tolist()
    with server:
        binary = measure_wire(server.url, rows, args.k, True, reps)
        as_json = measure_wire(server.url, rows, args.k, False, 1 if args.quick else reps, warmup=False)
        openai = measure_openai_shape(rows, server.url, args.k, as_json, 1 if args.quick else args.batch)

    print(f"\n== /v1/topk per request: B x T = {args.batch} x {args.seq_len}, k = {args.k}, vocab {args.vocab_size}, "
          f"teacher hidden {args.hidden_size} x {args.layers} layers on {args.device}; median of {reps} "
          f"(JSON: {1 if args.quick else reps}) ==")
    keys = ["forward", "server_parse", "queue", "server_encode", "transfer", "client_decode", "client_checks_repad",
            "wall", "beyond"]
    print(f"{'ms':>16} | {'binary':>10} | {'json':>10}")
    for key in keys:
        print(f"{key:>16} | {1000 * binary[key]:10.1f} | {1000 * as_json[key]:10.1f}")
    print(f"{'MiB on the wire':>16} | {binary['bytes'] / 2**20:10.1f} | {as_json['bytes'] / 2**20:10.1f}")
    fb, fj = binary["beyond"] / binary["forward"], as_json["beyond"] / as_json["forward"]
    print(f"beyond-forward / forward: binary {100 * fb:.1f}% (goal <= 10%), JSON {100 * fj:.1f}% "
          f"= {as_json['beyond'] / binary['beyond']:.1f}x binary's overhead; JSON bytes {as_json['bytes'] / binary['bytes']:.1f}x")
    openai_beyond = openai["server_encode"] + openai["transfer_est"] + openai["client_decode"]
    print(f"OpenAI/vLLM prompt_logprobs JSON for the same top-k: {openai['bytes'] / 2**20:.1f} MiB "
          f"({openai['bytes'] / binary['bytes']:.1f}x binary, {openai['bytes'] / as_json['bytes']:.1f}x our JSON); "
          f"json.dumps {1000 * openai['server_encode']:.0f} ms, transfer ~{1000 * openai['transfer_est']:.0f} ms "
          f"(at the JSON rate above), client parse {1000 * openai['client_decode']:.0f} ms: beyond-forward "
          f"~{100 * openai_beyond / binary['forward']:.0f}% of the forward"
          + (f" (timed on {openai['sample_rows']} row(s), scaled)" if openai["sample_rows"] < args.batch else ""))


class _NoPrefetch(TeacherSource):
    """The same network teacher, minus `prefetch` (the trainer then asks only when it needs the answer)."""

    def __init__(self, inner):
        self.inner, self.vocab_size = inner, inner.vocab_size

    def topk(self, *args, **kwargs):
        return self.inner.topk(*args, **kwargs)


def trainer_section(args, workdir: str) -> None:
    from transformers import PrinterCallback, TrainerCallback

    from hf_retnet import RetNetConfig, RetNetForCausalLM
    from training.trainers.distillation_config import DistillationConfig
    from training.data.shards import PaddingCollator
    from training.teachers.direct import DirectTeacher
    from tests.tiny_models import default_texts, save_tiny_teacher
    from training.trainers.distillation_trainer import DistillationTrainer

    steps = args.trainer_steps or (8 if args.quick else 30)
    seq_len, batch, k = 256, 8, 64
    teacher_dir = save_tiny_teacher(os.path.join(workdir, "trainer-teacher"), hidden_size=256, num_layers=4)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    texts = default_texts(400)
    items = []
    for i in range(0, 400, 8):
        ids = tok(" ".join(texts[i:i + 8]))["input_ids"][:seq_len]
        items.append({"input_ids": ids, "labels": ids})

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.stamps = []

        def on_step_end(self, *a, **kw):
            self.stamps.append(time.perf_counter())

    def run(name, teacher):
        torch.manual_seed(0)
        student = RetNetForCausalLM(RetNetConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2,
                                                 num_heads=4, intermediate_size=256, chunk_size=64))
        config = DistillationConfig(
            output_dir=os.path.join(workdir, name), teacher_model=teacher_dir, student="350M", teacher_topk=k,
            per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3, save_strategy="no",
            report_to="none", use_cpu=True, logging_steps=1, dataloader_num_workers=0, disable_tqdm=True,
        )
        times = StepTimes()
        trainer = DistillationTrainer(model=student, args=config, teacher=teacher, train_dataset=items,
                                      data_collator=PaddingCollator(tok.pad_token_id), callbacks=[times])
        trainer.remove_callback(PrinterCallback)  # keep the bench's own table readable
        trainer.train()
        waits = [h["teacher_wait_seconds"] for h in trainer.state.log_history if "teacher_wait_seconds" in h]
        # skip the warm-up step; the wait is how long compute_loss blocked on the teacher
        return statistics.median(np.diff(times.stamps[1:])), statistics.median(waits[2:])

    torch.set_num_threads(1)
    results = {"direct": run("direct", DirectTeacher(teacher_dir))}
    server = ServerProcess(["--model", teacher_dir, "--max-k", str(k)], env={"OMP_NUM_THREADS": "1"},
                           log_path=os.path.join(workdir, "trainer-server.log"))
    with server, NetworkTeacher(server.url) as teacher:
        results["network, no prefetch"] = run("network-noprefetch", _NoPrefetch(teacher))
        results["network, prefetch"] = run("network-prefetch", teacher)
    print(f"\n== DistillationTrainer step time, B x T = {batch} x {seq_len}, k = {k}, teacher hidden 256 x 4 layers, "
          f"student RetNet 128 x 2; median over {steps - 2} steps; 1 thread each side ==")
    direct_step = results["direct"][0]
    for name, (seconds, wait) in results.items():
        print(f"{name:>22}: {1000 * seconds:8.1f} ms/step = {seconds / direct_step:.2f}x direct; "
              f"trainer blocked on the teacher {1000 * wait:7.1f} ms/step")
    print("(prefetch hides the teacher's time only when the teacher has compute of its own; here both share "
          "this machine's cores, so the blocked time drops but the step time need not)")


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        from tests.tiny_models import build_tiny_llama

        teacher_dir = os.path.join(workdir, "wire-teacher")
        build_tiny_llama(args.vocab_size, hidden_size=args.hidden_size, num_layers=args.layers).save_pretrained(
            teacher_dir, safe_serialization=True)
        wire_section(args, teacher_dir)
        if not args.skip_trainer:
            trainer_section(args, workdir)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

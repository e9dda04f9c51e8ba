"""Peak memory of the chunked distillation loss against CE alone, side by side in one run.

Each variant (loss forward + backward into the lm_head and hidden states) runs in a fresh subprocess; peak
memory is the process's resident high-water mark (Linux VmHWM, reset through /proc/self/clear_refs after the
inputs exist) minus its resident size at that moment, so it counts what the loss itself allocates (logits,
temporaries, the lm_head gradient) and not the inputs (hidden states, lm_head, teacher tensors). On a CUDA
machine the same numbers come from torch.cuda.max_memory_allocated instead.

Variants:
  ce_naive       F.cross_entropy on the full [N, V] logits (what an unchunked model forward does), reference
  ce_checkpoint  CE over chunks of rows, each chunk under torch.utils.checkpoint: the usual chunked CE
  ce_fused       training.trainers.losses.distillation_loss with alpha = 1 and no teacher: CE in the same kernel as KD
  sparse_<kind>  distillation_loss, alpha 0.5, teacher top-k ids + log-probs (tail bucket)
  full_<kind>    distillation_loss, alpha 0.5, teacher full logits [N, V] (direct mode)

Goals (issue 4): sparse top-k (k = 512) <= 1.10x and full-vocabulary KL <= 1.5x of CE alone.

    python bench/bench_kd_memory.py            # V = 128256, N = 2048 rows, H = 1280 (the 500M student)
    python bench/bench_kd_memory.py --quick    # same V, N = 512 rows, H = 256: about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("forward_kl", "reverse_kl", "jsd")
VARIANTS = ("ce_naive", "ce_checkpoint", "ce_fused", *(f"sparse_{k}" for k in KINDS), *(f"full_{k}" for k in KINDS))
MiB = 1024 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak bytes allocated inside the `with` block above what was allocated at its start."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current VmRSS (Linux >= 4.0)
                f.write("5")
            self.start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.start
        return False


def run_variant(name: str, args) -> dict:
    """Build inputs, then measure one loss forward + backward. Runs in its own process."""
    import gc

    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    sys.path.insert(0, ROOT)
    from training.trainers.losses import distillation_loss

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    N, H, V, k = args.rows, args.hidden, args.vocab, args.topk
    hidden = (torch.randn(N, H, device=device, dtype=dtype) * 0.5).requires_grad_()
    lm_head = torch.nn.Linear(H, V, bias=False, device=device, dtype=dtype)
    labels = torch.randint(0, V, (N,), device=device)
    ids = logprobs = full = None
    if name.startswith("sparse_"):
        ids = torch.stack([torch.randperm(V, device=device)[:k] for _ in range(N)])  # [N, k] distinct ids
        logprobs = torch.log_softmax(torch.randn(N, k + 1, device=device) * 2, dim=-1)[:, :k].contiguous()
    elif name.startswith("full_"):
        full = torch.randn(N, V, device=device, dtype=dtype) * 2  # teacher logits in the teacher's dtype
    gc.collect()
    kw = dict(temperature=2.0, chunk_size=args.chunk_size)

    start = time.perf_counter()
    with PeakMemory(device) as mem:
        if name == "ce_naive":
            loss = F.cross_entropy(lm_head(hidden).float(), labels)
        elif name == "ce_checkpoint":

            def chunk_ce(h, y):
                return F.cross_entropy(lm_head(h).float(), y, reduction="sum")

            loss = sum(
                checkpoint(chunk_ce, hidden[i : i + args.chunk_size], labels[i : i + args.chunk_size],
                           use_reentrant=False)
                for i in range(0, N, args.chunk_size)
            ) / N
        elif name == "ce_fused":
            loss = distillation_loss(hidden, lm_head, labels, None, None, alpha=1.0, kind="forward_kl", **kw).loss
        else:
            kind = name.split("_", 1)[1]
            loss = distillation_loss(hidden, lm_head, labels, ids, logprobs, full, alpha=0.5, kind=kind, **kw).loss
        loss.backward()
        del loss
    seconds = time.perf_counter() - start
    inputs = sum(t.numel() * t.element_size() for t in (hidden, lm_head.weight, ids, logprobs, full) if t is not None)
    return dict(variant=name, peak_bytes=mem.peak, seconds=seconds, input_bytes=inputs, device=device.type)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the production vocabulary with fewer rows: V=128256, N=512, H=256, chunk 512, k=512")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--rows", type=int, default=2048, help="N trained positions (T = 2048 tokens)")
    parser.add_argument("--hidden", type=int, default=1280, help="H (1280 = the 500M student)")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.rows, args.hidden, args.chunk_size, args.topk = 128256, 512, 256, 512, 512
    if args.child:
        print("RESULT " + json.dumps(run_variant(args.child, args)), flush=True)
        return

    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    print(f"V={args.vocab} N={args.rows} H={args.hidden} chunk={args.chunk_size} k={args.topk} dtype={args.dtype}; "
          f"one [chunk, V] fp32 buffer = {args.chunk_size * args.vocab * 4 / MiB:.0f} MiB, "
          f"lm_head weight = {args.vocab * args.hidden * (2 if args.dtype == 'bfloat16' else 4) / MiB:.0f} MiB")
    from tqdm import tqdm

    results = {}
    base = [sys.executable, os.path.abspath(__file__), "--vocab", str(args.vocab), "--rows", str(args.rows),
            "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size), "--topk", str(args.topk),
            "--dtype", args.dtype]
    for name in tqdm(variants, desc="variants", file=sys.stderr):
        # glibc: serve every allocation >= 64 KiB with its own mmap and unmap it on free, so the resident size
        # follows the live tensors instead of keeping freed heap pages around (which hides or inflates peaks).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        proc = subprocess.run(base + ["--child", name], capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"variant {name} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
        results[name] = json.loads(lines[-1][len("RESULT "):])

    def ratio(name, ref):
        return f"{results[name]['peak_bytes'] / results[ref]['peak_bytes']:.2f}x" if ref in results else "-"

    print(f"\npeak memory of loss forward+backward above the inputs ({next(iter(results.values()))['device']})")
    print(f"{'variant':<16}{'peak MiB':>10}{'inputs MiB':>12}{'seconds':>9}{'vs ce_fused':>13}{'vs ce_checkpoint':>18}")
    for name, r in results.items():
        print(f"{name:<16}{r['peak_bytes'] / MiB:>10.0f}{r['input_bytes'] / MiB:>12.0f}{r['seconds']:>9.1f}"
              f"{ratio(name, 'ce_fused'):>13}{ratio(name, 'ce_checkpoint'):>18}")
    goals = [("sparse_forward_kl", 1.10), ("full_forward_kl", 1.50)]
    for name, goal in goals:
        if name in results:
            for ref in ("ce_fused", "ce_checkpoint"):
                if ref in results:
                    got = results[name]["peak_bytes"] / results[ref]["peak_bytes"]
                    print(f"goal {name} <= {goal:.2f}x {ref}: {got:.2f}x {'met' if got <= goal else 'NOT met'}")


if __name__ == "__main__":
    main()

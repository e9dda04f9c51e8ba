"""RetNet scaling, measured side by side in one run.

1. Training: forward+backward time and peak memory per token for T = 512 .. 8192, chunkwise (goal: linear,
   time per token at the longest T within 1.3x of the shortest) against parallel mode (quadratic).
2. Decoding: latency per token after a context of 256 vs 8192 tokens (goal: within 1.1x) and the size of the
   recurrent state, against a LlamaForCausalLM of about the same size decoding with its KV cache. Both contexts
   decode in one process, step by step in turn, so noise hits them alike.

Each training point runs in a fresh subprocess so its peak memory is its own (CUDA: max_memory_allocated; CPU: peak RSS
growth over the process's baseline). Prints a table with ratios and writes PNG plots to --out.

    python bench/bench_retnet.py --quick          # CPU, ~2 minutes
    python bench/bench_retnet.py --device cuda    # the full sweep on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from hf_retnet.modeling_retnet import CACHE_FIELD  # "cache" on transformers >= 5.24, "past_key_values" before


def model_kwargs(args):
    return dict(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_heads=args.heads, intermediate_size=2 * args.hidden_size, chunk_size=args.chunk_size,
    )


def build_retnet(args):
    from hf_retnet import RetNetConfig, RetNetForCausalLM

    torch.manual_seed(0)
    return RetNetForCausalLM(RetNetConfig(**model_kwargs(args))).to(args.device, getattr(torch, args.dtype))


def build_llama(args, max_positions):
    from transformers import LlamaConfig, LlamaForCausalLM

    # Same width/depth; the FFN is widened so the parameter count matches the RetNet's (its MSR is 8d^2 vs 4d^2).
    d = args.hidden_size
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=d, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, intermediate_size=2 * d + (4 * d * d) // (3 * d),
        max_position_embeddings=max_positions, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_bytes(device, baseline):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() - baseline
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


def current_bytes(device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    import psutil

    return psutil.Process().memory_info().rss


def point_train(args, mode, seq_len):
    """Forward + backward over [batch, seq_len] in `mode`; seconds and peak bytes per token."""
    model = build_retnet(args).train()
    ids = torch.randint(0, args.vocab_size, (args.batch, seq_len), device=args.device)
    model(ids[:, :16], labels=ids[:, :16], retention_mode=mode).loss.backward()  # warm-up
    model.zero_grad(set_to_none=True)
    baseline = current_bytes(args.device)
    times = []
    for _ in range(args.repeats):
        sync(args.device)
        start = time.perf_counter()
        model(ids, labels=ids, retention_mode=mode).loss.backward()
        sync(args.device)
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    tokens = args.batch * seq_len
    return {"s_per_token": min(times) / tokens, "bytes_per_token": peak_bytes(args.device, baseline) / tokens}


@torch.no_grad()
def point_decode(args, kind, contexts):
    """Prefill each context, then time single-token decode steps, alternating between the contexts step by step
    so that machine noise hits them alike; also report each cache's size."""
    model = (build_retnet(args) if kind == "retnet" else build_llama(args, max(contexts) + args.decode_steps + 8)).eval()
    prefill = {"retention_mode": "chunkwise"} if kind == "retnet" else {}
    step_kwargs = {"retention_mode": "recurrent"} if kind == "retnet" else {}
    caches, tokens, times = {}, {}, {c: [] for c in contexts}
    for c in contexts:
        out = model(torch.randint(0, args.vocab_size, (1, c), device=args.device), use_cache=True, **prefill)
        caches[c], tokens[c] = out[CACHE_FIELD], out.logits[:, -1:].argmax(-1)
    for i in range(args.decode_steps):
        for c in contexts:
            sync(args.device)
            start = time.perf_counter()
            out = model(tokens[c], use_cache=True, **{CACHE_FIELD: caches[c]}, **step_kwargs)
            sync(args.device)
            if i >= 2:  # first steps warm up allocator and kernels
                times[c].append(time.perf_counter() - start)
            caches[c], tokens[c] = out[CACHE_FIELD], out.logits[:, -1:].argmax(-1)

    def cache_bytes(cache):
        if kind == "retnet":
            return sum(s.numel() * s.element_size() for s in cache.states)
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)

    params = sum(p.numel() for p in model.parameters())
    return {c: {"s_per_token": sorted(times[c])[len(times[c]) // 2], "cache_bytes": cache_bytes(caches[c]),
                "params": params} for c in contexts}


def run_point(args, *spec):
    """Each point in its own process: peak memory is then that point's alone."""
    cmd = [sys.executable, __file__, "--_point", json.dumps(spec)] + args.passthrough
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def plot(path, xs, series, xlabel, ylabel, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model and fewer repeats (CPU, ~2 minutes)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--hidden-size", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--decode-steps", type=int, default=None)
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--parallel-max", type=int, default=None, help="longest T tried in parallel mode")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--_point", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    defaults = dict(hidden_size=256 if args.quick else 1024, layers=2 if args.quick else 8, heads=4 if args.quick else 8,
                    vocab_size=1024 if args.quick else 32000, chunk_size=64 if args.quick else 128,
                    repeats=2 if args.quick else 3, decode_steps=40 if args.quick else 100,
                    dtype="bfloat16" if gpu else "float32", parallel_max=8192 if gpu else 4096)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.passthrough = [a for a in sys.argv[1:] if not a.startswith("--_point")]
    if args._point:
        kind, *rest = json.loads(args._point)
        print(json.dumps(point_train(args, *rest) if kind == "train" else point_decode(args, kind, *rest)))
        return

    lengths = [int(x) for x in args.lengths.split(",")]
    os.makedirs(args.out, exist_ok=True)
    print(f"device={args.device} dtype={args.dtype} d={args.hidden_size} layers={args.layers} heads={args.heads} "
          f"chunk={args.chunk_size} batch={args.batch}")

    print("\n# training: forward+backward per token")
    print(f"{'T':>6} | {'chunkwise us/tok':>16} {'MiB/ktok':>9} | {'parallel us/tok':>15} {'MiB/ktok':>9}")
    train = {}
    for t in lengths:
        chunk = run_point(args, "train", "chunkwise", t)
        par = run_point(args, "train", "parallel", t) if t <= args.parallel_max else {"error": "skipped (quadratic)"}
        train[t] = (chunk, par)
        fmt = lambda r: (f"{r['s_per_token'] * 1e6:16.1f} {r['bytes_per_token'] * 1024 / 2**20:9.2f}"
                         if "error" not in r else f"{r['error'][:26]:>26}")
        print(f"{t:>6} | {fmt(chunk)} | {fmt(par)}")
    first, last = lengths[0], lengths[-1]
    c0, c1 = train[first][0], train[last][0]
    if "error" not in c0 and "error" not in c1:
        print(f"chunkwise time/token at T={last} vs T={first}: {c1['s_per_token'] / c0['s_per_token']:.2f}x "
              f"(goal <= 1.3x); memory/token: {c1['bytes_per_token'] / max(c0['bytes_per_token'], 1):.2f}x")
    par_ok = [t for t in lengths if "error" not in train[t][1]]
    if len(par_ok) > 1:
        p0, p1 = train[par_ok[0]][1], train[par_ok[-1]][1]
        print(f"parallel  time/token at T={par_ok[-1]} vs T={par_ok[0]}: {p1['s_per_token'] / p0['s_per_token']:.2f}x; "
              f"memory/token: {p1['bytes_per_token'] / max(p0['bytes_per_token'], 1):.2f}x")
    plot(os.path.join(args.out, "retnet_train_time_per_token.png"), lengths,
         {m: [train[t][i].get("s_per_token", None) and train[t][i]["s_per_token"] * 1e6 for t in lengths]
          for i, m in enumerate(("chunkwise", "parallel"))},
         "sequence length T", "us per token (fwd+bwd)", "RetNet training cost per token")

    print("\n# decoding: latency per token after a context")
    contexts = [256, lengths[-1]]
    decode = {}
    for kind in ("retnet", "llama"):
        result = run_point(args, kind, contexts)
        if "error" in result:
            print(f"{kind}: {result['error']}")
            continue
        decode[kind] = {int(c): r for c, r in result.items()}
        r0, r1 = decode[kind][contexts[0]], decode[kind][contexts[1]]
        print(f"{kind:>6} ({r0['params'] / 1e6:.1f}M params): {r0['s_per_token'] * 1e3:.2f} ms/token at {contexts[0]}, "
              f"{r1['s_per_token'] * 1e3:.2f} ms/token at {contexts[1]} -> {r1['s_per_token'] / r0['s_per_token']:.2f}x; "
              f"cache {r0['cache_bytes'] / 2**20:.2f} MiB -> {r1['cache_bytes'] / 2**20:.2f} MiB")
    plot(os.path.join(args.out, "retnet_decode_latency.png"), contexts,
         {k: [decode[k][c]["s_per_token"] * 1e3 for c in contexts] for k in decode},
         "context length", "ms per decoded token", "Decoding latency vs context")
    print(f"\nplots written to {args.out}/")


if __name__ == "__main__":
    main()

"""Decoding latency per token: RetNet (recurrent state) against a Llama of the same shape (KV cache), side by side.

For each context length both models prefill a random prompt, then one-token steps are timed in turn (every
(model, context) pair once per round, in a fresh random order each round), so machine noise and cold caches hit all
of them alike; the median step is reported. A second measure times `generate()` itself: (time for N2 new tokens - time for N1) / (N2 - N1),
which leaves the prefill out and keeps everything `generate()` adds per step (input preparation, logits processing).

Goals (issue 22): a RetNet step no slower than the Llama step at 64 tokens of context, at least 3x faster at 8K.

    OMP_NUM_THREADS=1 python bench/bench_decode.py --quick     # CPU, one thread, about a minute
    python bench/bench_decode.py --device cuda                 # GPU (bf16)

The default shape is the demo student (d=64, 5 layers, 4 heads, vocab 512; examples/configs/demo.yaml);
`--shape medium` is a d=512, 8-layer, 8-head model on a 32000 vocabulary. Ratios are the result; absolute times
are only meaningful from a GPU run (DESIGN.md). Writes bench/results/decode_latency_<shape>.png.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's hf_retnet first

SHAPES = {
    "demo": dict(hidden_size=64, layers=5, heads=4, kv_heads=4, intermediate_size=172, vocab_size=512),
    "medium": dict(hidden_size=512, layers=8, heads=8, kv_heads=8, intermediate_size=1376, vocab_size=32000),
}


def build(kind, shape, max_positions, device, dtype):
    torch.manual_seed(0)
    if kind == "retnet":
        from hf_retnet import RetNetConfig, RetNetForCausalLM

        config = RetNetConfig(
            vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], num_hidden_layers=shape["layers"],
            num_heads=shape["heads"], num_kv_heads=shape["kv_heads"], intermediate_size=shape["intermediate_size"],
            chunk_size=128, pad_token_id=0, eos_token_id=None,
        )
        model = RetNetForCausalLM(config)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], num_hidden_layers=shape["layers"],
            num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
            intermediate_size=shape["intermediate_size"], max_position_embeddings=max_positions,
            tie_word_embeddings=True, pad_token_id=0, eos_token_id=None,
        )
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


def cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def step_latency(models, contexts, steps, device, vocab):
    """Median seconds per one-token forward with a cache, per (model, context)."""
    state = {}
    for kind, model in models.items():
        for c in contexts:
            out = model(torch.randint(1, vocab, (1, c), device=device), use_cache=True)
            state[kind, c] = (cache_of(out), out.logits[:, -1:].argmax(-1))
    times = {key: [] for key in state}
    order, rng = list(state), random.Random(0)
    for i in range(steps + 3):
        rng.shuffle(order)  # a fresh order each round: no key always runs right after another (cold caches)
        for key in order:
            cache, token = state[key]
            sync(device)
            start = time.perf_counter()
            out = models[key[0]](token, cache=cache, use_cache=True)
            sync(device)
            if i >= 3:  # warm-up: allocator, first-call paths
                times[key].append(time.perf_counter() - start)
            state[key] = (cache_of(out), out.logits[:, -1:].argmax(-1))
    return {key: statistics.median(v) for key, v in times.items()}


@torch.no_grad()
def generate_latency(models, context, n1, n2, repeats, device, vocab):
    """Per-token cost of generate() beyond its prefill: (t(n2) - t(n1)) / (n2 - n1), best of `repeats`."""
    prompt = torch.randint(1, vocab, (1, context), device=device)
    best = {(kind, n): float("inf") for kind in models for n in (n1, n2)}
    for _ in range(repeats):
        for kind, model in models.items():
            for n in (n1, n2):
                sync(device)
                start = time.perf_counter()
                model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False)
                sync(device)
                best[kind, n] = min(best[kind, n], time.perf_counter() - start)
    return {kind: (best[kind, n2] - best[kind, n1]) / (n2 - n1) for kind in models}


def plot(path, contexts, lat, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, label in (("retnet", "RetNet (recurrent state)"), ("llama", "Llama (KV cache)")):
        ax.plot(contexts, [lat[kind, c] * 1e3 for c in contexts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms per decoded token")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="contexts 64, 1024, 8192 and fewer steps")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--contexts", default=None, help="comma-separated context lengths")
    parser.add_argument("--steps", type=int, default=None, help="timed one-token steps per (model, context)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    contexts = [int(c) for c in (args.contexts or ("64,1024,8192" if args.quick else "64,256,1024,4096,8192")).split(",")]
    steps = args.steps or (30 if args.quick else 100)
    shape = SHAPES[args.shape]
    models = {kind: build(kind, shape, max(contexts) + 256, args.device, dtype) for kind in ("retnet", "llama")}
    import transformers

    print(f"device={args.device} dtype={str(dtype).removeprefix('torch.')} threads={torch.get_num_threads()} "
          f"shape={args.shape} {shape} transformers={transformers.__version__} torch={torch.__version__}")
    for kind, model in models.items():
        print(f"  {kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    lat = step_latency(models, contexts, steps, args.device, shape["vocab_size"])
    print(f"\n# one-token forward with a cache (median of {steps} steps)")
    print(f"{'context':>8} | {'RetNet ms':>9} | {'Llama ms':>9} | Llama / RetNet")
    for c in contexts:
        r, l = lat["retnet", c], lat["llama", c]
        print(f"{c:>8} | {r * 1e3:9.3f} | {l * 1e3:9.3f} | {l / r:6.2f}x")
    first, last = contexts[0], contexts[-1]
    print(f"RetNet at {last} vs {first}: {lat['retnet', last] / lat['retnet', first]:.2f}x; "
          f"Llama at {last} vs {first}: {lat['llama', last] / lat['llama', first]:.2f}x")
    print(f"goals: RetNet/Llama at {first} = {lat['retnet', first] / lat['llama', first]:.2f} (<= 1.00); "
          f"Llama/RetNet at {last} = {lat['llama', last] / lat['retnet', last]:.2f}x (>= 3x)")

    n1, n2 = (8, 40) if args.quick else (16, 112)
    gen = generate_latency(models, first, n1, n2, 3, args.device, shape["vocab_size"])
    print(f"\n# generate() per new token after a {first}-token prompt ((t({n2}) - t({n1})) / {n2 - n1}, best of 3)")
    print(f"RetNet {gen['retnet'] * 1e3:.3f} ms, Llama {gen['llama'] * 1e3:.3f} ms: "
          f"RetNet/Llama = {gen['retnet'] / gen['llama']:.2f}")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"decode_latency_{args.shape}.png")
    plot(path, contexts, lat, f"Decoding latency vs context ({args.shape} shape, {args.device})")
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()

"""Hybrid RetNet (attention_window = W, attention_sinks = S) against the pure RetNet and a Llama with a KV cache,
measured side by side.

One Llama of the SmolLM2-135M shape with fewer layers (hidden 576, 9 heads / 3 k/v heads, head_dim 64) is the
teacher; the pure RetNet and the hybrid are converted from it (`from_llama`, same weights). Each model prefills a
context of 256 and of 8192 tokens, then decodes single tokens, the six (model, context) pairs in turn step by step so
machine noise hits them alike. Reports the median latency per decoded token and the bytes of decoding state (RetNet
state + window + sinks vs KV cache), with ratios. One thread by default (CPU timings are only quoted as ratios).

    python bench/bench_hybrid.py --quick      # CPU, a few minutes (W = 64, S = 4)
    python bench/bench_hybrid.py --quick --sinks 0
    python bench/bench_hybrid.py --device cuda --threads 0
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_retnet import retnet_from_llama
from hf_retnet.modeling_retnet import CACHE_FIELD


def build(args):
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=max(args.contexts) + 512,
        tie_word_embeddings=True, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    llama = LlamaForCausalLM(config).eval()
    models = {
        "llama+kv": llama,
        "retnet": retnet_from_llama(llama, chunk_size=args.chunk_size),
        hybrid_name(args): retnet_from_llama(llama, chunk_size=args.chunk_size, attention_window=args.window,
                                             attention_sinks=args.sinks),
    }
    dtype = getattr(torch, args.dtype)
    return {name: m.eval().to(args.device, dtype) for name, m in models.items()}


def hybrid_name(args) -> str:
    return f"hybrid W={args.window}" + (f" S={args.sinks}" if args.sinks else "")


def state_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):  # RetNetCache: retention states (+ window keys/values/flags)
        return cache.nbytes()
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer decode steps (CPU, a few minutes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--sinks", type=int, default=4, help="attention sinks S of the hybrid (0: window only)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--contexts", default="256,8192")
    parser.add_argument("--decode-steps", type=int, default=None)
    args = parser.parse_args()
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.decode_steps = args.decode_steps or (24 if args.quick else 100)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = build(args)
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} layers={args.layers} "
          f"hidden=576 heads=9/3 kv vocab={args.vocab_size} window={args.window} sinks={args.sinks} "
          f"steps={args.decode_steps}")

    caches, tokens, times = {}, {}, {}
    for name, model in models.items():
        retnet = not name.startswith("llama")
        for c in args.contexts:
            ids = torch.randint(0, args.vocab_size, (1, c), generator=torch.Generator().manual_seed(c)).to(args.device)
            kwargs = {"retention_mode": "chunkwise"} if retnet else {}
            start = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1, **kwargs)
            print(f"  prefill {name:>18} T={c:>5}: {time.perf_counter() - start:6.2f} s", flush=True)
            caches[name, c], tokens[name, c], times[name, c] = out[CACHE_FIELD], out.logits[:, -1:].argmax(-1), []
    for step in range(args.decode_steps):
        for (name, c), cache in list(caches.items()):
            model = models[name]
            kwargs = {} if name.startswith("llama") else {"retention_mode": "recurrent"}
            sync(args.device)
            start = time.perf_counter()
            out = model(tokens[name, c], use_cache=True, **{CACHE_FIELD: cache}, **kwargs)
            sync(args.device)
            if step >= 3:  # the first steps warm up the allocator
                times[name, c].append(time.perf_counter() - start)
            caches[name, c], tokens[name, c] = out[CACHE_FIELD], out.logits[:, -1:].argmax(-1)

    median = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
    size = {key: state_bytes(cache) for key, cache in caches.items()}
    hybrid = hybrid_name(args)
    lo, hi = min(args.contexts), max(args.contexts)
    print(f"\n{'model':>18} | {'context':>7} | {'ms/token':>8} | {'state KiB':>10} | {'latency / llama':>15} | "
          f"{'state / llama':>13}")
    for name in models:
        for c in args.contexts:
            print(f"{name:>18} | {c:>7} | {1e3 * median[name, c]:8.2f} | {size[name, c] / 1024:10.1f} | "
                  f"{median[name, c] / median['llama+kv', c]:15.2f} | {size[name, c] / size['llama+kv', c]:13.4f}")
    print(f"\nratios (same run, {args.device}):")
    for c in args.contexts:
        print(f"  T={c}: hybrid/retnet latency {median[hybrid, c] / median['retnet', c]:.2f}x, "
              f"state {size[hybrid, c] / size['retnet', c]:.2f}x; hybrid/llama latency "
              f"{median[hybrid, c] / median['llama+kv', c]:.2f}x, state {size[hybrid, c] / size['llama+kv', c]:.3f}x")
    for name in models:
        print(f"  {name}: latency T={hi} / T={lo} {median[name, hi] / median[name, lo]:.2f}x, "
              f"state {size[name, hi] / size[name, lo]:.2f}x")


if __name__ == "__main__":
    main()

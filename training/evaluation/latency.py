"""Decoding cost per token across context lengths: a RetNet's recurrent state against a Transformer's KV cache.

For each context length the model prefills that many (seeded random) tokens, then decodes `decode_tokens` tokens
one forward at a time; the median step time is the latency per token. Memory is the size of what the model
carries between steps (all tensors of its cache object) and, on CUDA, the peak allocated memory of the run.
Times are measured, never asserted: compare student and teacher side by side from the same run.
"""

from __future__ import annotations

import inspect
import statistics
import time

import torch


def tensor_bytes(obj, _seen=None, _depth=0) -> int:
    """Bytes of all distinct tensors reachable from a cache object (lists, dicts, attributes)."""
    _seen = set() if _seen is None else _seen
    if _depth > 6 or id(obj) in _seen:
        return 0
    _seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple, set)):
        return sum(tensor_bytes(x, _seen, _depth + 1) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x, _seen, _depth + 1) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        return sum(tensor_bytes(x, _seen, _depth + 1) for x in vars(obj).values())
    return 0


def _cache_kwarg(model) -> str:
    """transformers 5 models take `cache=`; older ones (and the RetNet) `past_key_values=`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(output):
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_latency(model, context_length: int, decode_tokens: int = 16, seed: int = 0) -> dict:
    """{"context_length", "ms_per_token" (median), "ms_per_token_p90", "cache_bytes", "peak_bytes" (CUDA)}."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, context_length), generator=gen).to(device)  # [1, T]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    out = model(input_ids=ids, use_cache=True)
    key = _cache_kwarg(model)
    cache = _returned_cache(out)
    nxt = out.logits[:, -1:].argmax(-1)  # [1, 1]
    del out
    times = []
    for _ in range(decode_tokens):
        _sync(device)
        start = time.perf_counter()
        step = model(input_ids=nxt, use_cache=True, **{key: cache})
        nxt = step.logits[:, -1:].argmax(-1)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        cache = _returned_cache(step)
    times.sort()
    return {
        "context_length": context_length,
        "ms_per_token": statistics.median(times),
        "ms_per_token_p90": times[min(len(times) - 1, int(0.9 * len(times)))],
        "cache_bytes": tensor_bytes(cache),
        "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def latency_table(model, context_lengths, decode_tokens: int = 16, max_positions: int | None = None,
                  progress: bool = True) -> dict:
    """{"rows": [...], "skipped": [...]} over `context_lengths` (after one warm-up decode)."""
    from tqdm.auto import tqdm

    decode_latency(model, min(context_lengths), decode_tokens=2)  # warm-up: first-call allocations, kernels
    rows, skipped = [], []
    for length in tqdm(list(context_lengths), desc="decode latency", disable=not progress):
        if max_positions is not None and length + decode_tokens > max_positions:
            skipped.append({"context_length": length, "reason": f"beyond the model's {max_positions} positions"})
            continue
        rows.append(decode_latency(model, length, decode_tokens))
    return {"rows": rows, "skipped": skipped, "decode_tokens": decode_tokens,
            "device": str(next(model.parameters()).device)}

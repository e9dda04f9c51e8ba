"""Generation samples from fixed prompts, greedy and sampled (seeded), so runs can be compared by eye."""

from __future__ import annotations

import torch

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, a small robot",
    "To make a cup of tea, first",
    "The three primary colours are",
)


@torch.no_grad()
def generation_samples(model, tokenizer, prompts=DEFAULT_PROMPTS, max_new_tokens: int = 40, seed: int = 0,
                       temperature: float = 0.8, top_p: float = 0.95) -> list[dict]:
    """[{"prompt", "greedy", "sampled"}]: continuations only (the prompt is not repeated)."""
    device = next(model.parameters()).device
    out = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)  # [1, T] with BOS
        common = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                      pad_token_id=tokenizer.pad_token_id)
        greedy = model.generate(ids, do_sample=False, **common)
        torch.manual_seed(seed + i)
        sampled = model.generate(ids, do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **common)
        decode = lambda seq: tokenizer.decode(seq[0, ids.shape[1]:], skip_special_tokens=True)  # noqa: E731
        out.append({"prompt": prompt, "greedy": decode(greedy), "sampled": decode(sampled)})
    return out

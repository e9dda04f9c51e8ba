"""Long-context retrieval: a 5-digit pass key hidden at several depths of filler text, several context lengths.

The prompt (after BOS) is an instruction, repeated filler sentences with the key sentence inserted at the sentence
boundary nearest `depth` (0 = start, 1 = end), then a question that the model completes greedily. A trial passes
when the key's digits appear in the continuation. Prompts are built in token space so a context length is met to
within one filler sentence, whatever the tokenizer.
"""

from __future__ import annotations

import random

import torch

INTRO = "There is an important pass key hidden inside a lot of irrelevant text. Find it and remember it."
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def build_prompt(tokenizer, context_length: int, depth: float, key: int) -> list[int] | None:
    """Token ids of one passkey prompt of at most `context_length` tokens, or None if it cannot fit."""
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    head = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + enc(INTRO)
    needle, question, filler = enc(NEEDLE.format(key=key)), enc(QUESTION), enc(FILLER)
    room = context_length - len(head) - len(needle) - len(question)
    reps = room // len(filler)
    if reps < 1:
        return None
    at = round(depth * reps)
    return head + filler * at + needle + filler * (reps - at) + question


@torch.no_grad()
def run_passkey(model, tokenizer, context_lengths, depths, trials: int = 3, seed: int = 0,
                max_positions: int | None = None, progress: bool = True) -> dict:
    """{"cells": [{context_length, depth, accuracy, trials, prompt_tokens}], "accuracy": mean over cells}.
    Lengths above `max_positions` (a Transformer's position limit) are reported as skipped."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    rng = random.Random(seed)
    keys = [rng.randint(10000, 99999) for _ in range(trials)]  # the same keys for every model and cell
    cells, skipped = [], []
    grid = [(length, depth) for length in context_lengths for depth in depths]
    for length, depth in tqdm(grid, desc="passkey", disable=not progress):
        if max_positions is not None and length > max_positions:
            skipped.append({"context_length": length, "depth": depth,
                            "reason": f"beyond the model's {max_positions} positions"})
            continue
        hits, sizes, answers = 0, [], []
        for key in keys:
            prompt = build_prompt(tokenizer, length, depth, key)
            if prompt is None:
                break
            ids = torch.tensor([prompt], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                 pad_token_id=tokenizer.pad_token_id)
            answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            hits += str(key) in answer
            sizes.append(len(prompt))
            answers.append(answer)
        if not sizes:
            skipped.append({"context_length": length, "depth": depth, "reason": "too short for the prompt"})
            continue
        cells.append({"context_length": length, "depth": depth, "accuracy": hits / len(sizes),
                      "trials": len(sizes), "prompt_tokens": max(sizes), "example_answer": answers[0]})
    accuracy = sum(c["accuracy"] for c in cells) / len(cells) if cells else None
    return {"cells": cells, "skipped": skipped, "accuracy": accuracy, "keys": keys}

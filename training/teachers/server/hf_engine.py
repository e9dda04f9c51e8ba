"""The teacher server's default engine (`--engine hf`): a transformers causal LM run through `DirectTeacher`."""

from __future__ import annotations

import numpy as np


class HFEngine:
    """Runs a transformers causal LM through `DirectTeacher` on right-padded batches of unpadded rows."""

    name = "hf"

    def __init__(self, teacher):
        self.teacher = teacher
        self.vocab_size = int(teacher.vocab_size)

    def topk_rows(self, rows: list[list[int]], k: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
        """rows: B lists of ids -> (ids [N, k], logprobs [N, k] float32), N = sum of row lengths, row order."""
        import torch

        lengths = [len(r) for r in rows]
        width = max(lengths)
        input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)  # [B, T]
        mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # [B, T] bool
        # No mask when nothing is padded, exactly as a trainer would call DirectTeacher on a full batch.
        padded = min(lengths) < width
        out = self.teacher.topk(input_ids, mask.long() if padded else None, k=k, temperature=temperature)
        return out.token_ids[mask].cpu().numpy(), out.logprobs[mask].cpu().numpy()  # [N, k] each

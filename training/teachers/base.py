"""The interface every teacher-logit source implements (direct, cached, network)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class TeacherOutput:
    """The teacher's top-k next-token distribution at every position.

    token_ids: [B, T, k] int64, sorted by descending log-probability.
    logprobs:  [B, T, k] float32, log-probabilities (temperature already applied by the source)
               of the next token after reading tokens 0..t.
    full_logits: [B, T, V] or None; only sources that hold the whole distribution (direct mode)
               fill it, so the trainer can use full-vocabulary KL.
    seconds:   wall time the source spent producing this output (for throughput logs).
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    full_logits: torch.Tensor | None = None
    seconds: float = 0.0

    def validate(self, batch_size: int, seq_len: int, k: int) -> "TeacherOutput":
        """Raise a ValueError unless shapes and dtypes match the request; never train on a partial answer."""
        want = (batch_size, seq_len, k)
        if tuple(self.token_ids.shape) != want or tuple(self.logprobs.shape) != want:
            raise ValueError(
                f"teacher answer has shapes token_ids={tuple(self.token_ids.shape)}, "
                f"logprobs={tuple(self.logprobs.shape)}; expected {want} (batch, seq_len, k)"
            )
        if self.token_ids.dtype != torch.int64 or self.logprobs.dtype != torch.float32:
            raise ValueError(
                f"teacher answer has dtypes {self.token_ids.dtype}/{self.logprobs.dtype}; expected int64/float32"
            )
        return self


@runtime_checkable
class TeacherSource(Protocol):
    """Anything that yields the teacher's top-k next-token log-probabilities for a batch."""

    vocab_size: int

    def topk(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        k: int,
        temperature: float = 1.0,
        position_ids: torch.Tensor | None = None,
    ) -> TeacherOutput:
        """input_ids/attention_mask: [B, T]. Returns a TeacherOutput of shape [B, T, k].

        position_ids [B, T] (packed rows): a document starts wherever they restart (0, or not above the previous
        token's; `training.data.shards.document_starts`), and the answer at every token is the one its document
        alone would get: nothing of an earlier document in the row is seen. The trainer passes them only for
        packed batches."""
        ...

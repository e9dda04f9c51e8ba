"""The interface every teacher-logit source implements (direct, cached, network), and the padding stand-in the
sources that answer row by row write at padded positions."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

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


class TeacherSource(abc.ABC):
    """Anything that yields the teacher's top-k next-token log-probabilities for a batch.

    A source subclasses this class and implements `vocab_size` and `topk`; everything else has a default here, so
    the trainer reads every capability directly instead of probing for it. DirectTeacher, CachedTeacher and
    NetworkTeacher are the built-in sources.
    """

    vocab_size: int
    """The teacher's vocabulary size (ids in answers are below it); must equal the student's."""

    drops_entries: bool = False
    """True when answers leave out top-k entries below a mass threshold (a compact cache encoding): exact for
    forward KL, which keeps their mass in the tail, not for reverse KL / JSD, so the trainer refuses those."""

    return_full_logits: bool = False
    """True when `topk` also fills `TeacherOutput.full_logits` [B, T, V] (needed by full_vocab_kd)."""

    encoding = None
    """How the source's answers were stored (a cache's `training.teachers.cache.format` encoding); None for sources
    that compute them on demand."""

    @abc.abstractmethod
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

    def prefetch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        k: int,
        temperature: float = 1.0,
        position_ids: torch.Tensor | None = None,
    ) -> None:
        """Optional: start working on a batch that `topk` will be asked about soon (same arguments), so its answer
        is ready by then. The default does nothing; `topk` then computes the answer when asked."""

    @property
    def can_prefetch(self) -> bool:
        """True when the source overrides `prefetch`: only then does the trainer pull batches one step ahead."""
        return type(self).prefetch is not TeacherSource.prefetch

    def close(self) -> None:
        """Release what the source holds (background threads, connections). The default holds nothing."""


def padding_answer(real: torch.Tensor, k: int) -> TeacherOutput:
    """A [B, T, k] answer on the CPU whose padding positions (`real` [B, T] False) hold the padding stand-in: a
    uniform distribution over ids 0..k-1, finite and never trained on, so any consumer stays finite. The real
    positions are left uninitialised for the caller to fill with the teacher's answer."""
    batch, seq_len = real.shape
    token_ids = torch.empty(batch, seq_len, k, dtype=torch.int64)  # [B, T, k]
    logprobs = torch.empty(batch, seq_len, k, dtype=torch.float32)  # [B, T, k]
    padding = ~real.bool().cpu()
    token_ids[padding] = torch.arange(k, dtype=torch.int64)
    logprobs[padding] = -math.log(k)
    return TeacherOutput(token_ids, logprobs)

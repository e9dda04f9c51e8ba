"""RetNet for `transformers` (Sun et al., 2023, "Retentive Network: A Successor to Transformer for LLMs").

Self-contained: imports only torch, transformers and the configuration beside it, so a saved checkpoint
carries this file to the Hub and loads with `trust_remote_code=True` where `hf_retnet` is not installed.

Retention of one head with decay gamma, for real (unmasked) tokens, is

    S_n = gamma * S_{n-1} + k_n^T v_n          (state [d_k, d_v], fp32)
    o_n = q_n S_n

computed three ways with identical results: `recurrent` (the loop above, O(1) per token), `parallel`
((Q K^T * D) V with D[n, m] = gamma^(n-m) for n >= m) and `chunkwise` (parallel inside chunks, recurrent
across them, O(T) time and memory). Padding (attention_mask == 0) neither adds to nor decays the state:
decay exponents count real tokens only ("effective time" c_n = number of real tokens up to n), so a
left-padded sequence is computed exactly as if it stood alone.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

from .configuration_retnet import RETENTION_MODES, RetNetConfig

logger = logging.get_logger(__name__)

# transformers >= 5.24 names the cache `cache` (in generate(), forward kwargs and model outputs); older 5.x releases
# name it `past_key_values`. Both are accepted, and outputs use the field the installed release declares, so
# generate() hands our state back to us on every version this file may meet on the Hub.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _pick_cache(cache: RetNetCache | None, past_key_values: RetNetCache | None) -> RetNetCache | None:
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the recurrent state once, as `cache` (or the older name `past_key_values`), not both")
    return cache if cache is not None else past_key_values


# ----------------------------------------------------------------------------------------------------------------
# Recurrent state
# ----------------------------------------------------------------------------------------------------------------


# Why not transformers' own recurrent-state layers (`LinearAttentionLayer` in cache_utils, used by Qwen3-Next and
# other linear-attention models): they first appear after 5.2, the oldest release this file supports (5.2's
# cache_utils has only Dynamic/Static/Quantized key-value layers), and they hold conv and recurrent states per layer
# without the per-row token count that padding-aware positions need. So the state keeps its own Cache subclass.
class RetNetCache(Cache):
    """Recurrent state of a RetNet: one fp32 matrix per layer and head, whatever the context length.

    states[i]: [B, H, d_k, d_v] float32 for layer i.
    seen_tokens: [B] int64, real (unpadded) tokens read so far per sequence; the next token's position.
    Hybrid models (`attention_window` = W > 0) also keep the window, still constant in the context length:
    window_keys[i] / window_values[i]: [B, H, W, d_k] / [B, H, W, d_v] float32, the last W real tokens' rotated,
    scaled keys and values, newest last; window_valid: [B, W] bool, which slots hold a token (fewer than W read).
    With attention sinks (`attention_sinks` = S > 0), also: sink_keys[i] / sink_values[i]: [B, H, S, d_k] /
    [B, H, S, d_v] float32, slot s the key/value of the current document's token s once it has left the window
    (zeros before; a sink still in the window lives in the window slots only); doc_tokens: [B] int64, real tokens of
    the row's current document read so far, which says which slots hold a sink.
    transformers' sliding-window cache layers keep the last W - 1 positions, padding included, and drop what leaves;
    here a slot is a real token and what leaves goes into the retention state, so the window lives in this class.
    """

    is_compileable = False

    def __init__(self, num_layers: int | None = None):
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.states: list[torch.Tensor | None] = [None] * (num_layers or 0)
        self.seen_tokens: torch.Tensor | None = None
        self._length = 0  # input positions consumed (padding included), as generation counts them
        self.window_keys: list[torch.Tensor | None] = [None] * (num_layers or 0)
        self.window_values: list[torch.Tensor | None] = [None] * (num_layers or 0)
        self.window_valid: torch.Tensor | None = None
        self.sink_keys: list[torch.Tensor | None] = [None] * (num_layers or 0)
        self.sink_values: list[torch.Tensor | None] = [None] * (num_layers or 0)
        self.doc_tokens: torch.Tensor | None = None

    def __repr__(self) -> str:
        shape = None if not self.states or self.states[0] is None else tuple(self.states[0].shape)
        return f"RetNetCache(layers={len(self.states)}, state_shape={shape}, length={self._length})"

    def __len__(self) -> int:
        return len(self.states)

    def get_state(self, layer_idx: int):
        """The layer's state: the retention matrix, or for a hybrid layer (matrix, window keys, window values), with
        (..., sink keys, sink values) appended when it keeps attention sinks."""
        state = self.states[layer_idx] if layer_idx < len(self.states) else None
        if state is not None and layer_idx < len(self.window_keys) and self.window_keys[layer_idx] is not None:
            state = (state, self.window_keys[layer_idx], self.window_values[layer_idx])
            if layer_idx < len(self.sink_keys) and self.sink_keys[layer_idx] is not None:
                state = state + (self.sink_keys[layer_idx], self.sink_values[layer_idx])
        return state

    def set_state(self, layer_idx: int, state) -> None:
        keys = values = sink_keys = sink_values = None
        if isinstance(state, tuple):
            state, keys, values, *sinks = state
            sink_keys, sink_values = sinks if sinks else (None, None)
        for store in (self.states, self.window_keys, self.window_values, self.sink_keys, self.sink_values):
            while len(store) <= layer_idx:
                store.append(None)
        self.states[layer_idx] = state
        self.window_keys[layer_idx], self.window_values[layer_idx] = keys, values
        self.sink_keys[layer_idx], self.sink_values[layer_idx] = sink_keys, sink_values

    def nbytes(self) -> int:
        """Bytes held: retention states plus (hybrid) the window keys, values and slot flags, and (sinks) the sink
        keys, values and per-row document token counts."""
        tensors = [*self.states, *self.window_keys, *self.window_values, self.window_valid, *self.sink_keys,
                   *self.sink_values, self.doc_tokens]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def advance(
        self,
        attention_mask: torch.Tensor | None,
        next_positions: torch.Tensor | None = None,
        num_tokens: int | None = None,
        batch_size: int | None = None,
        device: torch.device | None = None,
    ) -> None:
        """Account for one forward (called once, after all layers). attention_mask: [B, T], or None when all
        `num_tokens` tokens of the `batch_size` rows are real. next_positions: [B], the position after each row's
        last real token when the forward had position_ids (a packed row continues its last document)."""
        if attention_mask is not None:
            num_tokens = attention_mask.shape[-1]
            real = attention_mask.sum(dim=-1).to(torch.long)  # [B]
        elif self.seen_tokens is not None:
            real = num_tokens
        else:
            real = torch.full((batch_size,), num_tokens, dtype=torch.long, device=device)
        seen = real if self.seen_tokens is None else self.seen_tokens + real
        if next_positions is not None:
            seen = next_positions if attention_mask is None else torch.where(real > 0, next_positions, seen)
        self.seen_tokens = seen
        self._length += num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # a recurrent state has no maximum length

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens is not None

    @property
    def batch_size(self) -> int:
        return 0 if self.seen_tokens is None else self.seen_tokens.shape[0]

    def _map_batch(self, fn) -> None:
        self.states = [None if s is None else fn(s) for s in self.states]
        self.window_keys = [None if s is None else fn(s) for s in self.window_keys]
        self.window_values = [None if s is None else fn(s) for s in self.window_values]
        self.sink_keys = [None if s is None else fn(s) for s in self.sink_keys]
        self.sink_values = [None if s is None else fn(s) for s in self.sink_values]
        if self.window_valid is not None:
            self.window_valid = fn(self.window_valid)
        if self.doc_tokens is not None:
            self.doc_tokens = fn(self.doc_tokens)
        if self.seen_tokens is not None:
            self.seen_tokens = fn(self.seen_tokens)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the states of the selected beams."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def reset(self) -> None:
        self.states = [None] * len(self.states)
        self.window_keys = [None] * len(self.states)
        self.window_values = [None] * len(self.states)
        self.window_valid = None
        self.sink_keys = [None] * len(self.states)
        self.sink_values = [None] * len(self.states)
        self.doc_tokens = None
        self.seen_tokens = None
        self._length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a RetNet state cannot be cropped: it keeps no per-token history (assisted decoding is unsupported)")


# ----------------------------------------------------------------------------------------------------------------
# Retention: three equivalent forms. All tensors fp32.
#   q, k: [B, H, T, d_k] (k already masked and scaled), v: [B, H, T, d_v] (masked)
#   log_decay: [H] (log gamma_h < 0); time: [B, T] effective time c_n; state: [B, H, d_k, d_v] or None
# ----------------------------------------------------------------------------------------------------------------


def retnet_log_decays(num_heads: int) -> torch.Tensor:
    """log gamma_h = log(1 - 2^(-5-h)), h = 0..H-1: [H] fp32.

    In float64 with log1p: in fp32, 1 - 2^(-5-h) rounds to 1 (no decay at all) from h = 20 on.
    """
    return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(num_heads, dtype=torch.float64))).float()


def fp32_log_decays(num_heads: int) -> torch.Tensor:
    """log(1 - 2^(-5-h)) evaluated in fp32 (`fp32_decays=True`), as torchscale computes its decay buffer: heads
    h >= 20 get log 1 = 0, i.e. no decay. Only for exact parity with checkpoints trained that way."""
    return torch.log(1 - 2 ** (-5 - torch.arange(num_heads, dtype=torch.float)))


def _decay_matrix(time: torch.Tensor, log_decay: torch.Tensor, same: torch.Tensor | None = None) -> torch.Tensor:
    """D[..., n, m] = gamma^(c_n - c_m) for m <= n (and, given `same` [B, *, T, T], m and n in one document), else 0.
    time: [B, *, T] -> [B, H, *, T, T]."""
    t = time.shape[-1]
    diff = time.unsqueeze(-1) - time.unsqueeze(-2)  # [B, *, T, T]
    keep = torch.ones(t, t, dtype=torch.bool, device=time.device).tril()
    if same is not None:
        keep = keep & same
        keep = keep.unsqueeze(1)  # [B, 1, *, T, T]
    exponent = diff.unsqueeze(1) * log_decay.view(1, -1, *([1] * (diff.dim() - 1)))  # [B, H, *, T, T]
    return exponent.masked_fill(~keep, float("-inf")).exp()


def _decay_pow(exponent_time: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """gamma_h^x for x: [B, *] -> [B, H, *]."""
    x = exponent_time.unsqueeze(1)
    return (x * log_decay.view(1, -1, *([1] * (x.dim() - 2)))).exp()


# Packed rows. `segments` [B, T] int64 counts the documents started so far in this call (0: the document the incoming
# state belongs to). The decay between m <= n is zero unless segments[m] == segments[n]: a document start kills the
# state that enters it, in every mode. None (the hot path) means one document per row.


def retention_parallel(q, k, v, log_decay, time, state=None, segments=None):
    """O(T^2): (Q K^T * D) V plus the decayed contribution of an initial state."""
    same = None if segments is None else segments.unsqueeze(-1) == segments.unsqueeze(-2)  # [B, T, T]
    decay = _decay_matrix(time, log_decay, same)  # [B, H, T, T]
    out = (q @ k.transpose(-1, -2) * decay) @ v  # [B, H, T, d_v]
    last = time[:, -1:]  # [B, 1]
    to_end = _decay_pow(last - time, log_decay)  # [B, H, T]
    if segments is not None:  # only the last document reaches the final state
        to_end = to_end * (segments == segments[:, -1:]).unsqueeze(1)
    final = torch.einsum("bhtk,bhtv->bhkv", k * to_end.unsqueeze(-1), v)
    if state is not None:
        from_state = _decay_pow(time, log_decay)  # [B, H, T]
        carry = _decay_pow(last, log_decay)  # [B, H, 1]
        if segments is not None:
            from_state = from_state * (segments == 0).unsqueeze(1)
            carry = carry * (segments[:, -1:] == 0).unsqueeze(1)
        out = out + from_state.unsqueeze(-1) * (q @ state)
        final = final + carry.unsqueeze(-1) * state
    return out, final


def retention_recurrent(q, k, v, log_decay, time, state=None, segments=None):
    """O(1) per token: S_n = gamma^(m_n) S_{n-1} + k_n^T v_n, o_n = q_n S_n (S_{n-1} dropped at a document start)."""
    b, h, t, dk = q.shape
    if state is None:
        state = q.new_zeros(b, h, dk, v.shape[-1])
    step = torch.diff(time, dim=-1, prepend=torch.zeros_like(time[:, :1]))  # [B, T], 1 for real tokens, 0 for padding
    step_decay = _decay_pow(step, log_decay)  # [B, H, T]
    if segments is not None:
        starts = torch.diff(segments, dim=-1, prepend=torch.zeros_like(segments[:, :1])) > 0  # [B, T]
        step_decay = step_decay.masked_fill(starts.unsqueeze(1), 0.0)
    outs = []
    for i in range(t):
        state = step_decay[:, :, i, None, None] * state + k[:, :, i, :, None] * v[:, :, i, None, :]
        outs.append(q[:, :, i, None, :] @ state)  # [B, H, 1, d_v]
    return torch.cat(outs, dim=2), state


def retention_chunkwise(q, k, v, log_decay, time, state=None, chunk_size: int = 128, segments=None):
    """O(T): parallel inside chunks of `chunk_size`, a recurrence over per-chunk states across them."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    c = min(chunk_size, t)
    pad = (-t) % c
    if pad:  # padded tail: zero q/k/v and constant time (and document), so it changes nothing
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        time = torch.cat([time, time[:, -1:].expand(b, pad)], dim=-1)
        if segments is not None:
            segments = torch.cat([segments, segments[:, -1:].expand(b, pad)], dim=-1)
    n = (t + pad) // c
    q, k, v = (x.reshape(b, h, n, c, -1) for x in (q, k, v))  # [B, H, N, C, d]
    time = time.reshape(b, n, c)  # [B, N, C]
    chunk_end = time[:, :, -1]  # [B, N]
    chunk_start = torch.cat([torch.zeros_like(chunk_end[:, :1]), chunk_end[:, :-1]], dim=1)  # [B, N]
    same = None
    if segments is not None:
        seg = segments.reshape(b, n, c)  # [B, N, C]
        seg_end = seg[:, :, -1]  # [B, N]: the document a chunk's final state belongs to
        seg_start = torch.cat([torch.zeros_like(seg_end[:, :1]), seg_end[:, :-1]], dim=1)  # [B, N]: entering state's
        same = seg.unsqueeze(-1) == seg.unsqueeze(-2)  # [B, N, C, C]

    inner = (q @ k.transpose(-1, -2) * _decay_matrix(time, log_decay, same)) @ v  # [B, H, N, C, d_v]
    to_end = _decay_pow(chunk_end.unsqueeze(-1) - time, log_decay)  # [B, H, N, C]
    chunk_decay = _decay_pow(chunk_end - chunk_start, log_decay)  # [B, H, N]
    from_start = _decay_pow(time - chunk_start.unsqueeze(-1), log_decay)  # [B, H, N, C]
    if segments is not None:
        to_end = to_end * (seg == seg_end.unsqueeze(-1)).unsqueeze(1)  # tokens before a reset miss the chunk's state
        chunk_decay = chunk_decay * (seg_end == seg_start).unsqueeze(1)  # a reset in the chunk kills the carried state
        from_start = from_start * (seg == seg_start.unsqueeze(-1)).unsqueeze(1)  # ... and hides it from later tokens
    chunk_kv = torch.einsum("bhnck,bhncv->bhnkv", k * to_end.unsqueeze(-1), v)  # [B, H, N, d_k, d_v]

    s = q.new_zeros(b, h, dk, dv) if state is None else state
    before = []  # state entering each chunk
    for i in range(n):
        before.append(s)
        s = chunk_decay[:, :, i, None, None] * s + chunk_kv[:, :, i]
    before = torch.stack(before, dim=2)  # [B, H, N, d_k, d_v]
    out = inner + from_start.unsqueeze(-1) * (q @ before)
    return out.reshape(b, h, n * c, dv)[:, :, :t], s


def document_starts(position_ids: torch.Tensor, mask: torch.Tensor, has_state: bool) -> torch.Tensor:
    """[B, T] bool: real tokens that start a new document of a packed row, where position_ids restart (0, or not
    above the previous token's). A start before any real token of the call changes nothing (the state is still
    empty) and is left out unless a state comes in, so generate()'s left-padded position ids find no start."""
    starts = torch.cat([position_ids[:, :1] == 0, position_ids[:, 1:] <= position_ids[:, :-1]], dim=-1)
    starts = starts | (position_ids == 0)
    starts = starts & mask.bool()
    if not has_state:
        starts = starts & ((mask.cumsum(-1) - mask) > 0)  # some real token comes before
    return starts


def next_positions(position_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B]: one past the position of each row's last real token (what a cache continues from)."""
    if mask is None:
        return position_ids[:, -1] + 1
    last = (mask * torch.arange(1, mask.shape[-1] + 1, device=mask.device)).argmax(-1, keepdim=True)  # [B, 1]
    return position_ids.gather(1, last).squeeze(1) + 1


def mask_document_starts(labels: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """labels [B, T] with -100 at the first token of every document after the first in each packed row, so the loss
    never predicts a document's first token from the one before it (DataCollatorWithFlattening's convention)."""
    b, t = labels.shape
    position_ids = position_ids[..., -t:].to(labels.device).expand(b, t)
    mask = torch.ones_like(labels) if attention_mask is None else attention_mask[:, -t:].to(labels.device)
    return labels.masked_fill(document_starts(position_ids, mask, has_state=False), -100)


def retention_score_scale(qz: torch.Tensor, positions: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """max(sqrt(R_n), |q_n . z_n|): the retention score normalisation of the paper (and torchscale's parallel form)
    as one divisor per row. R_n = sum_m D_nm = (1 - gamma^N) / (1 - gamma) over the N = positions + 1 real tokens
    read; q_n . z_n = sum_m q_n k_m D_nm. qz: [B, H, T, 1], positions: [B, T] -> [B, H, T, 1]."""
    count = positions.float().unsqueeze(1) + 1  # [B, 1, T]
    log_decay = log_decay.view(1, -1, 1)
    no_decay = log_decay == 0  # gamma = 1 (fp32_decays, heads >= 20): R_n = N
    rows = torch.expm1(count * log_decay) / torch.expm1(log_decay).masked_fill(no_decay, 1.0)  # [B, H, T]
    rows = torch.where(no_decay, count, rows)
    return torch.maximum(rows.sqrt().unsqueeze(-1), qz.abs())


# ----------------------------------------------------------------------------------------------------------------
# Hybrid token mixer (`attention_window` = W > 0): exact softmax attention over the last W real tokens plus
# retention over the tokens that have left that window. Both run on an "extended row": the W window slots carried
# in the cache, then this call's T tokens, stably reordered so invalid slots and padding come first. Real tokens are
# then contiguous, so "the last W real tokens" is an index band and "has left the window" an index shift by W,
# whatever the padding. All tensors fp32.
#
# Attention sinks (`attention_sinks` = S > 0): the first S real tokens of each document stay visible to every later
# query of it. A sink within the last W tokens of a query is attended through the band (once); one further back is
# attended through S extra key slots per query, in the same softmax. Sinks that have left the window are carried in
# S sink slots (slot s: the document's token s), and sinks never enter the retention state (their keys are zeroed
# on the way in, their time still counts, so the decay between other tokens is unchanged).
# ----------------------------------------------------------------------------------------------------------------


class WindowLayout:
    """Where the tokens of one forward sit in the compacted extended row; the same for every layer of the forward.

    valid: [B, W + T] bool, real tokens (cached window slots, then this call's tokens), compacted (invalid first).
    time: [B, W + T] fp32 real tokens counted from the start of the extended row (0 on the leading invalid entries).
    segments: [B, W + T] int64 documents started so far in a packed row (0: the carried window's and state's
    document; 0 on the invalid entries too, so the row stays non-decreasing), or None for one document per row.
    order / restore: [B, W + T] int64 gather indices extended -> compacted and back, or None when already compact
    (decoding and unpadded training: no reordering at all).

    With S = `sinks` > 0 (see `_place_sinks`), also: sink_index [B, S] (one document per row) or [B, T, S] (packed
    rows): where each query's sink s sits in [S carried sink slots | W + T compacted entries]; sink_allowed
    [B, T, S]: sink s is a key of query n in addition to its band (s <= rank(n) - W: it exists and is not in the
    band already); any_sink: whether any query has such a key (else the sink part is skipped); retention_keep
    [B, T]: the entries that may leave the window and are not sinks (the others enter the retention state as zero);
    carry_index / carry_valid [B, S]: the sink slots carried on (the last document's sinks that have left the
    window); next_doc_tokens [B]: that document's real tokens read so far.
    """

    def __init__(self, mask: torch.Tensor, window_valid: torch.Tensor | None, window: int,
                 segments: torch.Tensor | None = None, sinks: int = 0, doc_tokens: torch.Tensor | None = None):
        b = mask.shape[0]
        if window_valid is None:  # nothing carried over: W empty slots
            window_valid = torch.zeros(b, window, dtype=torch.bool, device=mask.device)
        carried = window_valid.to(mask.device).sum(-1)  # [B] window slots holding a token of the carried document
        valid = torch.cat([window_valid.to(mask.device), mask.bool()], dim=1)  # [B, W + T]
        self.window = window
        self.order = self.restore = None
        if not bool((valid[:, 1:] >= valid[:, :-1]).all()):  # an invalid entry after a real one: compact the row
            self.order = torch.sort(valid.to(torch.uint8), dim=1, stable=True).indices  # invalid first, order kept
            self.restore = torch.argsort(self.order, dim=1)
            valid = valid.gather(1, self.order)
        self.valid = valid
        self.time = valid.float().cumsum(1)
        self.segments = None
        if segments is not None:
            segments = torch.cat([segments.new_zeros(b, window), segments.to(mask.device)], dim=1)  # [B, W + T]
            if self.order is not None:
                segments = segments.gather(1, self.order)
            self.segments = segments.masked_fill(~valid, 0)
        self.sinks = sinks
        if sinks:
            self._place_sinks(carried, carried if doc_tokens is None else doc_tokens.to(mask.device).long())

    def _place_sinks(self, carried: torch.Tensor, doc_tokens: torch.Tensor) -> None:
        """Rank of every compacted entry in its document (real tokens before it), and from it where the sinks are.
        carried: [B] real window slots carried over; doc_tokens: [B] real tokens of the carried document read before
        this call. Real entries are contiguous and ordered by document, so document g's rank-r token sits at
        compacted index (invalid entries) + (real entries of earlier documents) + r - base_g, where base_g is the
        rank of its first entry here: doc_tokens - carried for the carried document (its older tokens are in the
        retention state, its sinks among them in the sink slots), 0 for a document that starts in this call."""
        valid, w, s = self.valid, self.window, self.sinks
        b, length = valid.shape
        t = length - w
        real = valid.long()
        count = real.cumsum(1)  # [B, W + T] real entries up to and including each
        invalid = length - count[:, -1]  # [B]
        base0 = doc_tokens - carried  # [B] rank of the carried document's first entry in the extended row
        if self.segments is None:  # one document: every query shares its sinks
            rank = count - 1 + base0[:, None]
            query_base, query_first = base0[:, None], invalid[:, None]  # [B, 1]
            last_base, last_first, last_count = base0, invalid, count[:, -1]
        else:
            seg = self.segments
            per_seg = torch.zeros(b, int(seg.max()) + 1, dtype=torch.long, device=valid.device).scatter_add_(1, seg, real)
            prior = per_seg.cumsum(1) - per_seg  # [B, G] real entries of earlier documents
            base = torch.zeros_like(per_seg)
            base[:, 0] = base0
            rank = count - 1 - prior.gather(1, seg) + base.gather(1, seg)
            query_seg = seg[:, w:]
            query_base, query_first = base.gather(1, query_seg), invalid[:, None] + prior.gather(1, query_seg)  # [B, T]
            last = seg[:, -1:]
            last_base, last_first = base.gather(1, last).squeeze(1), invalid + prior.gather(1, last).squeeze(1)
            last_count = per_seg.gather(1, last).squeeze(1)
        slots = torch.arange(s, device=valid.device)

        def where_sinks(doc_base, doc_first):  # [...] -> [..., S] index into [S sink slots | W + T entries]
            doc_base, doc_first = doc_base.unsqueeze(-1), doc_first.unsqueeze(-1)
            index = torch.where(slots < doc_base, slots, s + doc_first + slots - doc_base)
            return index.clamp(0, s + length - 1)  # (entries of absent sinks are never read)

        query_rank = rank[:, w:]  # [B, T]
        self.sink_allowed = valid[:, w:, None] & (slots <= query_rank.unsqueeze(-1) - w)  # [B, T, S]
        self.any_sink = bool(self.sink_allowed.any())
        index = where_sinks(query_base, query_first)  # [B, 1 | T, S]
        self.sink_index = index.squeeze(1) if self.segments is None else index
        self.retention_keep = ~(valid[:, :t] & (rank[:, :t] < s))  # [B, T]
        self.next_doc_tokens = last_base + last_count  # [B]
        self.carry_index = where_sinks(last_base, last_first)  # [B, S]
        self.carry_valid = slots < (self.next_doc_tokens - w).unsqueeze(-1)  # [B, S]: sink s has left the window

    @property
    def next_window_valid(self) -> torch.Tensor:
        """[B, W]: which of the last W compacted entries (the window carried to the next call) are real tokens of
        the row's last document (a packed row's earlier documents are never read again)."""
        valid = self.valid[:, -self.window :]
        if self.segments is not None:
            valid = valid & (self.segments[:, -self.window :] == self.segments[:, -1:])
        return valid

    def compact(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W + T, d] in extended order -> compacted order."""
        if self.order is None:
            return x
        return x.gather(2, self.order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))

    def restore_new(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, d] computed at compacted positions W.. -> this call's token order (padding gets zeros)."""
        if self.restore is None:
            return x
        full = F.pad(x, (0, 0, self.window, 0))  # [B, H, W + T, d]
        where = self.restore[:, self.window :]  # [B, T] compacted position of each of this call's tokens
        return full.gather(2, where[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


class WindowStep:
    """What every hybrid layer needs for one decoded token (T == 1, a carried window, no packed rows), built once
    per forward so the layers do no bookkeeping: the window shifts by one slot, its oldest slot leaves (into a sink
    slot while it is among the document's first S tokens, else into the retention state).

    real: [B, 1, 1, 1] bool, the new token is not padding (a padded step changes nothing); leaving: [B, 1, 1, 1]
    fp32, 1 where a real token leaves the window (the retention state decays one step); retained: the same, less
    the tokens that become sinks (they add nothing to the state); sink_write: [B, 1, S, 1] bool, the sink slot the
    leaving token fills; attend: [B, 1, 1, S + W] bool, the keys of the new query (sinks that left the window, then
    the window after the shift, the new token last); next_window_valid: [B, W]; next_doc_tokens: [B] or None.
    """

    def __init__(self, window_valid: torch.Tensor, keep: torch.Tensor | None, window: int, sinks: int = 0,
                 doc_tokens: torch.Tensor | None = None):
        b = window_valid.shape[0]
        real = torch.ones(b, dtype=torch.bool, device=window_valid.device) if keep is None else keep.view(b).bool()
        self.window, self.sinks = window, sinks
        self.real = None if keep is None else real.view(b, 1, 1, 1)
        leaving = window_valid[:, 0] & real  # [B]
        shifted = torch.cat([window_valid[:, 1:], real[:, None]], dim=1)  # [B, W]
        self.next_window_valid = torch.where(real[:, None], shifted, window_valid)
        shifted[:, -1] = True  # a padded query still has a key (its output is never used): no empty softmax
        retained = leaving
        self.sink_write = self.next_doc_tokens = None
        if sinks:
            slots = torch.arange(sinks, device=window_valid.device)
            rank = doc_tokens.to(window_valid.device).long() - window  # [B] rank of the leaving token in its document
            self.sink_write = (leaving[:, None] & (slots == rank[:, None])).view(b, 1, sinks, 1)
            retained = leaving & (rank >= sinks)
            shifted = torch.cat([slots <= rank[:, None], shifted], dim=1)  # [B, S + W]
            self.next_doc_tokens = doc_tokens.to(window_valid.device).long() + real.long()
        self.leaving = leaving.view(b, 1, 1, 1).float()
        self.retained = retained.view(b, 1, 1, 1).float()
        self.attend = shifted.view(b, 1, 1, -1)


def _softmax_attend(scores: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor, sinks=None) -> torch.Tensor:
    """softmax over the allowed keys of each query row, times v; a row with no allowed key (padding) gives 0.
    scores: [..., Q, K], allowed: bool broadcastable to it, v: [..., K, d_v] -> [..., Q, d_v].
    sinks: None, or (scores [..., Q, S] with -inf where not a key, values [..., S, d_v] shared by the Q queries or
    [..., Q, S, d_v] per query): more keys in the same softmax (the attention sinks outside the band)."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    if sinks is not None:
        top = torch.maximum(top, sinks[0].amax(-1, keepdim=True))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(scores - top)  # 0 for the keys left out
    total = weights.sum(-1, keepdim=True)
    out = weights @ v
    if sinks is not None:
        sink_scores, sink_values = sinks
        sink_weights = torch.exp(sink_scores - top)
        total = total + sink_weights.sum(-1, keepdim=True)
        if sink_values.dim() == sink_weights.dim():  # shared by the queries
            out = out + sink_weights @ sink_values
        else:  # one set per query
            out = out + (sink_weights.unsqueeze(-2) @ sink_values).squeeze(-2)
    return out / torch.where(total > 0, total, torch.ones_like(total))


def window_attention_parallel(q, k, v, valid, window: int, segments=None, sinks=None):
    """q: [B, H, T, d_k] at compacted positions W..W+T-1; k, v: [B, H, W + T, d]; valid (and segments, if any):
    [B, W + T]; sinks: None or (scores [B, H, T, S], values [B, H, S, d_v] | [B, H, T, S, d_v]). O(T (W + T))."""
    t, length = q.shape[2], k.shape[2]
    diff = torch.arange(length - t, length, device=q.device)[:, None] - torch.arange(length, device=q.device)  # [T, L]
    allowed = (diff >= 0) & (diff < window) & valid[:, None, None, :]  # [B, 1, T, W + T]
    if segments is not None:  # a packed row's window never reaches into the previous document
        allowed = allowed & (segments[:, None, -t:, None] == segments[:, None, None, :])
    return _softmax_attend(q @ k.transpose(-1, -2), allowed, v, sinks)


def window_attention_chunkwise(q, k, v, valid, window: int, chunk_size: int, segments=None, sinks=None):
    """Blocks of C queries, each against the W + C - 1 keys its band can reach: O(T (W + C)) time and memory."""
    b, h, t, dk = q.shape
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t
    span = window + c - 1
    # query block i (compacted positions W + iC ..) reaches keys from position iC + 1 on: drop key 0, pad the tail
    keys = F.pad(k[:, :, 1:], (0, 0, 0, pad)).unfold(2, span, c).transpose(-1, -2)  # [B, H, N, span, d_k]
    values = F.pad(v[:, :, 1:], (0, 0, 0, pad)).unfold(2, span, c).transpose(-1, -2)  # [B, H, N, span, d_v]
    ok = torch.cat([valid[:, 1:], valid.new_zeros(b, pad)], dim=1).unfold(1, span, c)  # [B, N, span]
    queries = F.pad(q, (0, 0, 0, pad)).view(b, h, n, c, dk)  # [B, H, N, C, d_k]
    a = torch.arange(c, device=q.device)[:, None]
    j = torch.arange(span, device=q.device)
    band = (j >= a) & (j < a + window)  # [C, span]: key j of a block is within W of its query a
    allowed = band & ok[:, None, :, None, :]  # [B, 1, N, C, span]
    if segments is not None:
        key_seg = torch.cat([segments[:, 1:], segments[:, -1:].expand(b, pad)], dim=1).unfold(1, span, c)  # [B, N, span]
        query_seg = torch.cat([segments[:, -t:], segments[:, -1:].expand(b, pad)], dim=1).view(b, n, c)  # [B, N, C]
        allowed = allowed & (query_seg[:, None, :, :, None] == key_seg[:, None, :, None, :])
    if sinks is not None:  # the queries' sink scores (and per-query values) in the same blocks
        sink_scores, sink_values = sinks
        sink_scores = F.pad(sink_scores, (0, 0, 0, pad)).view(b, h, n, c, -1)  # [B, H, N, C, S]
        if sink_values.dim() == 4:  # [B, H, S, d_v], shared by every query of the row
            sink_values = sink_values.unsqueeze(2)  # [B, H, 1, S, d_v]
        else:  # [B, H, T, S, d_v]
            sink_values = F.pad(sink_values, (0, 0, 0, 0, 0, pad)).view(b, h, n, c, *sink_values.shape[-2:])
        sinks = (sink_scores, sink_values)
    out = _softmax_attend(queries @ keys.transpose(-1, -2), allowed, values, sinks)  # [B, H, N, C, d_v]
    return out.reshape(b, h, n * c, -1)[:, :, :t]


def window_attention_recurrent(q, k, v, valid, window: int, segments=None, sinks=None):
    """One query at a time against the W slots ending at it: O(W) per token (decoding); O(W + S) with sinks."""
    t, length = q.shape[2], k.shape[2]
    outs = []
    for i in range(t):
        end = length - t + i + 1
        band = slice(end - window, end)
        allowed = valid[:, None, None, band]  # [B, 1, 1, W]
        if segments is not None:
            allowed = allowed & (segments[:, None, None, band] == segments[:, None, None, end - 1 : end])
        extra = None
        if sinks is not None:
            extra = (sinks[0][:, :, i : i + 1], sinks[1] if sinks[1].dim() == 4 else sinks[1][:, :, i : i + 1])
        outs.append(
            _softmax_attend(q[:, :, i : i + 1] @ k[:, :, band].transpose(-1, -2), allowed, v[:, :, band], extra)
        )
    return torch.cat(outs, dim=2)


def _gather_entries(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """source: [B, H, L, d], index: [B, *idx] into L -> [B, H, *idx, d]."""
    b, h, _, d = source.shape
    flat = index.reshape(b, 1, -1, 1).expand(-1, h, -1, d)
    return source.gather(2, flat).view(b, h, *index.shape[1:], d)


def hybrid_window_retention(q, k, v, log_decay, layout: WindowLayout, state=None, window_keys=None,
                            window_values=None, sink_keys=None, sink_values=None, mode: str = "chunkwise",
                            chunk_size: int = 128):
    """Softmax attention over the last W real tokens (and the S attention sinks, if any) and retention over the
    older ones, kept apart.

    q: [B, H, T, d_k]; k (rotated, scaled by d_k^-1/2, masked), v (masked): [B, H, T, d_k | d_v]; log_decay: [H];
    state: [B, H, d_k, d_v] retention state of the tokens that have left the window, decayed to the newest of them,
    or None; window_keys / window_values: [B, H, W, d_k | d_v] the window carried over (layout says which slots are
    real), or None; sink_keys / sink_values: [B, H, S, d_k | d_v] the sink slots carried over (`layout.sinks` > 0),
    or None. Returns (window_out, retention_out [B, H, T, d_v], state, window_keys, window_values), with
    (sink_keys, sink_values) appended when the layout has sinks.

    Query n (compacted position W + j) reads the retention state after position j, the newest token W real tokens
    before it, decayed by gamma^(c_n - c_j): ordinary retention (any mode) with the queries shifted back by W.
    """
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    w = layout.window
    if window_keys is None:
        window_keys, window_values = k.new_zeros(b, h, w, dk), v.new_zeros(b, h, w, dv)
    keys = layout.compact(torch.cat([window_keys, k], dim=2))  # [B, H, W + T, d_k]
    values = layout.compact(torch.cat([window_values, v], dim=2))  # [B, H, W + T, d_v]
    queries = layout.compact(torch.cat([q.new_zeros(b, h, w, dk), q], dim=2))[:, :, w:]  # [B, H, T, d_k]
    seg = layout.segments  # [B, W + T] or None
    sinks = None
    if layout.sinks:
        if sink_keys is None:
            sink_keys, sink_values = k.new_zeros(b, h, layout.sinks, dk), v.new_zeros(b, h, layout.sinks, dv)
        source_keys = torch.cat([sink_keys, keys], dim=2)  # [B, H, S + W + T, d_k]: sink slots, then the entries
        source_values = torch.cat([sink_values, values], dim=2)
        if layout.any_sink:
            sink_k = _gather_entries(source_keys, layout.sink_index)  # [B, H, S, d_k] or [B, H, T, S, d_k]
            sink_v = _gather_entries(source_values, layout.sink_index)
            if sink_k.dim() == 4:
                sink_scores = queries @ sink_k.transpose(-1, -2)  # [B, H, T, S]
            else:
                sink_scores = (queries.unsqueeze(-2) @ sink_k.transpose(-1, -2)).squeeze(-2)
            sinks = (sink_scores.masked_fill(~layout.sink_allowed[:, None], float("-inf")), sink_v)
    if mode == "parallel":
        window_out = window_attention_parallel(queries, keys, values, layout.valid, w, seg, sinks)
    elif mode == "chunkwise":
        window_out = window_attention_chunkwise(queries, keys, values, layout.valid, w, chunk_size, seg, sinks)
    else:
        window_out = window_attention_recurrent(queries, keys, values, layout.valid, w, seg, sinks)
    time = layout.time  # [B, W + T]
    lag = _decay_pow(time[:, w:] - time[:, :t], log_decay)  # [B, H, T]
    if seg is not None:  # the state after position j belongs to j's document: a query in a later one reads nothing
        lag = lag * (seg[:, w:] == seg[:, :t]).unsqueeze(1)
    shifted = queries * lag.unsqueeze(-1)  # [B, H, T, d_k]
    old_keys = keys[:, :, :t]  # the entries that can leave the window; sinks among them add nothing to the state
    if layout.sinks:
        old_keys = old_keys * layout.retention_keep[:, None, :, None]
    old = (old_keys, values[:, :, :t], log_decay, time[:, :t], state)
    old_seg = None if seg is None else seg[:, :t]
    if mode == "parallel":
        retention_out, state = retention_parallel(shifted, *old, segments=old_seg)
    elif mode == "chunkwise":
        retention_out, state = retention_chunkwise(shifted, *old, chunk_size=chunk_size, segments=old_seg)
    else:
        retention_out, state = retention_recurrent(shifted, *old, segments=old_seg)
    keys, values = keys[:, :, t:], values[:, :, t:]  # the window carried on
    if seg is not None:  # only the row's last document is carried on: its state, its window (others zeroed)
        state = state * (seg[:, t - 1] == seg[:, -1]).view(-1, 1, 1, 1)
        carried = layout.next_window_valid[:, None, :, None]  # [B, 1, W, 1]
        keys, values = keys * carried, values * carried
    out = (layout.restore_new(window_out), layout.restore_new(retention_out), state, keys, values)
    if layout.sinks:  # the last document's sinks that have left the window, slot s = its token s
        carried = layout.carry_valid[:, None, :, None]  # [B, 1, S, 1]
        out += (_gather_entries(source_keys, layout.carry_index) * carried,
                _gather_entries(source_values, layout.carry_index) * carried)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------


class RetNetRMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32; `groups` > 1 normalises each head's slice on its own."""

    def __init__(self, dim: int, eps: float = 1e-6, groups: int = 1, affine: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.eps = eps
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        weight = None if self.weight is None else self.weight.float()
        if self.groups == 1:
            return F.rms_norm(x, x.shape[-1:], weight, self.eps).to(dtype)
        x = F.rms_norm(x.unflatten(-1, (self.groups, -1)), (x.shape[-1] // self.groups,), None, self.eps).flatten(-2)
        return (x if weight is None else x * weight).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """The interleaved rotary style: pairs (x_0, x_1), (x_2, x_3), ... turn together."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotary_linspace_inv_freq(config: RetNetConfig) -> torch.Tensor:
    """theta^-linspace(0, 1, d_k/2): the `rotary_spacing="linspace"` frequencies, in fp32 the way torchscale
    computes its `angle` buffer, so converted checkpoints rotate by bit-identical angles."""
    return 1.0 / (config.rope_theta ** torch.linspace(0, 1, config.head_dim // 2))


def rotary_inv_freq(config: RetNetConfig) -> torch.Tensor:
    """Rotary frequencies theta^(-2i/d) of one head, with Llama-3's scaling when `config.rotary_scaling` asks for it:
    long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly."""
    if getattr(config, "rotary_spacing", "arange") == "linspace":
        return rotary_linspace_inv_freq(config)
    dim = config.head_dim
    scaling = getattr(config, "rotary_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * torch.pi / inv_freq
    smooth = ((context / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0: long wavelength, 1: short
    inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq.float()


def retention_log_decays(config: RetNetConfig, layer_idx: int, default: torch.Tensor) -> torch.Tensor:
    """log gamma of each k/v head of one layer: `config.retention_decays` when given, else the first
    `num_kv_heads` of RetNet's fixed defaults `default` (heads in a k/v group share one state, hence one decay)."""
    decays = getattr(config, "retention_decays", None)
    if decays is None:
        return default[: getattr(config, "num_kv_heads", None) or config.num_heads]
    row = decays[layer_idx] if isinstance(decays[0], (list, tuple)) else decays
    return torch.log(torch.tensor(row, dtype=torch.float64)).float()


class Fp32BuffersModule(nn.Module):
    """A module whose buffers named in `fp32_buffers` stay fp32 through dtype casts. Module.to(bf16) casts every
    floating buffer, and bf16 (8 significant bits) would round the log decays and the rotary frequencies (0.1 ->
    0.10010, three quarters of a radian off by position 8000); a cast keeps the fp32 values and follows only the
    device. Everything else applies as usual: device moves, and to_empty from the meta device (a meta tensor has no
    values to keep; `_init_weights` fills them, e.g. through `init_weights()`)."""

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        before = {name: getattr(self, name) for name in self.fp32_buffers}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(device=new.device))
        return self


class RetNetRotaryEmbedding(Fp32BuffersModule):
    """Rotary relative position of queries and keys; with the per-head decay this is RetNet's xPos-style encoding."""

    fp32_buffers = ("inv_freq",)

    def __init__(self, config: RetNetConfig):
        super().__init__()
        self.register_buffer("inv_freq", rotary_inv_freq(config), persistent=False)
        self.interleaved = config.rotary_style == "interleaved"
        self._rotate_basis: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [B, T] -> cos, sin: [B, 1, T, d_k] fp32."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()  # [B, T, d_k / 2]
        if self.interleaved:  # frequency i for coordinates 2i and 2i + 1
            emb = freqs.repeat_interleave(2, dim=-1).unsqueeze(1)
            return emb.cos(), emb.sin()
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return emb.cos(), emb.sin()

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """positions: [B, 1] -> R: [B, 1, d_k, d_k] fp32 with x @ R == x * cos + rotate(x) * sin, so a decoding step
        rotates q and k with one matmul each instead of six elementwise ops (rotate is linear: rotate(x) = x @ P)."""
        cos, sin = self(positions)  # [B, 1, 1, d_k]
        d = cos.shape[-1]
        basis = self._rotate_basis.get(cos.device)
        if basis is None or basis.shape[-1] != d:  # P: row i is rotate(e_i); built once per device, not a buffer
            eye = torch.eye(d, device=cos.device)
            basis = self._rotate_basis[cos.device] = rotate_every_two(eye) if self.interleaved else rotate_half(eye)
        return torch.diag_embed(cos.squeeze(2)) + basis * sin  # [B, 1, d_k, d_k]


class RetNetMultiScaleRetention(Fp32BuffersModule):
    """Multi-scale retention: per-head decay, rotary q/k, per-head RMS norm, swish output gate."""

    fp32_buffers = ("log_decay",)

    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = getattr(config, "num_kv_heads", None) or config.num_heads
        self.head_dim = config.head_dim
        value_head_dim = config.value_head_dim or config.head_dim * config.value_factor
        self.value_dim = config.num_heads * value_head_dim
        kv_value_dim = self.num_kv_heads * value_head_dim
        self.chunk_size = config.chunk_size
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_value_dim, bias=False)
        if getattr(config, "use_output_gate", True):
            self.g_proj = nn.Linear(config.hidden_size, self.value_dim, bias=getattr(config, "gate_bias", False))
        else:
            self.g_proj = None
        self.o_proj = nn.Linear(self.value_dim, config.hidden_size, bias=False)
        self.group_norm = RetNetRMSNorm(
            self.value_dim, eps=config.rms_norm_eps, groups=config.num_heads, affine=config.group_norm_affine
        )
        self.rotate = rotate_every_two if config.rotary_style == "interleaved" else rotate_half
        self.score_normalization = config.retention_score_normalization
        # gamma_h = 1 - 2^(-5-h) unless the config gives decays: a buffer so it follows .to(device), kept fp32 by _apply
        # (Fp32BuffersModule), not saved (the config defines it), refilled by _init_weights after to_empty.
        default = fp32_log_decays if config.fp32_decays else retnet_log_decays
        log_decay = retention_log_decays(config, layer_idx, default(config.num_heads))  # [num_kv_heads]
        self.register_buffer("log_decay", log_decay, persistent=False)

    def forward(
        self, hidden_states, cos, sin, mask, time, state=None, mode="chunkwise", positions=None, segments=None
    ):
        """hidden_states: [B, T, d]; cos/sin: [B, 1, T, d_k]; mask, time: [B, T]; state: [B, H_kv, d_k, d_v] fp32
        (d_v + 1 with `retention_score_normalization`); positions: [B, T] absolute positions (that option only);
        segments: [B, T] documents started so far in a packed row, or None. mode="step" is one token (T == 1):
        then cos/sin are the rotations of q and k, mask is [B, 1, 1, 1] fp32 or None (all real), time is unused and
        segments is a [B, 1] bool "a document starts here" (see `_step`)."""
        if mode == "step":
            return self._step(hidden_states, cos, sin, mask, state, positions, segments)
        b, t, _ = hidden_states.shape
        q, k, v, keep = self._project(hidden_states, cos, sin, mask)
        log_decay = self.log_decay.float()
        group = self.num_heads // self.num_kv_heads
        if group > 1:  # every query head of a group reads its k/v head's state: expand, compute, keep one copy
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            log_decay = log_decay.repeat_interleave(group)
            state = None if state is None else state.repeat_interleave(group, dim=1)
        if self.score_normalization:  # a constant value column makes the retention also return q_n . sum_m D_nm k_m
            v = torch.cat([v, keep.expand(b, v.shape[1], t, 1)], dim=-1)
        if mode == "parallel":
            out, state = retention_parallel(q, k, v, log_decay, time, state, segments)
        elif mode == "chunkwise":
            out, state = retention_chunkwise(q, k, v, log_decay, time, state, self.chunk_size, segments)
        else:
            out, state = retention_recurrent(q, k, v, log_decay, time, state, segments)
        if group > 1:
            state = state[:, ::group].contiguous()  # [B, H_kv, d_k, d_v]: group members hold identical states
        if self.score_normalization:
            out = out[..., :-1] / retention_score_scale(out[..., -1:], positions, log_decay)
        out = self.group_norm(out.transpose(1, 2).reshape(b, t, self.value_dim))  # [B, T, H * d_v], fp32
        return self._output(hidden_states, out), state

    def _project(self, hidden_states, cos, sin, mask):
        """q [B, H, T, d_k], k [B, H_kv, T, d_k], v [B, H_kv, T, d_v] fp32, rotated (k scaled by d_k^-1/2), with
        padding zeroed in k and v so it adds nothing to any state; and keep [B, 1, T, 1] fp32."""
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, self.num_heads, -1).transpose(1, 2).float()
        k = self.k_proj(hidden_states).view(b, t, self.num_kv_heads, -1).transpose(1, 2).float()
        v = self.v_proj(hidden_states).view(b, t, self.num_kv_heads, -1).transpose(1, 2).float()
        q = q * cos + self.rotate(q) * sin
        k = (k * cos + self.rotate(k) * sin) * (self.head_dim**-0.5)
        keep = mask[:, None, :, None].float()
        return q, k * keep, v * keep, keep

    def _project_step(self, hidden_states, rot_q, rot_k):
        """One token: q [B, H_kv, g, d_k] (the g query heads of each k/v head together), k [B, H_kv, 1, d_k],
        v [B, H_kv, 1, d_v] fp32; rot_q, rot_k: [B, 1, d_k, d_k] rotations (rot_k with the key scale)."""
        b = hidden_states.shape[0]
        q = self.q_proj(hidden_states).view(b, self.num_kv_heads, -1, self.head_dim).float() @ rot_q
        k = self.k_proj(hidden_states).view(b, self.num_kv_heads, 1, self.head_dim).float() @ rot_k
        v = self.v_proj(hidden_states).view(b, self.num_kv_heads, 1, -1).float()
        return q, k, v

    def _step(self, hidden_states, rot_q, rot_k, keep, state, positions, starts):
        """One token: S = gamma^m S + k^T v, o = q S, written out for T == 1 because decoding is bound by per-op
        overhead: no chunk machinery, no decay matrix, no k/v head expansion (the g query heads that share a k/v
        head read its state through a reshape of q to [B, H_kv, g, d_k]).
        hidden_states: [B, 1, d]; rot_q, rot_k: [B, 1, d_k, d_k] rotations (rot_k with the 1/sqrt(d_k) key scale);
        keep: [B, 1, 1, 1] fp32 (0 for padding) or None (all real); state: [B, H_kv, d_k, d_v] or None;
        starts: [B, 1] bool (a packed document starts here: the state is dropped) or None."""
        b = hidden_states.shape[0]
        q, k, v = self._project_step(hidden_states, rot_q, rot_k)
        log_decay = self.log_decay.view(1, -1, 1, 1)  # [1, H_kv, 1, 1]
        if keep is None:
            decay = log_decay.exp()
        else:  # padding neither adds to nor decays the state
            v = v * keep
            decay = (log_decay * keep).exp()  # [B, H_kv, 1, 1]
        if starts is not None:
            decay = decay * (~starts).view(b, 1, 1, 1)
        if self.score_normalization:
            ones = v.new_ones(b, self.num_kv_heads, 1, 1)
            v = torch.cat([v, ones if keep is None else ones * keep], dim=-1)
        update = k.transpose(-1, -2) * v  # [B, H_kv, d_k, d_v]
        state = update if state is None else torch.addcmul(update, decay, state)
        out = q @ state  # [B, H_kv, g, d_v]
        if self.score_normalization:  # positions [B, 1] broadcast as T = 1, the g query heads of a k/v head as T = g
            out = out[..., :-1] / retention_score_scale(out[..., -1:], positions, self.log_decay)
        return self._output(hidden_states, self.group_norm(out.reshape(b, 1, self.value_dim))), state

    def _output(self, hidden_states, out):
        """Swish gate (if any) and output projection; out: [B, T, H * d_v] fp32 after the group norm."""
        if self.g_proj is None:
            return self.o_proj(out.to(hidden_states.dtype))
        gate = F.silu(self.g_proj(hidden_states))
        return self.o_proj(gate * out.to(gate.dtype))


class RetNetHybridAttention(RetNetMultiScaleRetention):
    """The token mixer with `attention_window` = W > 0 (after LoLCATs' sliding window + linear attention):

        o_n = o_proj( softmax-attention_n(last W real tokens) + gate_n * norm(retention_n(tokens older than that)) )

    The window part is the teacher's attention restricted to W tokens (same q/k/v/o, scale d_k^-1/2, no norm or
    gate), so while T <= W the layer is exactly the attention it was converted from. The retention part is RetNet's
    (per-head norm, optional swish gate) over the tokens that left the window; they enter its state only then.
    The two are added rather than normalised together: retention scores are signed and unnormalised, so there is
    no positive mass to share a softmax denominator with. Same parameters as the pure retention layer.
    With `attention_sinks` = S > 0 the softmax also covers the first S tokens of the document (one softmax over
    the union), and those tokens never enter the retention state."""

    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.window = config.attention_window
        self.sinks = getattr(config, "attention_sinks", 0)

    def forward(self, hidden_states, cos, sin, mask, time, state=None, mode="chunkwise", positions=None,
                segments=None, window: WindowLayout | None = None):
        """As RetNetMultiScaleRetention; state: None or (retention [B, H_kv, d_k, d_v], window keys
        [B, H_kv, W, d_k], window values [B, H_kv, W, d_v]) fp32, with (sink keys [B, H_kv, S, d_k], sink values
        [B, H_kv, S, d_v]) appended when the layer keeps attention sinks; window: the forward's WindowLayout, or
        its WindowStep with mode="step" (one decoded token; cos/sin and mask then as in the pure layer's step)."""
        if mode == "step":
            return self._window_step(hidden_states, cos, sin, state, window)
        b, t, _ = hidden_states.shape
        q, k, v, _ = self._project(hidden_states, cos, sin, mask)
        if window is None:
            if state is not None:
                raise ValueError("a carried hybrid state needs the forward's WindowLayout (call the model, not the layer)")
            window = WindowLayout(mask, None, self.window, segments, self.sinks)
        carried = [None] * (5 if self.sinks else 3) if state is None else list(state)
        log_decay = self.log_decay.float()
        group = self.num_heads // self.num_kv_heads
        if group > 1:  # query heads of a group read their k/v head: expand, compute, keep one copy
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            log_decay = log_decay.repeat_interleave(group)
            carried = [None if x is None else x.repeat_interleave(group, dim=1) for x in carried]
        window_out, retention_out, *state = hybrid_window_retention(
            q, k, v, log_decay, window, *carried, mode=mode, chunk_size=self.chunk_size
        )
        state = tuple(x[:, ::group].contiguous() for x in state)  # [B, H_kv, ...]
        retention_out = self.group_norm(retention_out.transpose(1, 2).reshape(b, t, self.value_dim))  # [B, T, H*d_v]
        if self.g_proj is not None:
            retention_out = F.silu(self.g_proj(hidden_states)).float() * retention_out
        mixed = window_out.transpose(1, 2).reshape(b, t, self.value_dim) + retention_out  # fp32
        return self.o_proj(mixed.to(hidden_states.dtype)), state

    def _window_step(self, hidden_states, rot_q, rot_k, state, step: WindowStep):
        """One decoded token, written out as the pure layer's `_step` is (decoding is bound by per-op overhead):
        the window shifts one slot, the token that leaves it goes into a sink slot or the retention state, and the
        new query reads [sinks | window] in one softmax plus the state decayed by gamma^W (the state holds the
        tokens older than the window, and the newest of them is W real tokens back). The g query heads of a k/v
        head read its window and state through a reshape of q to [B, H_kv, g, d_k]; nothing is expanded.
        hidden_states: [B, 1, d]; rot_q, rot_k: [B, 1, d_k, d_k]; state: as in forward (carried, never None)."""
        b = hidden_states.shape[0]
        q, k, v = self._project_step(hidden_states, rot_q, rot_k)
        retained, window_keys, window_values, *sinks = state
        old_k, old_v = window_keys[:, :, :1], window_values[:, :, :1]  # [B, H_kv, 1, d]: the slot that leaves
        keys = torch.cat([window_keys[:, :, 1:], k], dim=2)  # [B, H_kv, W, d_k]
        values = torch.cat([window_values[:, :, 1:], v], dim=2)  # [B, H_kv, W, d_v]
        decay = (self.log_decay.view(1, -1, 1, 1) * step.leaving).exp()  # [B, H_kv, 1, 1]
        retained = torch.addcmul((old_k * step.retained).transpose(-1, -2) * old_v, decay, retained)
        attend_keys, attend_values = keys, values
        if sinks:
            sinks = [torch.where(step.sink_write, old, slot) for old, slot in ((old_k, sinks[0]), (old_v, sinks[1]))]
            attend_keys, attend_values = torch.cat([sinks[0], keys], dim=2), torch.cat([sinks[1], values], dim=2)
        window_out = F.scaled_dot_product_attention(q, attend_keys, attend_values, attn_mask=step.attend, scale=1.0)
        lag = (self.log_decay * self.window).exp().view(1, -1, 1, 1)  # gamma^W: [1, H_kv, 1, 1]
        retention_out = self.group_norm(((q * lag) @ retained).reshape(b, 1, self.value_dim))  # [B, 1, H * d_v]
        if self.g_proj is not None:
            retention_out = F.silu(self.g_proj(hidden_states)).float() * retention_out
        mixed = window_out.reshape(b, 1, self.value_dim) + retention_out  # fp32
        if step.real is not None:  # a padded step keeps the window as it was
            keys = torch.where(step.real, keys, window_keys)
            values = torch.where(step.real, values, window_values)
        return self.o_proj(mixed.to(hidden_states.dtype)), (retained, keys, values, *sinks)


class RetNetMLP(nn.Module):
    """Gated feed-forward down(act(gate(x)) * up(x)): SwiGLU by default, GeGLU with hidden_act="gelu"."""

    def __init__(self, config: RetNetConfig):
        super().__init__()
        self.act_fn = ACT2FN[config.hidden_act]
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RetNetDecoderLayer(GradientCheckpointingLayer):
    """Pre-RMSNorm block: x + MSR(norm(x)), then x + FFN(norm(x))."""

    def __init__(self, config: RetNetConfig, layer_idx: int):
        super().__init__()
        self.retention_norm = RetNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        hybrid = getattr(config, "attention_window", 0)
        self.retention = (RetNetHybridAttention if hybrid else RetNetMultiScaleRetention)(config, layer_idx)
        self.ffn_norm = RetNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = RetNetMLP(config)

    def forward(
        self, hidden_states, cos, sin, mask, time, state=None, mode="chunkwise", positions=None, segments=None, **kwargs
    ):
        retained, state = self.retention(
            self.retention_norm(hidden_states), cos, sin, mask, time, state, mode, positions=positions,
            segments=segments, **kwargs,
        )
        hidden_states = hidden_states + retained
        hidden_states = hidden_states + self.mlp(self.ffn_norm(hidden_states))
        return hidden_states, state


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class RetNetPreTrainedModel(PreTrainedModel):
    config_class = RetNetConfig
    config: RetNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RetNetDecoderLayer"]
    _is_stateful = True  # no rollback of the state: assisted / speculative decoding is refused by generate()

    def __init__(self, config: RetNetConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        if getattr(type(self), "_auto_class", None) is not None:
            # A saved checkpoint then loads as either Auto class with trust_remote_code, whichever class saved it.
            config.auto_map = {
                **(getattr(config, "auto_map", None) or {}),
                "AutoModel": "modeling_retnet.RetNetModel",
                "AutoModelForCausalLM": "modeling_retnet.RetNetForCausalLM",
            }

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward() creates its own RetNetCache

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RetNetRMSNorm) and module.weight is not None:
            init.ones_(module.weight)
        elif isinstance(module, RetNetMultiScaleRetention):
            default = fp32_log_decays if self.config.fp32_decays else retnet_log_decays
            init.copy_(module.log_decay, retention_log_decays(self.config, module.layer_idx, default(module.num_heads)))
        elif isinstance(module, RetNetRotaryEmbedding):
            init.copy_(module.inv_freq, rotary_inv_freq(self.config))


class RetNetModel(RetNetPreTrainedModel):
    """The RetNet decoder stack without a head: embeddings -> blocks -> final RMSNorm."""

    def __init__(self, config: RetNetConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(RetNetDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RetNetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RetNetRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: RetNetCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        retention_mode: str | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: RetNetCache | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """
        input_ids: [B, T]. attention_mask: [B, T] or [B, past + T] (generation passes the whole mask); zeros are
        padding. cache (older name: past_key_values): a RetNetCache to start from and update. retention_mode:
        parallel / chunkwise / recurrent, None for the config's default (one-token steps always run the recurrence).
        position_ids: [B, T] (or [1, T]) for packed rows: a document starts where they restart (0, or not above the
        previous token's), and there the state is dropped and rotary positions restart; None: positions follow the
        mask and the cache.
        """
        past_key_values = _pick_cache(cache, past_key_values)
        mode = retention_mode or self.config.retention_mode
        if mode not in RETENTION_MODES:
            raise ValueError(f"retention_mode={mode!r} is not one of {RETENTION_MODES}; pass one of them or None")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # the state would be written twice on the recomputation

        t = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if input_ids is not None:
            inputs_embeds = self._embed(input_ids, check=t > 1)
        b = inputs_embeds.shape[0]
        device = inputs_embeds.device
        if use_cache and past_key_values is None:
            past_key_values = RetNetCache(self.config.num_hidden_layers)
        has_state = past_key_values is not None and past_key_values.is_initialized
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < t:
                raise ValueError(
                    f"attention_mask must be [batch, seq_len] (or [batch, past + seq_len]); got "
                    f"{tuple(attention_mask.shape)} for inputs of shape {(b, t)}"
                )
            mask = attention_mask[:, -t:].to(device=device, dtype=torch.long)  # [B, T]
        if position_ids is not None:
            position_ids = position_ids[..., -t:].to(device=device, dtype=torch.long).expand(b, t)  # [B, T]
        seen = past_key_values.seen_tokens if has_state else None  # [B] positions the cache has reached

        hybrid = getattr(self.config, "attention_window", 0)
        sinks = getattr(self.config, "attention_sinks", 0)
        if t == 1 and (not hybrid or (has_state and position_ids is None)):
            # decoding: the lean one-token recurrence (every mode computes the same thing)
            mode, time, segments = "step", None, None
            if position_ids is not None:
                positions = position_ids
                if has_state:  # a document starting at this token drops the state (position 0)
                    segments = (position_ids == 0) if mask is None else (position_ids == 0) & mask.bool()
            elif seen is not None:
                positions = seen.to(device).unsqueeze(-1)
            else:
                positions = torch.zeros(b, 1, dtype=torch.long, device=device)
            keep = None if mask is None else mask.view(b, 1, 1, 1).float()
            rot = self.rotary_emb.rotation(positions)  # [B, 1, d_k, d_k]
            cos, sin = rot, rot * (self.config.head_dim**-0.5)  # the layers' rotations for q and for k
        else:
            if mask is None:
                mask = torch.ones(b, t, dtype=torch.long, device=device)
            time = mask.cumsum(-1).float()  # [B, T] effective time: real tokens read so far in this call
            segments = None
            if position_ids is None:
                positions = (time - 1).clamp(min=0) + (0 if seen is None else seen.to(device).unsqueeze(-1))
            else:
                positions = position_ids
                starts = document_starts(position_ids, mask, has_state)
                segments = starts.long().cumsum(-1) if bool(starts.any()) else None  # [B, T]
            keep = mask
            cos, sin = self.rotary_emb(positions)  # [B, 1, T, d_k]
        extra = {}
        if hybrid and mode == "step":  # one decoded token: the window shifts by one slot
            doc_tokens = past_key_values.doc_tokens if past_key_values.doc_tokens is not None else seen
            extra["window"] = WindowStep(past_key_values.window_valid, keep, hybrid, sinks, doc_tokens)
        elif hybrid:  # hybrid layers: where this call's tokens sit in the window (the general path, any T)
            carried = past_key_values.window_valid if has_state else None
            doc_tokens = past_key_values.doc_tokens if has_state else None
            extra["window"] = WindowLayout(keep, carried, hybrid, segments, sinks, doc_tokens)

        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            state = past_key_values.get_state(i) if past_key_values is not None else None
            hidden_states, state = layer(
                hidden_states, cos, sin, keep, time, state, mode, positions=positions, segments=segments, **extra
            )
            if past_key_values is not None:
                past_key_values.set_state(i, state)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        if past_key_values is not None:
            if extra:
                past_key_values.window_valid = extra["window"].next_window_valid
                if extra["window"].sinks:
                    past_key_values.doc_tokens = extra["window"].next_doc_tokens
            past_key_values.advance(
                mask, None if position_ids is None else next_positions(position_ids, mask), num_tokens=t,
                batch_size=b, device=device,
            )

        cache = past_key_values if use_cache else None
        if not return_dict:
            return tuple(x for x in (hidden_states, cache, all_hidden_states) if x is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{CACHE_FIELD: cache}
        )

    def _embed(self, input_ids: torch.Tensor, check: bool) -> torch.Tensor:
        """Embeddings with a clear error for ids outside the vocabulary. The explicit check costs a device sync, so
        one-token steps skip it; there an out-of-range id still fails (IndexError on CPU, re-raised as ours)."""
        if check and input_ids.numel():
            outside = (input_ids < 0) | (input_ids >= self.config.vocab_size)
            if bool(outside.any()):
                self._bad_id(input_ids[outside][0].item())
        try:
            return self.embed_tokens(input_ids)
        except IndexError as err:
            outside = (input_ids < 0) | (input_ids >= self.config.vocab_size)
            if not bool(outside.any()):
                raise
            self._bad_id(input_ids[outside][0].item(), err)

    def _bad_id(self, bad, err=None):
        raise ValueError(
            f"input id {bad} is outside the vocabulary [0, {self.config.vocab_size}); tokenize with the "
            "tokenizer this model was trained with, or resize the embeddings (resize_token_embeddings)"
        ) from err


class RetNetForCausalLM(RetNetPreTrainedModel, GenerationMixin):
    """RetNet with a language-modelling head; `generate()` decodes recurrently from a RetNetCache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RetNetConfig):
        super().__init__(config)
        self.model = RetNetModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_llama(cls, llama_model_or_path, **kwargs) -> "RetNetForCausalLM":
        """A teacher-initialised RetNet from a `LlamaForCausalLM` (or its folder): see `hf_retnet.convert_llama`.
        The converter ships with the `hf_retnet` package, not with checkpoints, so it is imported only here."""
        try:
            from hf_retnet.convert_llama import retnet_from_llama
        except ImportError as err:
            raise ImportError("from_llama needs the hf_retnet package installed (install this project: pip install -e .)") from err
        return retnet_from_llama(llama_model_or_path, **kwargs)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    # Assisted (speculative) decoding verifies draft tokens and rolls the cache back past the rejected ones; a
    # recurrent state cannot be rolled back. transformers 5.2 refused it for `_is_stateful` models inside
    # `_validate_generation_mode`; 5.25 has no such check and fails inside `_assisted_decoding` with "Assisted
    # decoding requires a cache" (our cache is made by forward(), not by generate()). Both methods exist in 5.2 and
    # 5.25; refusing in both keeps the error ours and clear whichever one a release reaches first.
    _ASSISTED_REFUSAL = (
        "{name} cannot run assisted (speculative) decoding: it is a stateful model whose recurrent state cannot be "
        "rolled back past rejected draft tokens. Call generate() without assistant_model, prompt_lookup_num_tokens "
        "or assistant_early_exit."
    )

    def _validate_generation_mode(self, generation_mode, *args, **kwargs):
        if generation_mode == "assisted_generation":  # GenerationMode is a str enum
            raise ValueError(self._ASSISTED_REFUSAL.format(name=type(self).__name__))
        return super()._validate_generation_mode(generation_mode, *args, **kwargs)

    def _assisted_decoding(self, *args, **kwargs):
        raise ValueError(self._ASSISTED_REFUSAL.format(name=type(self).__name__))

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """generate()'s inputs, less the position_ids it makes for every step once a state exists: they count the
        real tokens exactly as the cache does (after a prompt with position_ids the cache continues from its last
        document), so a step without them is the same computation with less per-token work."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        state = inputs.get("cache", inputs.get("past_key_values"))
        if isinstance(state, RetNetCache) and state.is_initialized:
            inputs.pop("position_ids", None)
        return inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: RetNetCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        retention_mode: str | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: RetNetCache | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """labels: [B, T] token ids (shifted inside the loss), -100 where no loss is taken; in a packed row (see
        position_ids) the first token of each document is never a target, as DataCollatorWithFlattening marks it:
        nothing before it in the row belongs to its document. cache, position_ids: as in RetNetModel."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=_pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            retention_mode=retention_mode,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            position_ids=position_ids,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])  # [B, T', V]
        loss = None
        if labels is not None:
            if position_ids is not None:
                labels = mask_document_starts(labels, position_ids, attention_mask)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        cache = outputs[CACHE_FIELD] if CACHE_FIELD in outputs else None
        if not return_dict:
            out = (logits, cache, outputs.hidden_states)
            out = tuple(x for x in out if x is not None)
            return (loss,) + out if loss is not None else out
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_FIELD: cache}
        )


# transformers 5.25's prepare_inputs_for_generation() calls inspect.signature(self.forward) at every step for classes
# registered with register_for_auto_class (as ours are): 50 us a token on CPU. A stored signature answers it in 15.
RetNetForCausalLM.forward.__signature__ = inspect.signature(RetNetForCausalLM.forward)

__all__ = ["RetNetCache", "RetNetPreTrainedModel", "RetNetModel", "RetNetForCausalLM"]

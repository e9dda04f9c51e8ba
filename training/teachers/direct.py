"""DirectTeacher: a frozen `AutoModelForCausalLM` in the trainer's process."""

from __future__ import annotations

import os
import time

import torch

from training.utils.paths import looks_like_local_path
from .base import TeacherOutput, TeacherSource


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"teacher dtype {dtype!r} is not one of auto, float32, bfloat16, float16") from None


def load_teacher_model(model: str, adapter: str | None = None, dtype=None, device=None):
    """Load a causal LM from a folder, Hub id or Llama `.gguf` file (safetensors only: a GGUF is converted once,
    `training.convert_gguf.resolve_pretrained`), merge an optional peft adapter, freeze it.

    The one way every teacher consumer (DirectTeacher, the cache builder, the teacher server) gets its teacher, so an
    adapter is checked against its base and merged once, identically, whichever source later serves the teacher.
    """
    from transformers import AutoModelForCausalLM

    from training.converters.gguf import resolve_pretrained
    from .adapter import check_adapter_folder, merge_adapter

    model = resolve_pretrained(os.path.expanduser(model))  # a .gguf file: its converted folder (cached)
    if looks_like_local_path(model) and not os.path.isdir(model):
        raise FileNotFoundError(
            f"teacher model folder {model!r} does not exist; pass an existing folder or a Hub id such as "
            "'meta-llama/Llama-3.2-1B-Instruct'"
        )
    checked = True
    if adapter is not None:
        adapter = os.path.expanduser(adapter)
        checked = check_adapter_folder(adapter, model)  # before the weights load: a wrong adapter fails fast
    teacher = AutoModelForCausalLM.from_pretrained(model, dtype=_resolve_dtype(dtype), use_safetensors=True)
    if adapter is not None:
        if not checked:  # a Hub base that was not in the local cache before: its files are there now
            check_adapter_folder(adapter, model)
        teacher = merge_adapter(teacher, adapter, base_model=model)
    teacher.requires_grad_(False)
    teacher.eval()
    if device is not None:
        teacher.to(device)
    return teacher


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0, rows_per_chunk: int = 1024):
    """[..., V] logits -> top-k (log-probabilities fp32, ids int64), sorted descending.

    Works over chunks of rows so at most [rows_per_chunk, V] fp32 exists at once (V = 128256 in production),
    and takes the top-k of the scaled logits before subtracting logsumexp instead of a full log_softmax.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    values, ids = [], []
    for rows in flat.split(rows_per_chunk):
        scaled = rows.float() / temperature  # [R, V] fp32
        top, idx = scaled.topk(k, dim=-1, sorted=True)
        values.append(top - torch.logsumexp(scaled, dim=-1, keepdim=True))
        ids.append(idx)
    shape = (*logits.shape[:-1], k)
    return torch.cat(values).reshape(shape), torch.cat(ids).reshape(shape)


class DirectTeacher(TeacherSource):
    """Runs the teacher forward on each batch; the only source that can also hand over full logits.

    Args:
        model: a loaded `PreTrainedModel`, or a folder / Hub id to load.
        adapter: optional peft adapter folder, merged into the weights.
        dtype: the teacher's own dtype ("auto" keeps the checkpoint's).
        device: where the teacher runs (accelerate's device for the student by default).
        return_full_logits: also return [B, T, V] logits for full-vocabulary KL.
    """

    def __init__(self, model, adapter=None, dtype=None, device=None, return_full_logits: bool = False):
        if isinstance(model, str):
            model = load_teacher_model(model, adapter=adapter, dtype=dtype, device=device)
        else:
            model.requires_grad_(False)
            model.eval()
            if device is not None:
                model.to(device)
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.return_full_logits = return_full_logits

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] -> [B, T, V] logits in the teacher's dtype, on the teacher's device. With `position_ids` of packed
        rows, every document is read on its own (see `packed_logits`)."""
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        if position_ids is not None:
            from training.data.shards import document_starts

            position_ids = position_ids.to(self.device)
            if bool(document_starts(position_ids, mask).any()):
                return self.packed_logits(ids, mask, position_ids)
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    # Attention implementations that take an explicit [B, 1, T, T] additive mask (transformers 5.2 to 5.25 pass a
    # 4D mask through unchanged: `_preprocess_mask_arguments` returns it as is; eager adds it to the scores).
    MASKED_ATTENTION = ("eager", "sdpa")

    def packed_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      position_ids: torch.Tensor) -> torch.Tensor:
        """Logits of packed rows, each document as if alone: with eager or SDPA attention one forward with a
        block-diagonal causal mask (a token sees the real tokens of its own document up to itself) and positions
        counted from each document's first token; with any other attention (flash, flex, ...) the documents are
        cut out into a batch of their own. transformers' own packed path (position_ids and no attention_mask)
        is not used: it is skipped whenever an attention mask is given, so it could not serve padded batches."""
        from training.data.shards import document_index

        doc, positions = document_index(position_ids, attention_mask)  # [B, T] each
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if getattr(self.model.config, "_attn_implementation", None) not in self.MASKED_ATTENTION:
            return self._per_document_logits(input_ids, doc, real)
        t = input_ids.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()  # [T, T]
        allowed = causal & (doc[:, :, None] == doc[:, None, :]) & real[:, None, :]  # [B, T(query), T(key)]
        allowed |= torch.eye(t, dtype=torch.bool, device=input_ids.device)  # padding queries see themselves
        dtype = next(self.model.parameters()).dtype
        additive = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
        additive.masked_fill_(~allowed, torch.finfo(dtype).min)
        return self.model(input_ids=input_ids, attention_mask=additive[:, None], position_ids=positions,
                          use_cache=False).logits

    def _per_document_logits(self, input_ids, doc, real) -> torch.Tensor:
        """Cut every document out of its row into a right-padded batch of documents, run it, put the logits back."""
        pieces = [(b, (real[b] & (doc[b] == d)).nonzero().squeeze(1))
                  for b in range(input_ids.shape[0]) for d in doc[b][real[b]].unique().tolist()]
        width = max(len(where) for _, where in pieces)
        ids = torch.zeros(len(pieces), width, dtype=input_ids.dtype, device=input_ids.device)  # [D, L]
        mask = torch.zeros_like(ids)
        for i, (b, where) in enumerate(pieces):
            ids[i, : len(where)], mask[i, : len(where)] = input_ids[b, where], 1
        per_doc = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [D, L, V]
        out = per_doc.new_zeros(*input_ids.shape, per_doc.shape[-1])  # [B, T, V]; padding stays 0
        for i, (b, where) in enumerate(pieces):
            out[b, where] = per_doc[i, : len(where)]
        return out

    @torch.no_grad()
    def topk(self, input_ids, attention_mask=None, k: int = 512, temperature: float = 1.0,
             position_ids=None) -> TeacherOutput:
        start = time.perf_counter()
        if not 0 < k <= self.vocab_size:
            raise ValueError(f"teacher_topk={k} must be in [1, vocab_size={self.vocab_size}]")
        logits = self.logits(input_ids, attention_mask, position_ids)  # [B, T, V], teacher dtype
        values, ids = topk_logprobs(logits, k, temperature)
        device = input_ids.device
        return TeacherOutput(
            token_ids=ids.to(device),
            logprobs=values.to(device),
            full_logits=logits.to(device) if self.return_full_logits else None,
            seconds=time.perf_counter() - start,
        )

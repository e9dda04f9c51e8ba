"""DirectTeacher: a frozen `AutoModelForCausalLM` in the trainer's process."""

from __future__ import annotations

import os
import time

import torch

from training.utils.paths import looks_like_local_path
from .base import TeacherOutput


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


class DirectTeacher:
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
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] -> [B, T, V] logits in the teacher's dtype, on the teacher's device."""
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        return self.model(input_ids=input_ids.to(self.device), attention_mask=mask, use_cache=False).logits

    @torch.no_grad()
    def topk(self, input_ids, attention_mask=None, k: int = 512, temperature: float = 1.0) -> TeacherOutput:
        start = time.perf_counter()
        if not 0 < k <= self.vocab_size:
            raise ValueError(f"teacher_topk={k} must be in [1, vocab_size={self.vocab_size}]")
        logits = self.logits(input_ids, attention_mask)  # [B, T, V], teacher dtype
        values, ids = topk_logprobs(logits, k, temperature)
        device = input_ids.device
        return TeacherOutput(
            token_ids=ids.to(device),
            logprobs=values.to(device),
            full_logits=logits.to(device) if self.return_full_logits else None,
            seconds=time.perf_counter() - start,
        )

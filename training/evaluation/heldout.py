"""Held-out next-token loss, perplexity and agreement with the teacher, on exactly the same tokens.

Documents come through the project's readers (shard folders via `PretokenizedShardDataset`, JSONL / Parquet /
text via `training.data.records`, encoded as `training.preprocess` encodes them), each starting with BOS. A
document that fits in `window` tokens is scored whole; a longer one in sliding windows of `window` tokens advancing
by `stride`, each scoring only tokens the previous window did not, so every token is scored once and (past the
first window) sees at least `window - stride` tokens of context. Student and teacher are fed the same window
tensors; each model's inputs are hashed separately as it is fed, so the report can show that the tokens were
identical rather than assume it.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import torch

from training.data.format import MANIFEST_NAME
from training.data.records import IGNORE_INDEX


@dataclass
class Window:
    input_ids: torch.Tensor  # [L] int64
    targets: torch.Tensor  # [L] int64: targets[p] is the token predicted at p, IGNORE_INDEX where not scored


def load_documents(spec, tokenizer, max_documents: int | None = None, append_eos: bool = True) -> list[dict]:
    """[{"input_ids": [T], "labels": [T]}] from a shard folder or JSONL / Parquet / text files (or a folder of
    them), in file order; text encoded as `training.preprocess` does (`append_eos` as its option). Empty texts are
    skipped; no text at all is an error naming the input."""
    from training.data import records
    from training.data.shards import PretokenizedShardDataset

    specs = [os.fspath(s) for s in spec] if isinstance(spec, (list, tuple)) else [os.fspath(spec)]
    docs: list[dict] = []
    seen = 0
    if len(specs) == 1 and os.path.isfile(os.path.join(specs[0], MANIFEST_NAME)):
        shards = PretokenizedShardDataset(specs[0], None, shuffle=False, tokenizer=tokenizer)
        for i in range(len(shards) if max_documents is None else min(len(shards), max_documents)):
            item = shards[i]
            docs.append({"input_ids": item["input_ids"].tolist(), "labels": item["labels"].tolist()})
        seen = len(shards)
    else:
        for where, obj in records.iter_records(specs):
            seen += 1
            record = records.normalize_record(obj, where)
            if record is None:
                continue
            ids, labels = records.encode_record(record, tokenizer, where, append_eos=append_eos)
            docs.append({"input_ids": list(ids), "labels": list(labels)})
            if max_documents is not None and len(docs) >= max_documents:
                break
    bos = tokenizer.bos_token_id
    for doc in docs:
        if bos is not None and (not doc["input_ids"] or doc["input_ids"][0] != bos):
            doc["input_ids"] = [bos] + doc["input_ids"]
            doc["labels"] = [IGNORE_INDEX] + doc["labels"]
    docs = [d for d in docs if any(label != IGNORE_INDEX for label in d["labels"][1:])]
    if not docs:
        raise ValueError(
            f"{', '.join(specs)}: no text to evaluate on ({seen} records read, none with a non-empty text or "
            'scored token); give JSONL lines like {"text": "..."}, a text file or a training.preprocess shard folder'
        )
    return docs


def make_windows(docs: list[dict], window: int, stride: int) -> list[Window]:
    """Cut documents into scoring windows (see the module docstring); token j of a document is scored (as the
    prediction of position j-1) exactly once when its label is not IGNORE_INDEX."""
    if window < 2 or not 1 <= stride <= window - 1:
        raise ValueError(f"need window >= 2 and 1 <= stride < window, got window={window}, stride={stride}")
    out = []
    for doc in docs:
        ids = torch.tensor(doc["input_ids"], dtype=torch.long)
        labels = torch.tensor(doc["labels"], dtype=torch.long)
        n = len(ids)
        begin, end, scored_from = 0, min(window, n), 1
        while True:
            targets = torch.full((end - begin,), IGNORE_INDEX, dtype=torch.long)
            j = torch.arange(scored_from, end)  # scored document positions in this window
            targets[j - 1 - begin] = labels[j]
            out.append(Window(ids[begin:end].clone(), targets))
            if end >= n:
                break
            scored_from, end = end, min(end + stride, n)
            begin = end - window
    return out


def scoring_description(docs: list[dict], window: int, stride: int) -> dict:
    longest = max(len(d["input_ids"]) for d in docs)
    windowed = sum(len(d["input_ids"]) > window for d in docs)
    return {
        "mode": "whole" if windowed == 0 else "windows",
        "documents": len(docs),
        "documents_in_windows": windowed,
        "longest_document_tokens": longest,
        "window": window,
        "stride": stride,
        "bos_prefixed": True,
        "text": (
            f"every document starts with BOS and is scored whole ({len(docs)} documents, longest {longest} tokens)"
            if windowed == 0 else
            f"every document starts with BOS; {len(docs) - windowed} scored whole, {windowed} longer than {window} "
            f"tokens scored in sliding windows of {window} advancing by {stride} (each token scored once, with at "
            f"least {window - stride} tokens of context past the first window)"
        ),
    }


def _batches(windows: list[Window], batch_size: int, pad_id: int):
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        width = max(len(w.input_ids) for w in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros((len(group), width), dtype=torch.long)  # [B, L]
        targets = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)  # [B, L]
        for b, w in enumerate(group):
            n = len(w.input_ids)
            ids[b, :n], mask[b, :n], targets[b, :n] = w.input_ids, 1, w.targets
        yield ids, mask, targets


def _logits(model, ids, mask):
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits


class _Fed:
    """What one model was fed: a running hash of (input ids, targets) and the scored-token count."""

    def __init__(self):
        self.digest, self.tokens, self.nll = hashlib.sha256(), 0, 0.0

    def feed(self, ids, mask, targets):
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            self.digest.update(ids[b, :n].numpy().tobytes())
            self.digest.update(targets[b, :n].numpy().tobytes())

    def summary(self) -> dict:
        loss = self.nll / max(self.tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": self.tokens,
                "token_digest": "sha256:" + self.digest.hexdigest()}


@torch.no_grad()
def score(student, windows: list[Window], pad_id: int, teacher=None, batch_size: int = 1,
          row_chunk: int = 1024, progress: bool = True) -> dict:
    """Token-weighted loss / perplexity of the student (and teacher) and, with a teacher, the token mean of
    KL(teacher || student) over the full vocabulary and top-1 agreement. All reductions in fp32; rows are
    processed `row_chunk` at a time so no more than one fp32 [row_chunk, V] block per model exists at once."""
    from tqdm.auto import tqdm

    fed = {"student": _Fed()}
    if teacher is not None:
        fed["teacher"] = _Fed()
    kl_sum, agree = 0.0, 0
    batches = list(_batches(windows, batch_size, pad_id))
    for ids, mask, targets in tqdm(batches, desc="held-out loss", disable=not progress):
        fed["student"].feed(ids, mask, targets)
        s_logits = _logits(student, ids, mask)  # [B, L, V]
        if teacher is not None:
            fed["teacher"].feed(ids, mask, targets)
            t_logits = _logits(teacher, ids, mask)  # [B, L, V']
        keep = targets != IGNORE_INDEX  # [B, L]
        tgt = targets[keep].to(s_logits.device)  # [N]
        s_rows = s_logits[keep.to(s_logits.device)]  # [N, V]
        t_rows = t_logits[keep.to(t_logits.device)].to(s_rows.device) if teacher is not None else None
        s_logits = t_logits = None  # only the scored rows stay alive
        vocab = s_rows.shape[-1] if t_rows is None else min(s_rows.shape[-1], t_rows.shape[-1])
        for start in range(0, tgt.numel(), row_chunk):
            sl = slice(start, start + row_chunk)
            s_lp = torch.log_softmax(s_rows[sl, :vocab].float(), dim=-1)  # [n, V] fp32
            fed["student"].nll -= s_lp.gather(-1, tgt[sl, None]).sum().item()
            if t_rows is not None:
                t_lp = torch.log_softmax(t_rows[sl, :vocab].float(), dim=-1)  # [n, V] fp32
                fed["teacher"].nll -= t_lp.gather(-1, tgt[sl, None]).sum().item()
                kl_sum += (t_lp.exp() * (t_lp - s_lp)).sum().item()
                agree += int((t_lp.argmax(-1) == s_lp.argmax(-1)).sum())
        for f in fed.values():
            f.tokens += int(tgt.numel())
    out = {name: f.summary() for name, f in fed.items()}
    if teacher is not None:
        n = out["student"]["tokens"]
        out["agreement"] = {"kl_teacher_student": kl_sum / max(n, 1), "top1_agreement": agree / max(n, 1),
                            "tokens": n, "vocabulary_compared": vocab}
        out["identical_tokens"] = out["student"]["token_digest"] == out["teacher"]["token_digest"]
    return out

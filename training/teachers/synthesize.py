"""Instruction data with no dataset: an instruct teacher writes the requests itself (Magpie), then answers them.

    python -m training.synthesize --model runs/smollm2 --output runs/synth/train.jsonl --n 20000 --batch_size 32
    python -m training.synthesize --model SmolLM2-135M-Instruct.Q4_1.gguf --prompts prompts.jsonl --output answers.jsonl

How a conversation is made (Magpie, Xu et al. 2024): the model is given only its chat template's text up to and
including the user-turn header (for ChatML `<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n`), found
generically by rendering a conversation whose user message is a sentinel and cutting at the sentinel, so any
template works. What it writes until its end-of-turn token (the first special token after the sentinel in that
render; also EOS) is the request. The request is then answered with `apply_chat_template(add_generation_prompt=True)`
and sampling until the end-of-turn token. With `--prompts FILE` (JSONL with `prompt` or `messages`, or one prompt
per text line) only the answers are generated.

Output: chat JSONL `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "id": ..., "seed": ...}`
(a system message first with `--system`), which `training.preprocess` reads and trains on assistant turns only.
Beside it, `<output stem>.stats.json` counts what each filter rejected and the generation throughput.

Filters (each rejected candidate is counted under the first that applies):
  unfinished_request / unfinished_answer: no end-of-turn token within --max_request_tokens / --max_answer_tokens;
  not_a_request: the request holds a special token (e.g. the model opened another turn with an assistant header) or
      its first line is a role name;
  answer_leaves_turn: the answer holds a special token before its end-of-turn (it started another turn);
  short_request / short_answer: empty, or fewer than --min_request_chars / --min_answer_chars characters;
  repetitive_request / repetitive_answer: more than --max_repeat_ratio of its word n-grams (--repeat_ngram) repeat;
  duplicate_request: the normalised request (lower case, words only) was already accepted or appears earlier in
      the same batch.

Deterministic and resumable: batch b samples with seeds derived from (--seed, b), and its requests, filters and
answers depend only on b and the requests accepted before it, so a run killed at any point and started again with
the same command writes exactly the records an uninterrupted run writes. Every batch is appended to the output in one
write, flushed and fsynced, then committed in `<output>.progress` (its byte offset, record count and filter counts);
a restart truncates the output to the last committed batch (dropping a half-written one) and goes on from there.
A larger --n later continues the same file. Same seed and settings on the same device and dtype give the same file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field

from training.utils.errors import command

__all__ = [
    "FILTERS",
    "SynthesizeArguments",
    "chat_prefix",
    "check_answer",
    "check_request",
    "normalize_request",
    "read_prompts",
    "repeat_ratio",
    "synthesize",
    "main",
]

FORMAT = "hf_retnet.synthesize"
FORMAT_VERSION = 1
FILTERS = ("unfinished_request", "not_a_request", "short_request", "repetitive_request", "duplicate_request",
           "unfinished_answer", "answer_leaves_turn", "short_answer", "repetitive_answer")
_SENTINEL = "\u27e6hf-retnet-user-turn\u27e7"
_ROLE_NAMES = {"user", "assistant", "system", "human", "gpt", "model", "bot"}
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}
_WORD_RE = re.compile(r"\w+|[^\w\s]")


# ----------------------------------------------------------------------------------------------- filters


def normalize_request(text: str) -> str:
    """The dedup key of a request: lower case, words only, single spaces."""
    return " ".join(re.findall(r"\w+", text.lower()))


def repeat_ratio(text: str, n: int = 3) -> float:
    """Fraction of the word n-grams (punctuation marks count as words) that repeat an earlier one: 0 for varied
    text, close to 1 for a loop. Texts with fewer than n + 2 words score 0."""
    words = _WORD_RE.findall(text.lower())
    if len(words) < n + 2:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


_ROLE_LINE_RE = re.compile(r"^\s*(?:(?:%s)\s*:?\s*(?:\n|$)|(?:user|assistant|system|human|gpt)\s*:)" % "|".join(
    sorted(_ROLE_NAMES)), re.IGNORECASE)


def _starts_with_role(text: str) -> bool:
    """A first line that is a role name ("assistant"), or a transcript line ("User: ...")."""
    return _ROLE_LINE_RE.match(text) is not None


def check_request(text: str, finished: bool = True, has_special: bool = False, min_chars: int = 8,
                  max_repeat_ratio: float = 0.3, ngram: int = 3) -> str | None:
    """The first request filter that rejects `text` (see FILTERS), or None when it passes."""
    if not finished:
        return "unfinished_request"
    if has_special or _starts_with_role(text):
        return "not_a_request"
    if len(text.strip()) < max(1, min_chars):
        return "short_request"
    if repeat_ratio(text, ngram) > max_repeat_ratio:
        return "repetitive_request"
    return None


def check_answer(text: str, finished: bool = True, has_special: bool = False, min_chars: int = 2,
                 max_repeat_ratio: float = 0.3, ngram: int = 3) -> str | None:
    """The first answer filter that rejects `text` (see FILTERS), or None when it passes."""
    if not finished:
        return "unfinished_answer"
    if has_special:
        return "answer_leaves_turn"
    if len(text.strip()) < max(1, min_chars):
        return "short_answer"
    if repeat_ratio(text, ngram) > max_repeat_ratio:
        return "repetitive_answer"
    return None


# ----------------------------------------------------------------------------------------------- templates and prompts


def chat_prefix(tokenizer, system: str | None = None) -> tuple[str, str]:
    """(text up to and including the user-turn header, text the template puts right after a user message).

    Rendered from the tokenizer's own chat template with a sentinel user message, so no template is hard-coded:
    for ChatML the prefix ends with `<|im_start|>user\\n` and the suffix starts with `<|im_end|>`."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ValueError(f"{name} has no chat template; synthesize needs an instruct (chat) model")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if text.count(_SENTINEL) != 1:
        raise ValueError("the chat template does not render a user message verbatim exactly once; cannot find where "
                         "the user turn starts (use --prompts to answer given requests instead)")
    cut = text.index(_SENTINEL)
    return text[:cut], text[cut + len(_SENTINEL):]


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special)
    return ids


def end_of_turn_ids(tokenizer, suffix: str, generation_config=None) -> list[int]:
    """The ids that end a turn: the first special token the template writes after a user message (ChatML's
    `<|im_end|>`, Llama-3's `<|eot_id|>`), then EOS and the generation config's eos ids."""
    special = _special_ids(tokenizer)
    out = [i for i in tokenizer(suffix, add_special_tokens=False)["input_ids"] if i in special][:1]
    extra = [tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)]
    for value in extra:
        for token_id in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(token_id, int) and token_id not in out:
                out.append(token_id)
    if not out:
        raise ValueError("the tokenizer has no end-of-turn or EOS token; cannot tell where a turn ends")
    return out


def _normalize_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise ValueError(f"{where}: each message must be an object with role and content")
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"{where}: each message needs a string 'role' and 'content'")
        out.append({"role": _ROLE_ALIASES.get(role.lower(), role.lower()), "content": content})
    while out and out[-1]["role"] == "assistant":  # an answer already there is what we regenerate
        out.pop()
    if not out or out[-1]["role"] != "user":
        raise ValueError(f"{where}: the conversation must end with a user message (before any assistant reply)")
    return out


def read_prompts(path: str) -> list[list[dict]]:
    """Conversations to answer: JSONL lines with "messages" (up to the last user turn) or "prompt" (optional
    "system"), or, for any other file, one prompt per non-empty line."""
    out = []
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    if path.lower().endswith((".jsonl", ".json", ".ndjson")):
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg}); give one object per line with 'prompt' or "
                                 "'messages'") from None
            if isinstance(obj, dict) and ("messages" in obj or "conversations" in obj):
                out.append(_normalize_messages(obj.get("messages", obj.get("conversations")), where))
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                system = obj.get("system")
                out.append(([{"role": "system", "content": system}] if isinstance(system, str) and system else [])
                           + [{"role": "user", "content": obj["prompt"]}])
            else:
                raise ValueError(f"{where}: expected an object with a 'prompt' string or a 'messages' list")
    else:
        out = [[{"role": "user", "content": line.strip()}] for line in lines if line.strip()]
    if not out:
        raise ValueError(f"{path}: no prompts in this file")
    return out


# ----------------------------------------------------------------------------------------------- generation


def _batch_seed(seed: int, batch: int, phase: str) -> int:
    digest = hashlib.sha256(f"{seed}/{batch}/{phase}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generate(model, rows: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
              stop_ids: list[int], pad_id: int, seed: int):
    """Sample continuations of token rows (left-padded into one batch) -> [(ids before the stop, finished)] and the
    number of tokens generated (up to and including each stop)."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    sample = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=list(stop_ids),
                              pad_token_id=pad_id, **({"temperature": temperature, "top_p": top_p, "top_k": 0}
                                                      if sample else {}))
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    results, tokens = [], 0
    stops = set(stop_ids)
    for row in out[:, width:].tolist():
        cut = next((j for j, t in enumerate(row) if t in stops), None)
        if cut is None:
            results.append((row, False))
            tokens += len(row)
        else:
            results.append((row[:cut], True))
            tokens += cut + 1
    return results, tokens


# ----------------------------------------------------------------------------------------------- files and resume


def stats_path(output: str) -> str:
    stem = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
    return f"{stem}.stats.json"


def progress_path(output: str) -> str:
    return f"{output}.progress"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_progress(path: str) -> tuple[dict | None, list[dict]]:
    """(header, committed batch entries) of a progress file; a partial last line (a kill mid-write) is ignored."""
    header, entries = None, []
    with open(path, "rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                break
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                break
            if header is None:
                header = obj
            else:
                entries.append(obj)
    return header, entries


def _user_request(record: dict) -> str:
    users = [m["content"] for m in record.get("messages", []) if m.get("role") == "user"]
    return users[-1] if users else ""


def _resume(output: str, settings: dict, n: int, overwrite: bool) -> tuple[list[dict], set[str]]:
    """Bring output and progress file back to the last committed batch; -> (entries kept, accepted request keys).

    Fresh start (nothing there, or --overwrite) -> ([], set()). A foreign output file or other settings are errors."""
    progress = progress_path(output)
    if overwrite:
        for path in (output, progress, stats_path(output)):
            if os.path.exists(path):
                os.unlink(path)
    has_output = os.path.exists(output) and os.path.getsize(output) > 0
    if not os.path.exists(progress):
        if has_output:
            raise FileExistsError(f"{output} exists and was not written by training.synthesize (no {progress}); pass "
                                  "--overwrite to replace it or choose another --output")
        return [], set()
    header, entries = _read_progress(progress)
    if not header or header.get("format") != FORMAT:
        raise ValueError(f"{progress} is not a training.synthesize progress file; pass --overwrite to start over")
    if header.get("settings") != settings:
        old = header.get("settings") or {}
        keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise ValueError(f"{output} was started with other settings ({', '.join(keys)}); rerun with the same ones to "
                         "continue it, or pass --overwrite to start over")
    size = os.path.getsize(output) if os.path.exists(output) else 0
    kept = []
    for entry in entries:
        if entry.get("batch") != (kept[-1]["batch"] + 1 if kept else entry.get("batch")) or entry["offset"] > size:
            break
        kept.append(entry)
    if kept and kept[-1].get("cut") and kept[-1]["records"] < n:  # cut short at the old --n: redo it whole
        kept.pop()
    offset = kept[-1]["offset"] if kept else 0
    with open(output, "ab") as handle:  # drop a half-written batch (and a partial last line)
        handle.truncate(offset)
    records = []
    with open(output, encoding="utf-8") as handle:
        for line in handle:
            records.append(json.loads(line))
    expected = kept[-1]["records"] if kept else 0
    if len(records) != expected:
        raise ValueError(f"{output} holds {len(records)} records where its progress file committed {expected}; it "
                         "was edited: pass --overwrite to start over")
    _write_atomic(progress, "".join(json.dumps(obj) + "\n" for obj in [header, *kept]))
    return kept, {normalize_request(_user_request(r)) for r in records}


# ----------------------------------------------------------------------------------------------- the run


@dataclass
class SynthesizeArguments:
    model: str = field(metadata={"help": "instruct teacher: folder, Hub id or Llama .gguf file (converted once: "
                                         "training.convert_gguf)"})
    output: str = field(metadata={"help": "chat JSONL to write (a rerun continues it; stats beside it)"})
    n: int = field(default=1000, metadata={"help": "conversations to write"})
    prompts: str | None = field(default=None, metadata={"help": "answer these instead of generating requests: JSONL "
                                                               "with 'prompt' or 'messages', or one prompt per line"})
    batch_size: int = field(default=8, metadata={"help": "conversations generated per batch"})
    system: str | None = field(default=None, metadata={"help": "system prompt (default: the template's own)"})
    max_request_tokens: int = field(default=128, metadata={"help": "longest request, in tokens"})
    max_answer_tokens: int = field(default=512, metadata={"help": "longest answer, in tokens"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (0: greedy)"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass"})
    request_temperature: float | None = field(default=None, metadata={"help": "temperature for requests (default: "
                                                                              "--temperature; Magpie uses 1.0)"})
    seed: int = field(default=0, metadata={"help": "seed of every sample (per batch: derived from seed and batch)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, ... (auto: cuda when available)"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})
    adapter: str | None = field(default=None, metadata={"help": "optional peft adapter folder merged into the model"})
    min_request_chars: int = field(default=8, metadata={"help": "shorter requests are rejected"})
    min_answer_chars: int = field(default=2, metadata={"help": "shorter answers are rejected"})
    keep_unfinished_answers: bool = field(
        default=False,
        metadata={"help": "keep answers cut at --max_answer_tokens (marked \"finished\": false) instead of rejecting "
                  "them: long-winded teachers otherwise waste most of the generation on rejected answers"},
    )
    max_repeat_ratio: float = field(default=0.3, metadata={"help": "reject turns whose repeated n-gram ratio is above"})
    repeat_ngram: int = field(default=3, metadata={"help": "n of the repeated n-gram ratio"})
    max_batches: int | None = field(default=None, metadata={"help": "stop after this many batches even short of n "
                                                                    "(default: 10 x the batches n needs, + 10)"})
    overwrite: bool = field(default=False, metadata={"help": "delete the output (and its progress) and start over"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        for key in ("n", "batch_size", "max_request_tokens", "max_answer_tokens", "repeat_ngram"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key} must be >= 1, got {getattr(self, key)}")
        for key in ("temperature", "request_temperature"):
            value = getattr(self, key)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"--{key} must be a finite number >= 0, got {value}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.max_repeat_ratio <= 1:
            raise ValueError(f"--max_repeat_ratio must be in [0, 1], got {self.max_repeat_ratio}")
        if self.prompts is not None and not os.path.isfile(self.prompts):
            raise FileNotFoundError(f"--prompts {self.prompts!r} does not exist")


_RESULT_KEYS = ("model", "n", "device", "dtype", "overwrite", "progress", "max_batches", "output")


def _settings(args: SynthesizeArguments) -> dict:
    """What the records depend on (a resumed run must match): everything but n, where it runs and how it reports."""
    settings = {k: v for k, v in asdict(args).items() if k not in _RESULT_KEYS}
    settings["model"] = os.path.basename(os.path.normpath(args.model)) if os.path.exists(args.model) else args.model
    if args.prompts:
        from training.converters.gguf import gguf_sha256

        settings["prompts"] = {"file": os.path.basename(args.prompts), "sha256": gguf_sha256(args.prompts)}
    return settings


def _load(args: SynthesizeArguments):
    import torch
    from transformers import AutoTokenizer

    from training.converters.gguf import resolve_pretrained
    from training.teachers.direct import load_teacher_model

    folder = resolve_pretrained(args.model)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_teacher_model(folder, adapter=args.adapter, dtype=args.dtype, device=device)
    return model, tokenizer


class _Totals:
    def __init__(self, entries: list[dict]):
        self.rejected = dict.fromkeys(FILTERS, 0)
        self.candidates = self.tokens = self.request_tokens = self.answer_tokens = 0
        self.seconds = 0.0
        for e in entries:
            self.add(e)

    def add(self, entry: dict) -> None:
        for key, count in entry["rejected"].items():
            self.rejected[key] = self.rejected.get(key, 0) + count
        self.candidates += entry["candidates"]
        self.request_tokens += entry["request_tokens"]
        self.answer_tokens += entry["answer_tokens"]
        self.seconds += entry["seconds"]

    def as_dict(self) -> dict:
        tokens = self.request_tokens + self.answer_tokens
        return {"candidates": self.candidates, "rejected": self.rejected,
                "rejected_total": sum(self.rejected.values()), "generated_tokens": tokens,
                "request_tokens": self.request_tokens, "answer_tokens": self.answer_tokens,
                "generation_seconds": round(self.seconds, 3),
                "tokens_per_second": round(tokens / self.seconds, 2) if self.seconds > 0 else None}


def synthesize(args: SynthesizeArguments, model=None, tokenizer=None) -> dict:
    """Write (or continue) `args.output`; returns the stats also written to `<output stem>.stats.json`.
    `model` / `tokenizer`: an already loaded causal LM and its tokenizer (otherwise loaded from `args.model`)."""
    from tqdm.auto import tqdm

    output = os.path.abspath(os.path.expanduser(args.output))
    os.makedirs(os.path.dirname(output), exist_ok=True)
    settings = _settings(args)
    entries, seen = _resume(output, settings, args.n, args.overwrite)
    progress = progress_path(output)
    if not entries and not os.path.exists(progress):
        _write_atomic(progress, json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "settings": settings}) + "\n")
        open(output, "wb").close()
    totals = _Totals(entries)
    accepted = entries[-1]["records"] if entries else 0
    batch = entries[-1]["batch"] + 1 if entries else 0
    prompts = read_prompts(args.prompts) if args.prompts else None
    need = math.ceil(args.n / args.batch_size)
    max_batches = args.max_batches if args.max_batches is not None else 10 * need + 10
    if prompts is not None:
        max_batches = min(max_batches, math.ceil(len(prompts) / args.batch_size))
    stopped = None

    def stats() -> dict:
        return {"output": output, "records": accepted, "n": args.n, "batches": batch, "stopped": stopped,
                **totals.as_dict(), "settings": settings}

    if accepted < args.n and batch < max_batches:
        if model is None or tokenizer is None:
            model, tokenizer = _load(args)
        model.eval()
        prefix, suffix = chat_prefix(tokenizer, args.system)
        stop_ids = end_of_turn_ids(tokenizer, suffix, getattr(model, "generation_config", None))
        special = _special_ids(tokenizer) - set(stop_ids)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        prefix_ids = list(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        request_temperature = args.request_temperature if args.request_temperature is not None else args.temperature
        filt = {"max_repeat_ratio": args.max_repeat_ratio, "ngram": args.repeat_ngram}

        def decode(ids):
            return tokenizer.decode(ids, skip_special_tokens=True).strip()

        bar = tqdm(total=args.n, initial=accepted, unit="conv", desc="synthesize", disable=not args.progress,
                   dynamic_ncols=True)
        with open(output, "ab") as out, open(progress, "ab") as prog:
            while accepted < args.n and batch < max_batches:
                start = time.perf_counter()
                rejected = dict.fromkeys(FILTERS, 0)
                request_tokens = answer_tokens = 0
                batch_seen = set()
                convs = []  # (index in batch, messages to answer)
                if prompts is None:
                    results, request_tokens = _generate(
                        model, [prefix_ids] * args.batch_size, max_new_tokens=args.max_request_tokens,
                        temperature=request_temperature, top_p=args.top_p, stop_ids=stop_ids, pad_id=pad_id,
                        seed=_batch_seed(args.seed, batch, "request"))
                    candidates = []
                    for j, (ids, finished) in enumerate(results):
                        text = decode(ids)
                        reason = check_request(text, finished, any(t in special for t in ids),
                                               args.min_request_chars, **filt)
                        candidates.append((j, text, reason))
                    base = [{"role": "system", "content": args.system}] if args.system else []
                    candidates = [(j, base + [{"role": "user", "content": text}], reason)
                                  for j, text, reason in candidates]
                else:
                    chunk = prompts[batch * args.batch_size : (batch + 1) * args.batch_size]
                    candidates = []
                    for j, conv in enumerate(chunk):
                        if args.system and conv[0]["role"] != "system":
                            conv = [{"role": "system", "content": args.system}] + conv
                        text = conv[-1]["content"]
                        reason = "short_request" if len(text.strip()) < max(1, args.min_request_chars) else None
                        candidates.append((j, conv, reason))
                for j, conv, reason in candidates:
                    key = normalize_request(conv[-1]["content"])
                    if reason is None and (key in seen or key in batch_seen):
                        reason = "duplicate_request"
                    if reason is not None:
                        rejected[reason] += 1
                        continue
                    batch_seen.add(key)
                    convs.append((j, conv))
                records = []
                if convs:
                    texts = [tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
                             for _, conv in convs]
                    rows = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
                    answers, answer_tokens = _generate(
                        model, rows, max_new_tokens=args.max_answer_tokens, temperature=args.temperature,
                        top_p=args.top_p, stop_ids=stop_ids, pad_id=pad_id, seed=_batch_seed(args.seed, batch, "answer"))
                    for (j, conv), (ids, finished) in zip(convs, answers):
                        text = decode(ids)
                        reason = check_answer(text, finished or args.keep_unfinished_answers,
                                              any(t in special for t in ids), args.min_answer_chars, **filt)
                        if reason is not None:
                            rejected[reason] += 1
                            continue
                        record = {"messages": conv + [{"role": "assistant", "content": text}],
                                  "id": f"{args.seed}-{batch}-{j}", "seed": args.seed}
                        if not finished:
                            record["finished"] = False
                        records.append(record)
                cut = len(records) > args.n - accepted
                records = records[: args.n - accepted]
                out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
                out.flush()
                os.fsync(out.fileno())
                accepted += len(records)
                seen.update(normalize_request(_user_request(r)) for r in records)
                entry = {"batch": batch, "offset": out.tell(), "records": accepted, "written": len(records),
                         "cut": cut, "candidates": len(candidates), "rejected": {k: v for k, v in rejected.items() if v},
                         "request_tokens": request_tokens, "answer_tokens": answer_tokens,
                         "seconds": round(time.perf_counter() - start, 4)}
                prog.write((json.dumps(entry) + "\n").encode("utf-8"))
                prog.flush()
                os.fsync(prog.fileno())
                totals.add(entry)
                batch += 1
                bar.update(len(records))
                done = totals.as_dict()
                bar.set_postfix(tok_s=done["tokens_per_second"], rejected=done["rejected_total"])
                _write_atomic(stats_path(output), json.dumps(stats(), indent=2) + "\n")
        bar.close()
    if accepted < args.n:
        stopped = "prompts exhausted" if prompts is not None and batch >= max_batches else "max_batches reached"
    result = stats()
    _write_atomic(stats_path(output), json.dumps(result, indent=2) + "\n")
    return result


def build_parser():
    from training.utils.parser import CommandParser

    return CommandParser(SynthesizeArguments, prog="python -m training.synthesize",
                         description="Write instruction-following chat data with an instruct teacher: it writes "
                         "the requests (Magpie) or answers --prompts; resumable, deterministic given --seed.")


@command
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        (args,) = parser.parse_or_exit(argv)  # a bad key exits 2 with one line; a bad value (ValueError) below
        result = synthesize(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"synthesize: error: {err}", file=sys.stderr)
        return 2
    rejected = ", ".join(f"{k} {v}" for k, v in result["rejected"].items() if v) or "none"
    print(f"synthesize: {result['records']} conversations in {result['output']} ({result['candidates']} candidates; "
          f"rejected: {rejected}); {result['generated_tokens']} tokens generated at {result['tokens_per_second']} "
          f"tokens/s; stats: {stats_path(result['output'])}"
          + (f"; stopped early: {result['stopped']}" if result["stopped"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

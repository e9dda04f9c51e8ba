"""Raw training records: finding input files and `datasets` ids, reading their records (JSONL, Parquet, text
paragraphs, Hub splits), normalising the accepted shapes (text, chat messages, prompt/response pairs) and
tokenizing one record with the training rules (text: every token trained; chat: assistant turns only).

The one reader of raw records: `iter_records` / `read_records` (and `read_normalized`) serve the student's
on-the-fly dataset (`training.data.build_dataset`), the teacher's finetuning (`training.finetune_teacher`), the
held-out evaluation (`training.evaluate`) and the TRL examples; `training.preprocess` plans its parallel work on
the same `discover_sources` / `records_from_lines`. So every path reads a file into the same records and tokens.
It imports nothing from the rest of the package.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

IGNORE_INDEX = -100  # the label of a token that is not trained on
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "text", ".md": "text"}
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                 "bot": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool", "ipython": "ipython"}
_PROMPT_KEYS = ("prompt", "instruction", "question", "query", "problem")
_RESPONSE_KEYS = ("response", "output", "completion", "answer", "solution")
_SHAPES_HINT = ('use one JSON object per line shaped like {"text": "..."}, '
                '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]} '
                'or {"prompt": "...", "response": "..."}')


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One input: a local file (kind jsonl | parquet | text) or a `datasets` id (kind hub)."""

    kind: str
    path: str
    split: str = "train"
    config: str | None = None


def _looks_like_hub_id(spec: str) -> bool:
    base = spec.split(":", 1)[0]
    return (
        not os.path.isabs(spec)
        and not spec.startswith(".")
        and os.path.splitext(base)[1].lower() not in EXTENSIONS
        and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base) is not None
    )


def discover_sources(inputs, recursive: bool = False, split: str = "train", config: str | None = None) -> list[Source]:
    """Expand files, folders (sorted; subfolders with `recursive`) and `datasets` ids into Sources."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no input given; pass --input with files, folders or a datasets id")
    out: list[Source] = []
    for spec in map(os.fspath, inputs):
        if os.path.isfile(spec):
            kind = EXTENSIONS.get(os.path.splitext(spec)[1].lower())
            if kind is None:
                raise ValueError(f"{spec}: unsupported file type; supported: {', '.join(sorted(EXTENSIONS))}")
            out.append(Source(kind, os.path.abspath(spec)))
        elif os.path.isdir(spec):
            found = []
            for root, dirs, files in os.walk(spec):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
                for name in sorted(files):
                    kind = EXTENSIONS.get(os.path.splitext(name)[1].lower())
                    if kind and not name.startswith("."):
                        found.append(Source(kind, os.path.abspath(os.path.join(root, name))))
            if not found:
                more = "" if recursive else " (add --recursive to include subfolders)"
                raise ValueError(f"{spec}: no {'/'.join(sorted(EXTENSIONS))} files in this folder{more}")
            out.extend(sorted(found, key=lambda s: s.path))
        elif _looks_like_hub_id(spec):
            name, _, spec_split = spec.partition(":")
            out.append(Source("hub", name, spec_split or split, config))
        else:
            raise FileNotFoundError(f"{spec}: no such file or folder (and not a datasets id like 'owner/name')")
    return out


def load_hub_split(src: Source):
    """The `datasets` split for a hub source; fails with a message naming the id when unreachable."""
    import datasets

    try:
        return datasets.load_dataset(src.path, src.config, split=src.split)
    except Exception as e:  # datasets raises many types for "not found / offline"
        raise ValueError(
            f"{src.path}: could not load split {src.split!r} with datasets.load_dataset ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); check the id, the network or HF_HUB_OFFLINE, or "
            "download it first with `python -m training.download_datasets`"
        ) from e


def decode_utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode the file as UTF-8") from e


def parse_json_line(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); {_SHAPES_HINT}") from e


def iter_lines(path: str, start: int, stop: int | None, first_line: int):
    """(line_no, raw bytes) for the lines in the byte range [start, stop)."""
    with open(path, "rb") as f:
        f.seek(start)
        offset, line_no = start, first_line
        for raw in f:
            if stop is not None and offset >= stop:
                break
            yield line_no, raw
            offset += len(raw)
            line_no += 1


def records_from_lines(src: Source, lines):
    """(where, record) pairs: one JSON object per non-blank line, or one text per paragraph."""
    if src.kind == "jsonl":
        for line_no, raw in lines:
            if raw.strip():
                where = f"{src.path}:{line_no}"
                yield where, parse_json_line(decode_utf8(raw, where), where)
        return
    para: list[str] = []
    para_line = 0
    for line_no, raw in lines:
        if raw.strip():
            if not para:
                para_line = line_no
            para.append(decode_utf8(raw, f"{src.path}:{line_no}"))
        elif para:
            yield f"{src.path}:{para_line}", {"text": "".join(para).rstrip("\r\n")}
            para = []
    if para:
        yield f"{src.path}:{para_line}", {"text": "".join(para).rstrip("\r\n")}


def iter_source_records(src: Source):
    """All (where, record) pairs of a local source, in order."""
    if src.kind in ("jsonl", "text"):
        yield from records_from_lines(src, iter_lines(src.path, 0, None, 1))
    elif src.kind == "parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(src.path).to_pylist()):
            yield f"{src.path} row {i}", row
    else:
        for i, row in enumerate(load_hub_split(src)):
            yield f"{src.path} row {i}", row


class HubRecords:
    """Rows of a `datasets` split as (where, record) pairs, read lazily (a large split is never listed)."""

    def __init__(self, ds, name: str):
        self.ds, self.name = ds, name

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return f"{self.name} row {i}", self.ds[int(i)]


def _specs(inputs) -> list[str]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return [os.path.expanduser(os.fspath(spec)) for spec in inputs]


def iter_records(inputs, recursive: bool = False, split: str = "train", config: str | None = None):
    """(where, record) for every record of `inputs` (files, folders of them, `datasets` ids), in order, as read:
    `where` names the file and line (or row) for error messages. A generator: stop early at no cost."""
    for src in discover_sources(_specs(inputs), recursive=recursive, split=split, config=config):
        yield from iter_source_records(src)


def read_records(inputs, recursive: bool = False, split: str = "train", config: str | None = None, *,
                 lazy_hub: bool = False, require_records: bool = False, validate: bool = False):
    """`iter_records` as a sequence. `lazy_hub`: a lone `datasets` id gives a lazily indexed `HubRecords` (and a
    mix of an id and local files is refused); `require_records`: an empty file is an error naming it;
    `validate`: every record's shape is checked now (`normalize_record`), naming file and line, not mid-training."""
    sources = discover_sources(_specs(inputs), recursive=recursive, split=split, config=config)
    if lazy_hub and any(src.kind == "hub" for src in sources):
        if len(sources) > 1:
            hub = next(src for src in sources if src.kind == "hub")
            raise ValueError(f"{hub.path}: mix of a datasets id and local files; give one id or local files only")
        return HubRecords(load_hub_split(sources[0]), sources[0].path)
    records: list = []
    for src in sources:
        count_before = len(records)
        records.extend(iter_source_records(src))
        if require_records and len(records) == count_before:
            raise ValueError(f"{src.path}: no records (the file is empty); remove it or add data")
    if validate:
        for where, obj in records:
            normalize_record(obj, where)
    return records


def read_normalized(inputs, **kwargs) -> list:
    """(where, record) with every record normalized (`("text", str)` or `("chat", messages)`), empty texts left out."""
    out = []
    for where, obj in iter_records(inputs, **kwargs):
        record = normalize_record(obj, where)
        if record is not None:
            out.append((where, record))
    return out


# ----------------------------------------------------------------------------- records -> tokens


def _normalize_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: message {j} is {type(m).__name__}, expected an object with role and content")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if not isinstance(role, str):
            raise ValueError(f"{where}: message {j} has no 'role' (or 'from') string")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {j} content is {type(content).__name__}; only text content is supported")
        out.append({"role": _ROLE_ALIASES.get(role.lower(), role), "content": content})
    if not any(m["role"] == "assistant" for m in out):
        roles = ", ".join(m["role"] for m in out)
        raise ValueError(
            f"{where}: conversation has no assistant turn (roles: {roles}); only assistant turns are trained, so "
            'a chat needs at least one message with role "assistant" (plain text goes in {"text": "..."})'
        )
    return out


def normalize_record(obj, where: str):
    """A record -> ("text", str) | ("chat", messages) | None (empty text, skipped). Accepts
    {"text"|"content"}, {"messages"|"conversations"} (role/content or ShareGPT from/value) and
    instruction pairs {"prompt"|"instruction"|"question"|... , "response"|"output"|"answer"|...}."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}; {_SHAPES_HINT}")
    for key in ("messages", "conversations", "conversation"):
        if key in obj:
            return "chat", _normalize_messages(obj[key], where)
    prompt_key = next((k for k in _PROMPT_KEYS if k in obj), None)
    response_key = next((k for k in _RESPONSE_KEYS if k in obj), None)
    if prompt_key and response_key:
        prompt, response = obj[prompt_key], obj[response_key]
        extra = obj.get("input") or obj.get("context")
        if not isinstance(prompt, str) or not isinstance(response, str) or (extra and not isinstance(extra, str)):
            raise ValueError(f"{where}: {prompt_key!r} and {response_key!r} must be strings")
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        return "chat", [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    for key in ("text", "content"):
        if key in obj:
            text = obj[key]
            if not isinstance(text, str):
                raise ValueError(f"{where}: {key!r} is {type(text).__name__}, expected a string")
            return ("text", text) if text.strip() else None
    keys = ", ".join(sorted(map(str, obj))) or "none"
    raise ValueError(f"{where}: record has no field this reader understands (keys: {keys}); {_SHAPES_HINT}")


def _assistant_mask_by_prefix(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    """For templates without {% generation %}: render growing prefixes of the conversation; an
    assistant turn's characters are those between "prefix + generation prompt" and "prefix + turn".
    Characters are mapped to tokens with the fast tokenizer's offsets."""
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        after = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (after.startswith(before) and full.startswith(after)):
            raise ValueError(
                f"{where}: the chat template of {name} does not render conversations prefix by prefix, so the "
                "assistant turns cannot be located; add {% generation %} ... {% endgeneration %} around the "
                "assistant content in the template"
            )
        spans.append((len(before), len(after)))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{where}: {name} is a slow tokenizer; assistant masking needs a fast tokenizer (offsets)")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= start < e for s, e in spans)) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def encode_record(record, tokenizer, where: str, append_eos: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a normalized record. Text: tokenizer special tokens (BOS) + EOS (unless
    `append_eos` is false: for teachers trained on BOS-separated text that never predict EOS, such as
    llama2.c's), every token trained. Chat: the chat template, labels only on assistant turns (-100 elsewhere)."""
    kind, payload = record
    if kind == "text":
        ids = list(tokenizer(payload, add_special_tokens=True)["input_ids"])
        eos = tokenizer.eos_token_id
        if append_eos and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids, list(ids)
    template = getattr(tokenizer, "chat_template", None)
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    if not template:
        raise ValueError(f"{where}: chat record, but {name} has no chat template; use an instruct tokenizer")
    if isinstance(template, str) and _GENERATION_RE.search(template):
        out = tokenizer.apply_chat_template(
            payload, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        ids, mask = _assistant_mask_by_prefix(tokenizer, payload, where)
    if not any(mask):
        raise ValueError(f"{where}: the chat template of {name} produced no assistant tokens; check its template")
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]

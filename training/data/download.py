"""Download the distillation curriculum as JSON lines that `training.preprocess` reads.

    python -m training.download_datasets --category instruction_chat --output data/distillation
    python -m training.download_datasets --dry-run                       # show the plan
    python -m training.download_datasets --local-root /mirror ...       # use local copies

Each category maps to public datasets loaded with `datasets.load_dataset` (streamed from the Hub,
so only `--max-samples` rows are fetched), converted to `{"messages": [...]}` (chat) or
`{"text": ...}` records and written to `<output>/<category>/<source>.jsonl` (atomic; finished
files are skipped on rerun). With `--local-root DIR`, a source whose id exists under DIR (e.g.
DIR/openai/gsm8k: data files or a `save_to_disk` folder) is read from there instead.

Every source is opened before anything is written: if any cannot be reached (HF_HUB_OFFLINE=1, no
network, unknown id) the command stops at once with a message naming each one.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from training.utils.errors import command
from training.utils.io import atomic_write_jsonl

_TRUE = ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class CurriculumSource:
    """One public dataset: how to load it and how its rows become records.
    format: "messages" (role/content list), "sharegpt" (from/value list), "pair" (fields = prompt,
    response[, extra context]) or "text" (fields = text field). Field names may be dotted paths
    into nested rows ("answers.text.0")."""

    name: str
    path: str
    format: str
    fields: tuple[str, ...]
    config: str | None = None
    split: str = "train"
    max_samples: int = 100_000


CATEGORIES: dict[str, list[CurriculumSource]] = {
    "instruction_chat": [
        CurriculumSource("ultrachat", "HuggingFaceH4/ultrachat_200k", "messages", ("messages",), split="train_sft"),
        CurriculumSource("openhermes", "teknium/OpenHermes-2.5", "sharegpt", ("conversations",)),
        CurriculumSource("dolly", "databricks/databricks-dolly-15k", "pair", ("instruction", "response", "context")),
        CurriculumSource("alpaca_gpt4", "vicgalle/alpaca-gpt4", "pair", ("instruction", "output", "input")),
    ],
    "code": [
        CurriculumSource("code_alpaca", "sahil2801/CodeAlpaca-20k", "pair", ("instruction", "output", "input")),
        CurriculumSource("magicoder_oss", "ise-uiuc/Magicoder-OSS-Instruct-75K", "pair", ("problem", "solution")),
    ],
    "math_reasoning": [
        CurriculumSource("gsm8k", "openai/gsm8k", "pair", ("question", "answer"), config="main"),
        CurriculumSource("metamath", "meta-math/MetaMathQA", "pair", ("query", "response")),
        CurriculumSource("orca_math", "microsoft/orca-math-word-problems-200k", "pair", ("question", "answer")),
        CurriculumSource("numina_cot", "AI-MO/NuminaMath-CoT", "messages", ("messages",)),
    ],
    "factual_qa": [
        CurriculumSource("squad_v2", "rajpurkar/squad_v2", "pair", ("question", "answers.text.0", "context")),
        CurriculumSource("trivia_qa", "mandarjoshi/trivia_qa", "pair", ("question", "answer.value"), config="rc.nocontext"),
    ],
    "general_web": [
        CurriculumSource("fineweb_edu", "HuggingFaceFW/fineweb-edu", "text", ("text",), config="sample-10BT"),
        CurriculumSource("wikipedia", "wikimedia/wikipedia", "text", ("text",), config="20231101.en"),
    ],
}


# ----------------------------------------------------------------------------- rows -> records


def _get(row, path: str):
    value = row
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def to_record(row: dict, source: CurriculumSource) -> dict | None:
    """A dataset row -> {"messages": [...]} / {"text": ...} (+ "source"), or None when unusable."""
    from training.data.records import _ROLE_ALIASES

    if source.format in ("messages", "sharegpt"):
        turns = _get(row, source.fields[0])
        if not isinstance(turns, list):
            return None
        role_key, content_key = ("role", "content") if source.format == "messages" else ("from", "value")
        messages = [{"role": _ROLE_ALIASES.get(str(t.get(role_key)).lower(), str(t.get(role_key))),
                     "content": t.get(content_key) or ""} for t in turns if isinstance(t, dict)]
        if not any(m["role"] == "assistant" for m in messages):
            return None
        return {"messages": messages, "source": source.name}
    if source.format == "pair":
        prompt, response = _get(row, source.fields[0]), _get(row, source.fields[1])
        if not isinstance(prompt, str) or not isinstance(response, str) or not prompt.strip() or not response.strip():
            return None
        extra = _get(row, source.fields[2]) if len(source.fields) > 2 else None
        if isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                "source": source.name}
    text = _get(row, source.fields[0])
    return {"text": text, "source": source.name} if isinstance(text, str) and text.strip() else None


# ----------------------------------------------------------------------------- opening sources


def hub_offline() -> bool:
    import huggingface_hub.constants as hf_constants

    env = any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return env or bool(hf_constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 5.0) -> str | None:
    """None when the Hub endpoint answers, else why not (one quick request, no retries)."""
    import httpx
    import huggingface_hub.constants as hf_constants

    try:
        httpx.head(hf_constants.ENDPOINT, timeout=timeout, follow_redirects=True)
        return None
    except httpx.HTTPError as e:
        return f"{hf_constants.ENDPOINT} did not answer ({type(e).__name__})"


def _local_copy(source: CurriculumSource, local_root: str | None) -> str | None:
    if local_root:
        candidate = os.path.join(local_root, source.path)
        if os.path.exists(candidate):
            return candidate
    return None


def open_source(source: CurriculumSource, local_root: str | None, offline: bool):
    """An iterable of rows for `source`; raises with the reason when it cannot be reached."""
    import datasets

    local = _local_copy(source, local_root)
    if local is not None:
        if os.path.isfile(os.path.join(local, "dataset_dict.json")) or os.path.isfile(os.path.join(local, "state.json")):
            loaded = datasets.load_from_disk(local)
        else:
            loaded = datasets.load_dataset(local)
        if isinstance(loaded, datasets.DatasetDict):
            split = source.split if source.split in loaded else "train" if "train" in loaded else None
            if split is None:
                raise ValueError(f"{local}: no split {source.split!r} or 'train' (has {', '.join(loaded)})")
            loaded = loaded[split]
        return loaded
    if offline:  # only what is already in the local datasets cache can be used
        return datasets.load_dataset(source.path, source.config, split=source.split)
    return datasets.load_dataset(source.path, source.config, split=source.split, streaming=True)


def _write_jsonl_atomic(rows, path: str, source: CurriculumSource, limit: int) -> tuple[int, int]:
    from tqdm.auto import tqdm

    skipped = 0

    def records():
        nonlocal skipped
        with tqdm(total=limit, desc=source.name, unit="rec") as bar:
            written = 0
            for row in rows:
                if written >= limit:
                    break
                record = to_record(row, source)
                if record is None:
                    skipped += 1
                    continue
                yield record
                written += 1
                bar.update(1)

    written = atomic_write_jsonl(path, records())
    return written, skipped


# ----------------------------------------------------------------------------- CLI


def select_sources(categories: list[str] | None, names: list[str] | None) -> list[tuple[str, CurriculumSource]]:
    chosen = categories or list(CATEGORIES)
    unknown = [c for c in chosen if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown category {', '.join(unknown)}; choose from {', '.join(CATEGORIES)}")
    picked = [(c, s) for c in chosen for s in CATEGORIES[c] if not names or s.name in names]
    missing = set(names or ()) - {s.name for _, s in picked}
    if missing:
        raise ValueError(f"unknown source {', '.join(sorted(missing))} in categories {', '.join(chosen)}")
    return picked


@dataclass
class DownloadArguments:
    """`python -m training.download_datasets`: every field is a flag (`_` or `-`) and a YAML key."""

    category: list[str] | None = field(default=None, metadata={"choices": list(CATEGORIES),
                                                               "help": "categories (default: all)"})
    sources: str | None = field(default=None, metadata={"help": "comma-separated source names to keep (see --dry-run)"})
    output: str = field(default="data/distillation", metadata={"help": "output folder"})
    local_root: str | None = field(default=None, metadata={
        "help": "folder with local copies laid out as <root>/<owner>/<name>"})
    max_samples: int | None = field(default=None, metadata={"help": "records per source (default: each source's target)"})
    skip_unreachable: bool = field(default=False, metadata={"help": "download what can be reached, warn about the rest"})
    force: bool = field(default=False, metadata={"help": "re-download files that already exist"})
    dry_run: bool = field(default=False, metadata={"help": "print the plan and exit"})


def build_parser():
    from training.utils.parser import CommandParser

    return CommandParser(
        DownloadArguments, prog="python -m training.download_datasets",
        description="Download the distillation curriculum (public datasets) as JSON lines for training.preprocess.",
    )


@command
def main(argv: list[str] | None = None) -> int:
    (args,) = build_parser().parse_or_exit(argv)

    try:
        picked = select_sources(args.category, args.sources.split(",") if args.sources else None)
    except ValueError as e:
        print(f"download_datasets: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for category, s in picked:
            where = _local_copy(s, args.local_root) or f"hub:{s.path}" + (f" ({s.config})" if s.config else "")
            target = os.path.join(args.output, category, f"{s.name}.jsonl")
            print(f"{category:17s} {s.name:14s} {where} [{s.split}] -> {target} (max {args.max_samples or s.max_samples})")
        return 0

    todo = [(c, s) for c, s in picked
            if args.force or not os.path.exists(os.path.join(args.output, c, f"{s.name}.jsonl"))]
    offline = hub_offline()
    needs_hub = [s for _, s in todo if _local_copy(s, args.local_root) is None]
    hub_down = hub_reachable() if needs_hub and not offline else None
    opened, failures = [], []
    for category, s in todo:  # open everything first: fail before writing anything
        if hub_down and _local_copy(s, args.local_root) is None:
            failures.append((s, hub_down))
            continue
        try:
            opened.append((category, s, open_source(s, args.local_root, offline)))
        except Exception as e:  # noqa: BLE001 - datasets raises many types; the reason is reported
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            failures.append((s, f"{type(e).__name__}: {reason}"))
    if failures:
        lines = "\n".join(f"  - {s.name}: {s.path}" + (f" ({s.config})" if s.config else "") + f": {why}"
                          for s, why in failures)
        how = ("HF_HUB_OFFLINE=1 is set and these are not in the local datasets cache; unset it, or pass "
               "--local-root with copies" if offline else "check the network and the ids, or pass --local-root with copies")
        print(f"download_datasets: {'warning' if args.skip_unreachable else 'error'}: could not reach "
              f"{len(failures)} source(s):\n{lines}\n{how}", file=sys.stderr)
        if not args.skip_unreachable:
            return 2
    for category, s, rows in opened:
        path = os.path.join(args.output, category, f"{s.name}.jsonl")
        written, skipped = _write_jsonl_atomic(rows, path, s, args.max_samples or s.max_samples)
        print(f"{path}: {written} records ({skipped} unusable rows skipped)")
    for category, s in picked:
        if (category, s) not in todo:
            print(f"{os.path.join(args.output, category, s.name + '.jsonl')}: exists, skipped (--force to redo)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Tokenize text and chat data into Parquet shards plus a manifest (format: docs/data_format.md).

    python -m training.preprocess --input data/distillation --recursive --output data/shards \
        --tokenizer meta-llama/Llama-3.2-1B-Instruct --max-seq-length 2048 --pack --num-proc 8

Why it is built this way:
- The input is cut into *units* (a fixed number of records of one file) before any work starts;
  unit i always becomes `shard-0000i.parquet`. Shards therefore do not depend on the number of
  processes or on the order units finish in, and a rerun after a crash skips every shard whose
  stored key (input bytes hash, tokenizer fingerprint, options) still matches: finished shards are
  not redone, and the result is byte-identical to an uninterrupted run.
- Every file is written to a temporary name in the same folder and then `os.replace`d, so a crash
  never leaves a half-written shard or manifest under its final name.
- Chat data is trained on assistant turns only: the chat template's `{% generation %}` markers give
  the assistant tokens when present; otherwise assistant spans are found by rendering the
  conversation prefix by prefix and mapping the character spans to tokens with offsets.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

from training.data.format import (
    ARROW_CACHE_DIRNAME,
    FORMAT_NAME,
    MANIFEST_NAME,
    SHARD_TEMPLATE,
    describe_tokenizer,
    read_manifest,
    shard_format_version,
)
from training.data.records import (  # noqa: F401  (normalize_record, encode_record, ...: also public here)
    _ROLE_ALIASES,
    EXTENSIONS,
    IGNORE_INDEX,
    Source,
    decode_utf8,
    discover_sources,
    encode_record,
    iter_lines,
    iter_source_records,
    load_hub_split,
    normalize_record,
    parse_json_line,
    records_from_lines,
)
from training.utils.checks import check_output_folder, no_empty_folder_left
from training.utils.errors import command
from training.utils.io import atomic_path, atomic_write_json, sha256_file

SHARD_METADATA_KEY = b"hf_retnet"
ROW_GROUP_SIZE = 1024
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")
_TMP_RE = re.compile(r"^\.(shard-\d{5,}\.parquet|manifest\.json)\.tmp-\d+$")


# ----------------------------------------------------------------------------- shard files


def write_shard(path: str, input_ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, metadata: dict,
                position_ids: np.ndarray | None = None) -> None:
    """Atomically write one shard. input_ids/labels (and position_ids, packed shards only): flat [sum(lengths)]
    int32; lengths: [N] int32."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError(f"{path}: {offsets[-1]} tokens in one shard; lower --shard-size")
    offsets_arr = pa.array(offsets.astype(np.int32))
    ids_col = pa.ListArray.from_arrays(offsets_arr, pa.array(np.asarray(input_ids, dtype=np.int32)))
    lab_col = pa.ListArray.from_arrays(offsets_arr, pa.array(np.asarray(labels, dtype=np.int32)))
    fields = [("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("length", pa.int32())]
    columns = [ids_col, lab_col, pa.array(lengths.astype(np.int32))]
    if position_ids is not None:
        fields.append(("position_ids", pa.list_(pa.int32())))
        columns.append(pa.ListArray.from_arrays(offsets_arr, pa.array(np.asarray(position_ids, dtype=np.int32))))
    schema = pa.schema(fields, metadata={SHARD_METADATA_KEY: json.dumps(metadata, sort_keys=True).encode("utf-8")})
    table = pa.Table.from_arrays(columns, schema=schema)
    with atomic_path(path, fsync=True) as tmp:  # `.<name>.tmp-<pid>`: what _TMP_RE recognises after a crash
        # token ids gain little from dictionary encoding and it triples the write time
        pq.write_table(table, tmp, compression="zstd", use_dictionary=False, row_group_size=ROW_GROUP_SIZE)


def read_shard_metadata(path: str) -> dict | None:
    """The JSON stored in a shard's Parquet metadata, or None if the file is missing or unreadable."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[SHARD_METADATA_KEY])
    except Exception:
        return None


def write_manifest(output: str, tokenizer_info: dict, options: dict, inputs: list[dict], num_shards: int) -> dict:
    """Collect every shard's stored stats and checksum into manifest.json (atomic write)."""
    shards, totals = [], {}
    for i in range(num_shards):
        name = SHARD_TEMPLATE.format(i)
        path = os.path.join(output, name)
        meta = read_shard_metadata(path)
        if meta is None:
            raise ValueError(f"{path}: missing or unreadable shard; re-run preprocessing")
        stats = meta["stats"]
        shards.append({"file": name, "num_bytes": os.path.getsize(path), "sha256": sha256_file(path), **stats})
        for k, v in stats.items():
            if isinstance(v, int):
                totals[k] = totals.get(k, 0) + v
    totals["num_shards"] = num_shards
    columns = {
        "input_ids": "list<int32> token ids",
        "labels": f"list<int32> same length; {IGNORE_INDEX} where not trained (labels are not shifted)",
        "length": "int32 number of tokens",
    }
    if options.get("pack"):
        columns["position_ids"] = ("list<int32> same length; position in its document, 0 where a document (or the "
                                   "part of one that continues from the previous block) starts")
    manifest = {
        "format": FORMAT_NAME,
        "format_version": shard_format_version(bool(options.get("pack"))),
        "tokenizer": tokenizer_info,
        "options": options,
        "columns": columns,
        "inputs": inputs,
        "shards": shards,
        "totals": totals,
    }
    atomic_write_json(os.path.join(output, MANIFEST_NAME), manifest, fsync=True, newline=True, sort_keys=True)
    return manifest


# ----------------------------------------------------------------------------- planning


@dataclass
class Unit:
    """Records [start, stop) of one source: byte offsets (jsonl, text), row groups (parquet) or
    rows (hub). Unit `index` becomes shard `index`."""

    index: int
    source: Source
    start: int
    stop: int
    first: int  # first line (1-based; jsonl/text) or first row (0-based; parquet/hub)
    last: int
    num_records: int
    content_sha256: str

    def location(self) -> dict:
        unit = "line" if self.source.kind in ("jsonl", "text") else "row"
        return {"path": self.source.path, f"first_{unit}": self.first, f"last_{unit}": self.last}


def _plan_lines(src: Source, shard_size: int) -> tuple[list[dict], dict]:
    """Cut a JSONL (one record per non-blank line) or text (one record per paragraph) file into
    ranges of `shard_size` records, hashing the bytes of each range."""
    paragraphs = src.kind == "text"
    units: list[dict] = []
    file_hash = hashlib.sha256()
    cur = None
    offset, line_no, prev_blank, num_records = 0, 0, True, 0
    with open(src.path, "rb") as f:
        for raw in f:
            line_no += 1
            file_hash.update(raw)
            blank = not raw.strip()
            if not blank and (not paragraphs or prev_blank):  # a record starts here
                if num_records == 0 and not paragraphs:  # catch "not JSON lines" before any work
                    where = f"{src.path}:{line_no}"
                    parse_json_line(decode_utf8(raw, where), where)
                if cur is not None and cur["num_records"] == shard_size:
                    cur["stop"] = offset
                    units.append(cur)
                    cur = None
                if cur is None:
                    cur = {"start": offset, "first": line_no, "num_records": 0, "hash": hashlib.sha256()}
                cur["num_records"] += 1
                num_records += 1
            if cur is not None:
                cur["hash"].update(raw)
                if not blank:
                    cur["last"] = line_no
            offset += len(raw)
            prev_blank = blank
    if cur is not None:
        cur["stop"] = offset
        units.append(cur)
    if num_records == 0:
        what = "file is empty" if offset == 0 else "file has only blank lines"
        raise ValueError(f"{src.path}: no records (the {what}); remove it from the input or add data")
    for u in units:
        u["content_sha256"] = u.pop("hash").hexdigest()
    return units, {"num_records": num_records, "num_bytes": offset, "sha256": file_hash.hexdigest()}


def _plan_parquet(src: Source, shard_size: int) -> tuple[list[dict], dict]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(src.path).metadata
    if meta.num_rows == 0:
        raise ValueError(f"{src.path}: no records (the Parquet file has 0 rows); remove it or add data")
    digest = sha256_file(src.path)
    units, group, rows, first = [], 0, 0, 0
    for g in range(meta.num_row_groups):
        rows += meta.row_group(g).num_rows
        if rows >= shard_size or g == meta.num_row_groups - 1:
            units.append({"start": group, "stop": g + 1, "first": first, "last": first + rows - 1,
                          "num_records": rows, "content_sha256": f"{digest}:{group}-{g + 1}"})
            group, first, rows = g + 1, first + rows, 0
    return units, {"num_records": meta.num_rows, "num_bytes": os.path.getsize(src.path), "sha256": digest}


def _plan_hub(src: Source, shard_size: int) -> tuple[list[dict], dict]:
    ds = load_hub_split(src)
    n = len(ds)
    if n == 0:
        raise ValueError(f"{src.path}: split {src.split!r} has no rows")
    fp = getattr(ds, "_fingerprint", None) or f"{src.path}:{src.split}:{n}"
    units = [{"start": s, "stop": min(s + shard_size, n), "first": s, "last": min(s + shard_size, n) - 1,
              "num_records": min(s + shard_size, n) - s, "content_sha256": f"{fp}:{s}"} for s in range(0, n, shard_size)]
    return units, {"num_records": n, "fingerprint": fp, "split": src.split, "config": src.config}


def plan_units(sources: list[Source], shard_size: int, progress: bool = True) -> tuple[list[Unit], list[dict]]:
    """Deterministic unit list for all sources, and the manifest's `inputs` entries."""
    from tqdm.auto import tqdm

    units: list[Unit] = []
    inputs = []
    for src in tqdm(sources, desc="planning", unit="file", disable=not progress or len(sources) < 2):
        planner = {"jsonl": _plan_lines, "text": _plan_lines, "parquet": _plan_parquet, "hub": _plan_hub}[src.kind]
        spans, info = planner(src, shard_size)
        for s in spans:
            units.append(Unit(index=len(units), source=src, **s))
        inputs.append({"kind": src.kind, "path": src.path, "num_shards": len(spans), **info})
    return units, inputs


# What a shard's tokens depend on besides input and tokenizer. `document_positions` is set only with --pack (how the
# position_ids column counts: "restart" = 0 at every document and at the start of every block); unpacked options
# leave it out, so their keys and manifests are what they were before it existed.
SHARD_OPTIONS = ("max_seq_length", "pack", "append_eos", "document_positions")
SHARD_OPTION_DEFAULTS = {"append_eos": True, "document_positions": None}  # for manifests written before each existed
DOCUMENT_POSITIONS = "restart"


def unit_key(unit: Unit, fingerprint: str, options: dict) -> dict:
    """Everything a shard's content depends on; a stored shard with this key is reused as is."""
    return {
        "format_version": shard_format_version(bool(options["pack"])),
        "tokenizer_fingerprint": fingerprint,
        "options": {k: options[k] for k in SHARD_OPTIONS if k in options},
        "source": asdict(unit.source),
        "range": [unit.start, unit.stop],
        "content_sha256": unit.content_sha256,
    }


# ----------------------------------------------------------------------------- workers


_WORKER: dict = {}


def _init_worker(tokenizer, options: dict, output: str, fingerprint: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER.update(tokenizer=tokenizer, options=options, output=output, fingerprint=fingerprint, hub={})


def _read_unit(unit: Unit):
    src = unit.source
    if src.kind in ("jsonl", "text"):
        yield from records_from_lines(src, iter_lines(src.path, unit.start, unit.stop, unit.first))
    elif src.kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(src.path).read_row_groups(list(range(unit.start, unit.stop)))
        for i, row in enumerate(table.to_pylist()):
            yield f"{src.path} row {unit.first + i}", row
    else:
        ds = _WORKER["hub"].get(src) or _WORKER["hub"].setdefault(src, load_hub_split(src))
        for i, row in enumerate(ds.select(range(unit.start, unit.stop))):
            yield f"{src.path} row {unit.first + i}", row


def _cut_block(pieces: list[int], size: int) -> tuple[list[int], list[int]]:
    """Split the lengths of the document pieces in a packing buffer into the first `size` tokens' pieces and the
    rest; a piece that crosses the cut becomes two, the second starting the rest (its positions start over)."""
    block, total = [], 0
    for i, n in enumerate(pieces):
        if total + n >= size:
            block.append(size - total)
            rest = [n - (size - total)] if n > size - total else []
            return block, rest + pieces[i + 1:]
        block.append(n)
        total += n
    return block, []


def _document_positions(pieces: list[int]) -> list[int]:
    """position_ids of a packed row made of document pieces of these lengths: 0, 1, ... within each piece."""
    return [p for n in pieces for p in range(n)]


def process_unit(unit: Unit) -> tuple[int, int]:
    """Tokenize one unit and write its shard; returns (unit index, records read)."""
    tokenizer, options = _WORKER["tokenizer"], _WORKER["options"]
    max_len, pack = options["max_seq_length"], options["pack"]
    stats = {"num_records": 0, "num_skipped_empty": 0, "num_truncated": 0, "num_dropped_no_labels": 0}
    seqs: list[tuple[list[int], list[int]]] = []
    positions: list[list[int]] = []  # packed: each sequence's position_ids
    buf_ids: list[int] = []
    buf_labels: list[int] = []
    buf_pieces: list[int] = []  # packed: lengths of the (parts of) documents in the buffer, in order
    for where, obj in _read_unit(unit):
        stats["num_records"] += 1
        record = normalize_record(obj, where)
        if record is None:
            stats["num_skipped_empty"] += 1
            continue
        ids, labels = encode_record(record, tokenizer, where, append_eos=options["append_eos"])
        if pack:
            buf_ids += ids
            buf_labels += labels
            buf_pieces.append(len(ids))
            while len(buf_ids) >= max_len:
                block, buf_pieces = _cut_block(buf_pieces, max_len)
                seqs.append((buf_ids[:max_len], buf_labels[:max_len]))
                positions.append(_document_positions(block))
                buf_ids, buf_labels = buf_ids[max_len:], buf_labels[max_len:]
            continue
        if max_len is not None and len(ids) > max_len:
            stats["num_truncated"] += 1
            ids, labels = ids[:max_len], labels[:max_len]
            if all(lab == IGNORE_INDEX for lab in labels):
                stats["num_dropped_no_labels"] += 1
                continue
        seqs.append((ids, labels))
    if buf_ids:
        seqs.append((buf_ids, buf_labels))
        positions.append(_document_positions(buf_pieces))

    lengths = np.array([len(s[0]) for s in seqs], dtype=np.int32)  # [N]
    flat_ids = np.array([t for s in seqs for t in s[0]], dtype=np.int32)  # [sum(lengths)]
    flat_labels = np.array([t for s in seqs for t in s[1]], dtype=np.int32)  # [sum(lengths)]
    stats.update(
        num_sequences=len(seqs),
        num_tokens=int(lengths.sum()),
        num_label_tokens=int((flat_labels != IGNORE_INDEX).sum()),
        source=unit.location(),
    )
    flat_positions = None
    if pack:
        flat_positions = np.array([p for row in positions for p in row], dtype=np.int32)  # [sum(lengths)]
    metadata = {"key": unit_key(unit, _WORKER["fingerprint"], options), "stats": stats}
    path = os.path.join(_WORKER["output"], SHARD_TEMPLATE.format(unit.index))
    write_shard(path, flat_ids, flat_labels, lengths, metadata, position_ids=flat_positions)
    return unit.index, unit.num_records


# ----------------------------------------------------------------------------- the pipeline


def _prepare_output(output: str, overwrite: bool, info: dict, options: dict) -> None:
    os.makedirs(output, exist_ok=True)
    names = os.listdir(output)
    if overwrite:
        for name in names:
            if _SHARD_RE.match(name) or _TMP_RE.match(name) or name == MANIFEST_NAME:
                os.unlink(os.path.join(output, name))
        shutil.rmtree(os.path.join(output, ARROW_CACHE_DIRNAME), ignore_errors=True)
        return
    for name in names:  # leftovers of a crashed run: never complete files
        if _TMP_RE.match(name):
            os.unlink(os.path.join(output, name))
    manifest_path = os.path.join(output, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        old = read_manifest(output)
        if old["tokenizer"]["fingerprint"] != info["fingerprint"]:
            raise ValueError(
                f"{manifest_path}: {output} already holds shards made with tokenizer "
                f"{old['tokenizer'].get('name_or_path')} (fingerprint {old['tokenizer']['fingerprint']}), but "
                f"--tokenizer {info['name_or_path']} has fingerprint {info['fingerprint']}; use a new --output "
                "folder or pass --overwrite"
            )
        for k in SHARD_OPTIONS:
            made_with = old.get("options", {}).get(k, SHARD_OPTION_DEFAULTS.get(k))
            if made_with != options.get(k):
                why = (" (packed shards of a version without document boundaries)"
                       if k == "document_positions" and made_with is None else "")
                raise ValueError(
                    f"{manifest_path}: {output} was made with {k}={made_with!r}, not "
                    f"{options.get(k)!r}{why}; use a new --output folder or pass --overwrite"
                )


def preprocess(
    inputs,
    output: str | os.PathLike,
    tokenizer,
    *,
    recursive: bool = False,
    max_seq_length: int | None = None,
    pack: bool = False,
    append_eos: bool = True,
    num_proc: int = 1,
    shard_size: int = 10000,
    split: str = "train",
    dataset_config: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into `output` (resuming a previous run there) and return the manifest."""
    from tqdm.auto import tqdm

    check_output_folder(output, "--output")
    if pack and not max_seq_length:
        raise ValueError("--pack needs --max-seq-length (the length packed sequences are cut to)")
    if max_seq_length is not None and max_seq_length < 2:
        raise ValueError(f"--max-seq-length must be >= 2, got {max_seq_length}")
    if shard_size < 1 or num_proc < 1:
        raise ValueError(f"--shard-size and --num-proc must be >= 1, got {shard_size} and {num_proc}")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        from training.converters.gguf import resolve_pretrained

        tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(os.fspath(tokenizer)))  # .gguf: converted once
    output = os.path.abspath(os.fspath(output))
    info = describe_tokenizer(tokenizer)
    options = {"max_seq_length": max_seq_length, "pack": bool(pack), "append_eos": bool(append_eos),
               "shard_size": shard_size}
    if pack:
        options["document_positions"] = DOCUMENT_POSITIONS

    sources = discover_sources(inputs, recursive=recursive, split=split, config=dataset_config)
    sources = [s for s in sources if s.kind == "hub" or not s.path.startswith(output + os.sep)]  # not our own shards
    if not sources:
        raise ValueError(f"no input files outside the output folder {output}")
    _prepare_output(output, overwrite, info, options)
    units, input_info = plan_units(sources, shard_size, progress)

    done = []
    for u in units:
        meta = read_shard_metadata(os.path.join(output, SHARD_TEMPLATE.format(u.index)))
        done.append(meta is not None and meta.get("key") == unit_key(u, info["fingerprint"], options))
    pending = [u for u, ok in zip(units, done) if not ok]
    stale = [n for n in os.listdir(output) if (m := _SHARD_RE.match(n)) and int(m.group(1)) >= len(units)]
    if pending or stale:  # the folder is about to change: no reader may trust the old manifest
        if os.path.exists(os.path.join(output, MANIFEST_NAME)):
            os.unlink(os.path.join(output, MANIFEST_NAME))
        for name in stale:
            os.unlink(os.path.join(output, name))

    total = sum(u.num_records for u in units)
    bar = tqdm(total=total, desc="tokenizing", unit="rec", disable=not progress)
    bar.update(sum(u.num_records for u, ok in zip(units, done) if ok))
    init_args = (tokenizer, options, output, info["fingerprint"])
    try:
        if num_proc == 1 or len(pending) <= 1:
            _init_worker(*init_args)
            for u in pending:
                bar.update(process_unit(u)[1])
        else:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            ctx = mp.get_context(method)
            with ctx.Pool(min(num_proc, len(pending)), initializer=_init_worker, initargs=init_args) as pool:
                for _, n in pool.imap_unordered(process_unit, pending, chunksize=1):
                    bar.update(n)
    finally:
        bar.close()
    return write_manifest(output, info, options, input_info, len(units))


# ----------------------------------------------------------------------------- CLI


@dataclass
class PreprocessArguments:
    input: list[str] = field(metadata={"help": "JSONL/JSON-lines, Parquet or text files, folders of them, or a "
                                               "datasets id (owner/name or owner/name:split)", "nargs": "+"})
    output: str = field(metadata={"help": "folder for the shards and manifest.json (a rerun resumes there)"})
    tokenizer: str = field(metadata={"help": "tokenizer folder, Hub id or Llama .gguf file (the teacher's)"})
    recursive: bool = field(default=False, metadata={"help": "include files in subfolders of input folders"})
    max_seq_length: int | None = field(default=None, metadata={"help": "truncate (or, with --pack, cut) to this length"})
    pack: bool = field(default=False, metadata={"help": "concatenate records and cut into max-seq-length blocks"})
    append_eos: bool = field(default=True, metadata={"help": "end each text record with EOS (false for teachers "
                                                             "trained on BOS-separated text, e.g. llama2.c's)"})
    num_proc: int = field(default=1, metadata={"help": "worker processes"})
    shard_size: int = field(default=10000, metadata={"help": "input records per shard"})
    split: str = field(default="train", metadata={"help": "split for datasets ids"})
    dataset_config: str | None = field(default=None, metadata={"help": "config name for datasets ids"})
    overwrite: bool = field(default=False, metadata={"help": "delete shards and manifest already in --output"})


def build_parser():
    """`python -m training.preprocess`'s parser (every PreprocessArguments field as a flag and a YAML key)."""
    from training.utils.parser import CommandParser

    return CommandParser(PreprocessArguments, prog="python -m training.preprocess",
                         description="Tokenize text/chat data into Parquet shards + manifest.json (docs/data_format.md).")


@command
def main(argv: list[str] | None = None) -> int:
    (args,) = build_parser().parse_or_exit(argv)
    try:
        kwargs = {k: v for k, v in asdict(args).items() if k != "input"}
        with no_empty_folder_left(args.output):  # a mistake found while reading leaves no empty folder behind
            manifest = preprocess(args.input, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    t = manifest["totals"]
    print(f"wrote {t['num_shards']} shards: {t['num_sequences']} sequences, {t['num_tokens']} tokens "
          f"({t['num_label_tokens']} trained) from {t['num_records']} records to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m training.cache_teacher_logits`: run the teacher once over a dataset and store its top-k next-token
distribution in a cache folder (format: docs/cache_format.md) that `CachedTeacher` trains from.

Why: cached mode trains without a teacher in memory and replays exactly the same teacher answers every run.

The sequences are split into shards by a fixed token budget in data order, so the split depends only on the
data and the settings. Shard i is produced by process i % world_size (under `accelerate launch` every process
writes its own shards) and written atomically; a rerun after a crash skips shards already on disk and
checks that they were made with the same settings, so the final folder is byte-identical to an
uninterrupted run. The main process writes `manifest.json` last: a folder without it is unfinished.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from training.teachers.cache.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    KEY_SCHEME,
    MANIFEST_NAME,
    canonical_json,
    data_fingerprint,
    make_encoding,
    open_shard,
    read_shard_header,
    sequence_key,
    sha256_hex,
    shard_bytes,
    shard_name,
    tokenizer_fingerprint,
    write_manifest,
)
from training.utils.checks import no_empty_folder_left
from training.utils.errors import command
from training.utils.io import atomic_write_bytes, sha256_file

# ----------------------------------------------------------------------------------------------------------
# Input sequences


class SequenceSource:
    """Token sequences, random access, truncated to `max_seq_length`: `lengths` [n] and `get(i)` -> int array;
    `positions(i)` -> the position_ids of a packed row (where its documents start), or None."""

    def __init__(self, getter, lengths: np.ndarray, description: str, fingerprint: str, positions=None):
        self._get, self.lengths, self.description, self.fingerprint = getter, lengths, description, fingerprint
        self._positions = positions

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def get(self, index: int) -> np.ndarray:
        return np.asarray(self._get(index), dtype=np.int64)[: int(self.lengths[index])]

    def positions(self, index: int) -> np.ndarray | None:
        if self._positions is None:
            return None
        found = self._positions(index)
        return None if found is None else np.asarray(found, dtype=np.int64)[: int(self.lengths[index])]


def concat_sources(sources: list[SequenceSource]) -> SequenceSource:
    """Several inputs (e.g. train and eval data) as one sequence list, in the order given."""
    if len(sources) == 1:
        return sources[0]
    starts = np.cumsum([0] + [len(s) for s in sources])

    def get(i: int):
        j = int(np.searchsorted(starts, i, side="right") - 1)
        return sources[j].get(i - int(starts[j]))

    def positions(i: int):
        j = int(np.searchsorted(starts, i, side="right") - 1)
        return sources[j].positions(i - int(starts[j]))

    lengths = np.concatenate([s.lengths for s in sources])
    return SequenceSource(get, lengths, " + ".join(s.description for s in sources),
                          sha256_hex(canonical_json([s.fingerprint for s in sources])), positions)


def _list_array_source(column, description: str, max_len: int | None, fingerprint: str) -> SequenceSource:
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = column.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    values = column.values.to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets)
    if max_len:
        lengths = np.minimum(lengths, max_len)
    return SequenceSource(lambda i: values[offsets[i] : offsets[i + 1]], lengths, description, fingerprint)


def open_sequences(spec: str, tokenizer=None, max_seq_length: int | None = None) -> SequenceSource:
    """The sequences to cache, exactly as the trainer will see them (same truncation, never shuffled).

    Parquet / JSONL files (or a folder of Parquet files) that already hold an `input_ids` column are read
    directly; everything else (a shard folder from `training.preprocess`, text/chat JSONL, a `datasets` id)
    goes through `training.data.build_dataset`, the trainer's own reader."""
    path = os.path.expanduser(spec)
    direct = _pretokenized_files(path)
    if direct is not None:
        return _read_pretokenized(direct, path, max_seq_length)
    try:
        from training.data.shards import build_dataset
    except ImportError as err:
        raise ValueError(f"--data {spec!r}: reading it needs training.data ({err}); give Parquet/JSONL files "
                         "with an 'input_ids' column instead") from None
    if tokenizer is None:
        raise ValueError(f"--data {spec!r} needs a tokenizer to be read")
    dataset = build_dataset(spec, tokenizer, max_seq_length, shuffle=False)
    if hasattr(dataset, "lengths"):
        lengths = np.asarray(dataset.lengths, dtype=np.int64)
    else:
        lengths = np.array([len(dataset[i]["input_ids"]) for i in range(len(dataset))], dtype=np.int64)
    fingerprint = data_fingerprint(path) if os.path.exists(path) else sha256_hex(f"datasets:{spec}")
    # packed shards: the teacher reads each document of a row alone, as the trainer's batches will ask
    positions = (lambda i: dataset[i]["position_ids"]) if getattr(dataset, "has_position_ids", False) else None
    return SequenceSource(lambda i: dataset[i]["input_ids"], lengths, spec, fingerprint, positions)


def _pretokenized_files(path: str) -> list[str] | None:
    """The Parquet/JSONL files at `path` when they carry `input_ids` (and `path` is no preprocess shard folder)."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
            return None  # a shard folder: the data engineer's reader handles it (manifest checks, filtering)
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    elif os.path.isfile(path) and path.endswith((".parquet", ".jsonl")):
        files = [path]
    else:
        return None
    if not files:
        return None
    if files[0].endswith(".parquet"):
        import pyarrow.parquet as pq

        return files if all("input_ids" in pq.read_schema(f).names for f in files) else None
    with open(files[0], encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        return files if "input_ids" in json.loads(first) else None
    except (json.JSONDecodeError, TypeError):
        return None


def _read_pretokenized(files: list[str], path: str, max_seq_length: int | None) -> SequenceSource:
    fingerprint = data_fingerprint(path)
    if files[0].endswith(".jsonl"):
        rows = []
        with open(files[0], encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(np.asarray(json.loads(line)["input_ids"], dtype=np.int64))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                    raise ValueError(f"{files[0]}:{line_no}: expected a JSON object with an 'input_ids' list of "
                                     f"ints ({err!r})") from None
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        if max_seq_length:
            lengths = np.minimum(lengths, max_seq_length)
        return SequenceSource(rows.__getitem__, lengths, path, fingerprint)
    import pyarrow as pa
    import pyarrow.parquet as pq

    chunks = []
    for f in files:
        chunks.extend(pq.read_table(f, columns=["input_ids"], memory_map=True).column("input_ids").chunks)
    return _list_array_source(pa.chunked_array(chunks), path, max_seq_length, fingerprint)


def plan_shards(lengths: np.ndarray, shard_tokens: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) sequence ranges holding about `shard_tokens` tokens each (at least one)."""
    plan, start, total = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        total += n
        if total >= shard_tokens:
            plan.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(lengths):
        plan.append((start, len(lengths)))
    return plan


# ----------------------------------------------------------------------------------------------------------
# Teacher identity


def _folder_revision(folder: str, full_hash_limit: int = 8 << 30) -> str:
    """A content fingerprint of a local model folder: sha256 of config + weights (size + mtime above 8 GiB)."""
    files = sorted(
        f for f in glob.glob(os.path.join(folder, "*"))
        if f.endswith((".json", ".safetensors", ".model", ".txt")) and os.path.isfile(f)
    )
    total = sum(os.path.getsize(f) for f in files)
    if total <= full_hash_limit:
        listing = [(os.path.basename(f), sha256_file(f)) for f in files]
        return "sha256:" + sha256_hex(canonical_json(listing))
    listing = [(os.path.basename(f), os.path.getsize(f), int(os.path.getmtime(f))) for f in files]
    return "size-mtime:" + sha256_hex(canonical_json(listing))


def teacher_identity(model_id: str | None, adapter: str | None, model=None) -> dict:
    """id and revision (Hub commit, or a content hash of a local folder) of the teacher and its adapter."""
    from training.converters.gguf import gguf_sha256, is_gguf_path

    out = {"id": model_id, "revision": None, "adapter": adapter, "adapter_revision": None}
    if model_id and os.path.isdir(model_id):
        out["revision"] = _folder_revision(model_id)
    elif model_id and is_gguf_path(model_id) and os.path.isfile(os.path.expanduser(model_id)):
        out["revision"] = "sha256:" + gguf_sha256(model_id)  # the .gguf file itself
    elif model is not None:
        out["revision"] = getattr(model.config, "_commit_hash", None)
    if adapter and os.path.isdir(adapter):
        out["adapter_revision"] = _folder_revision(adapter)
    return out


# ----------------------------------------------------------------------------------------------------------
# Producing one shard


def produce_shard(source, sequences: SequenceSource, start: int, end: int, encoding, k: int, temperature: float,
                  batch_size: int, progress=None) -> tuple[dict, list[bytes], int]:
    """Run the teacher over sequences [start, end) and encode them. Batches are formed from the shard alone
    (longest first), so a rerun sends the teacher exactly the same batches. A packed row (with position_ids) is
    answered document by document: what the trainer gets for it is what each document alone gets.
    -> (arrays, keys, tokens)."""
    rows = [sequences.get(i) for i in range(start, end)]
    row_positions = [sequences.positions(i) for i in range(start, end)]
    order = sorted(range(len(rows)), key=lambda r: (-len(rows[r]), r))
    staged = [None] * len(rows)
    for b0 in range(0, len(order), batch_size):
        batch = order[b0 : b0 + batch_size]
        width = max(len(rows[r]) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T] right padded
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        packed = any(row_positions[r] is not None for r in batch)
        positions = torch.zeros(len(batch), width, dtype=torch.long) if packed else None
        for j, r in enumerate(batch):
            ids[j, : len(rows[r])] = torch.from_numpy(np.array(rows[r], dtype=np.int64))
            mask[j, : len(rows[r])] = 1
            if packed:
                pos = row_positions[r] if row_positions[r] is not None else np.arange(len(rows[r]))
                positions[j, : len(rows[r])] = torch.from_numpy(np.array(pos, dtype=np.int64))
        out = source.topk(ids, mask, k, temperature, **({"position_ids": positions} if packed else {}))
        out.validate(len(batch), width, k)
        token_ids, logprobs = out.token_ids.cpu().numpy(), out.logprobs.cpu().float().numpy()  # [B, T, k]
        for j, r in enumerate(batch):
            n = len(rows[r])
            staged[r] = encoding.encode(token_ids[j, :n], logprobs[j, :n])
        if progress is not None:
            progress.update(int(mask.sum()))
    arrays, entry_counts = encoding.pack(staged)
    keys = [sequence_key(r) for r in rows]
    lengths = np.array([len(r) for r in rows], dtype="<i4")
    arrays["keys"] = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16)
    arrays["lengths"] = lengths
    arrays["token_offsets"] = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype("<i8")
    arrays["entry_offsets"] = np.concatenate([[0], np.cumsum(entry_counts)]).astype("<i8")
    return arrays, keys, int(lengths.sum())


def _keys_digest(keys: list[bytes]) -> str:
    return sha256_hex(b"".join(keys))


def _existing_shard_ok(path: str, settings_fp: str, keys_digest: str) -> bool:
    """True when `path` is a finished shard of this very run (same settings, same sequences); raises when it
    belongs to another run, so a folder is never silently mixed."""
    if not os.path.exists(path):
        return False
    try:
        _, metadata, _ = read_shard_header(path)
    except ValueError:
        return False  # torn by something other than us (we only os.replace whole files): redo it
    if metadata.get("settings_fingerprint") != settings_fp:
        raise ValueError(
            f"{path} was made with other settings (teacher, tokenizer, data, k, temperature, encoding or shard "
            "size differ). Write to a new --output folder, or delete that folder to rebuild it."
        )
    return metadata.get("keys_digest") == keys_digest


def _clean_temporaries(folder: str) -> None:
    """Remove our own partial files (`.shard-*.tmp-<pid>`) left by a killed run."""
    for tmp in glob.glob(os.path.join(folder, ".shard-*.safetensors.tmp-*")) + glob.glob(
        os.path.join(folder, f".{MANIFEST_NAME}.tmp-*")
    ):
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass


# ----------------------------------------------------------------------------------------------------------
# CLI


@dataclass
class CacheArguments:
    """`python -m training.cache_teacher_logits` (hf-retnet cache): every field is a flag (`_` or `-`) and a YAML key."""

    data: list[str] = field(metadata={"help": "the training (and eval) data exactly as the config names it: a shard "
                                      "folder from `training.preprocess`, a JSONL / Parquet / text file or a datasets "
                                      "id; Parquet/JSONL with an input_ids column are taken as already tokenized. "
                                      "Several may be given."})
    output: str = field(metadata={"help": "cache folder to write (created; resumed if it exists)"})
    teacher: str | None = field(default=None, metadata={
        "help": "teacher folder, Hub id or Llama .gguf file (also the default tokenizer)"})
    adapter: str | None = field(default=None, metadata={"help": "optional peft adapter folder merged into the teacher"})
    teacher_url: str | None = field(default=None, metadata={
        "help": "use a running `training.serve_teacher` (or vLLM) server as the producer instead"})
    teacher_api_key: str | None = field(default=None, metadata={
        "help": "API key for --teacher-url (default: the TEACHER_API_KEY environment variable)"})
    teacher_connect_timeout: float = field(default=10.0, metadata={
        "help": "seconds a refused connection to --teacher-url (nothing listening) is retried before giving up"})
    teacher_startup_timeout: float = field(default=600.0, metadata={
        "help": "seconds to wait for a --teacher-url server that answers but is still starting"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder or id (default: --teacher)"})
    topk: int = field(default=512, metadata={"help": "entries per position"})
    temperature: float = field(default=1.0, metadata={"help": "teacher softening temperature"})
    batch_size: int = field(default=8, metadata={"help": "sequences per teacher forward"})
    max_seq_length: int | None = field(default=None, metadata={
        "help": "truncate sequences like the trainer does (use the training config's max_seq_length)"})
    encoding: str = field(default="compact", metadata={
        "help": "naive (int32 ids + fp16 log-probs, 6 bytes per entry) or compact[:mass=M,bits=B]: the entries "
        "holding M of the top-k mass (default 0.99), log-probs in B bits (default 4), Rice-coded id gaps (default: "
        "compact; see docs/cache_format.md)"})
    shard_tokens: int = field(default=32768, metadata={"help": "tokens per shard"})
    dtype: str = field(default="auto", metadata={"help": "teacher dtype: auto, float32, bfloat16, float16"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bar"})


def build_parser():
    from training.utils.parser import CommandParser

    return CommandParser(
        CacheArguments, prog="python -m training.cache_teacher_logits",
        description="Store a teacher's top-k next-token log-probabilities for a dataset in a cache folder "
        "(docs/cache_format.md) for `teacher_source: cached`. Resumable: rerun the same command after a crash.",
    )


def _validate_args(args) -> None:
    if args.teacher is None and args.teacher_url is None:
        raise ValueError("give --teacher <folder or Hub id> or --teacher-url <server>")
    if args.topk < 1:
        raise ValueError(f"--topk {args.topk} must be >= 1")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise ValueError(f"--temperature {args.temperature} must be a finite number > 0")
    if args.batch_size < 1 or args.shard_tokens < 1:
        raise ValueError("--batch-size and --shard-tokens must be >= 1")
    if args.max_seq_length is not None and args.max_seq_length < 1:
        raise ValueError(f"--max-seq-length {args.max_seq_length} must be >= 1")
    if args.tokenizer is None and args.teacher is None:
        raise ValueError("with --teacher-url, give --tokenizer (or --teacher) so the cache records the tokenizer")


def _build_producer(args, device):
    if args.teacher_url:
        from training.teachers.network import NetworkTeacher

        return NetworkTeacher(args.teacher_url, api_key=args.teacher_api_key,
                              startup_timeout=args.teacher_startup_timeout,
                              connect_grace=args.teacher_connect_timeout), None
    from training.teachers.direct import DirectTeacher

    teacher = DirectTeacher(args.teacher, adapter=args.adapter, dtype=args.dtype, device=device)
    return teacher, teacher.model


@command
def main(argv=None) -> int:
    (args,) = build_parser().parse_or_exit(argv)
    _validate_args(args)
    with no_empty_folder_left(args.output):  # a mistake found later (e.g. --topk > vocabulary) leaves no empty folder
        return _build(args)


def _build(args) -> int:
    from accelerate import PartialState
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    state = PartialState()
    rank, world = state.process_index, state.num_processes
    from training.converters.gguf import resolve_pretrained

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(args.tokenizer or args.teacher))
    inputs = [open_sequences(spec, tokenizer, args.max_seq_length) for spec in args.data]
    for spec, source in zip(args.data, inputs):
        if len(source) == 0:
            raise ValueError(f"--data {spec!r} holds no sequences")
    sequences = concat_sources(inputs)
    plan = plan_shards(sequences.lengths, args.shard_tokens)
    os.makedirs(args.output, exist_ok=True)
    if state.is_main_process:
        _clean_temporaries(args.output)
    state.wait_for_everyone()

    source, model = _build_producer(args, state.device)
    vocab_size = int(source.vocab_size)
    if args.topk > vocab_size:
        raise ValueError(f"--topk {args.topk} is larger than the teacher's vocabulary ({vocab_size})")
    encoding = make_encoding(args.encoding, args.topk, vocab_size)
    teacher = teacher_identity(args.teacher, args.adapter, model)
    teacher.update(vocab_size=vocab_size, url=args.teacher_url)
    if teacher["id"] is None:  # a server and no --teacher: record the server
        teacher["id"] = args.teacher_url
    settings = {
        "format_version": FORMAT_VERSION,
        "teacher": teacher,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "topk": args.topk,
        "temperature": args.temperature,
        "encoding": encoding.spec,
        "data": {"fingerprint": sequences.fingerprint, "max_seq_length": args.max_seq_length,
                 "sources": [{"path": src.description, "fingerprint": src.fingerprint, "num_sequences": len(src),
                              "num_tokens": int(src.lengths.sum())} for src in inputs]},
        "shard_tokens": args.shard_tokens,
    }
    settings_fp = sha256_hex(canonical_json(settings))

    mine = [s for s in range(len(plan)) if s % world == rank]
    todo = []
    for s in mine:
        start, end = plan[s]
        digest = _keys_digest([sequence_key(sequences.get(i)) for i in range(start, end)])
        if not _existing_shard_ok(os.path.join(args.output, shard_name(s)), settings_fp, digest):
            todo.append(s)
    total = int(sum(sequences.lengths[plan[s][0] : plan[s][1]].sum() for s in todo))
    with tqdm(total=total, unit="tok", unit_scale=True, desc=f"caching (rank {rank}: {len(todo)}/{len(mine)} "
              "shards to do)", disable=args.no_progress, dynamic_ncols=True) as bar:
        for s in todo:
            start, end = plan[s]
            arrays, keys, tokens = produce_shard(source, sequences, start, end, encoding, args.topk,
                                                 args.temperature, args.batch_size, bar)
            metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "shard_index": str(s),
                        "settings_fingerprint": settings_fp, "keys_digest": _keys_digest(keys),
                        "encoding": canonical_json(encoding.spec), "topk": str(args.topk)}
            atomic_write_bytes(os.path.join(args.output, shard_name(s)), shard_bytes(arrays, metadata))
    state.wait_for_everyone()
    if state.is_main_process:
        manifest = build_manifest(args.output, plan, settings, settings_fp, sequences)
        write_manifest(args.output, manifest)
        per_token = manifest["totals"]["bytes_per_token"]
        print(f"wrote {args.output}: {len(plan)} shards, {manifest['totals']['num_tokens']} tokens, "
              f"{per_token:.1f} bytes/token ({encoding.spec['name']})", file=sys.stderr)
    return 0


def build_manifest(folder: str, plan, settings: dict, settings_fp: str, sequences: SequenceSource) -> dict:
    """Describe every shard (checksums and counts read back from the files) after all processes finished."""
    shards, tokens, seqs, size = [], 0, 0, 0
    encoding = make_encoding(settings["encoding"], settings["topk"], settings["teacher"]["vocab_size"])
    for s in range(len(plan)):
        path = os.path.join(folder, shard_name(s))
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing after all processes finished; rerun the same command")
        arrays, metadata = open_shard(path)
        if metadata.get("settings_fingerprint") != settings_fp:
            raise ValueError(f"{path} was made with other settings; write to a new --output folder")
        n_tok = int(arrays["token_offsets"][-1])
        entry = {"file": shard_name(s), "sha256": sha256_file(path), "bytes": os.path.getsize(path),
                 "num_sequences": int(arrays["lengths"].shape[0]), "num_tokens": n_tok,
                 "num_entries": encoding.num_entries(arrays), "first_sequence": plan[s][0]}
        shards.append(entry)
        tokens, seqs, size = tokens + n_tok, seqs + entry["num_sequences"], size + entry["bytes"]
    data = dict(settings["data"], path=sequences.description, num_sequences=seqs, num_tokens=tokens)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "key_scheme": KEY_SCHEME,
        "teacher": settings["teacher"],
        "tokenizer_fingerprint": settings["tokenizer_fingerprint"],
        "vocab_size": settings["teacher"]["vocab_size"],
        "topk": settings["topk"],
        "temperature": settings["temperature"],
        "encoding": settings["encoding"],
        "data": data,
        "shard_tokens": settings["shard_tokens"],
        "settings_fingerprint": settings_fp,
        "shards": shards,
        "totals": {"num_sequences": seqs, "num_tokens": tokens, "bytes": size,
                   "bytes_per_token": size / max(tokens, 1)},
    }


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

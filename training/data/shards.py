"""Training data: the pretokenized shard dataset, the padding collator and `build_dataset`.

Shards are the Parquet files (+ manifest.json) that `python -m training.preprocess` writes; the
format is in docs/data_format.md. `datasets` converts them once to its Arrow cache; the Arrow files
are then memory-mapped, so the data never lives in the Python heap. Touched pages of a memory map
still count as resident memory, so the dataset drops its resident pages whenever they pass
`max_mapped_bytes`: resident memory stays flat whatever the dataset size.

Items are `{"input_ids": LongTensor [T], "labels": LongTensor [T]}` with -100 where not trained, plus
`"position_ids": LongTensor [T]` from packed shards (0 where each document starts; docs/data_format.md).
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Sequence

import numpy as np
import torch

from training.data import records as raw_records
from training.data.format import ARROW_CACHE_DIRNAME, MANIFEST_NAME, check_tokenizer_matches, read_manifest
from training.data.records import IGNORE_INDEX
from training.utils.io import sha256_file

logger = logging.getLogger(__name__)
_PAGE_WINDOW = 64 * 1024  # the smallest unit a page fault maps around a read (Linux "fault-around")
_CHECK_EVERY = 8  # reads between resident-memory checks (a check costs ~10-20 us)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _map_arrow_file(path: str):
    """(mmap, pyarrow Table) for a `datasets` Arrow cache file (IPC stream), zero-copy over a
    read-only memory map this module owns, so that it can be advised: random access (no 8 MB
    read-ahead mapped per read) and dropping resident pages. `datasets`' own map offers neither."""
    import pyarrow as pa

    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    return mm, pa.ipc.open_stream(pa.py_buffer(mm)).read_all()


def _file_backed_resident_bytes() -> int | None:
    """Resident file-backed + shared pages of this process (Linux /proc/self/statm), else None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[2]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


# ----------------------------------------------------------------------------- the shard dataset


class PretokenizedShardDataset(torch.utils.data.Dataset):
    """Map-style dataset over a shard folder: memory-mapped, deterministically shuffled by `seed`
    (and the epoch, via `set_epoch`), filtered to sequences of at least `min_length` tokens and
    truncated to `max_seq_length`. Being map-style with a fixed order for (seed, epoch), it works
    with the Trainer's samplers, `DistributedSampler` sharding, DataLoader workers and mid-epoch
    resume (the Trainer skips batches of the same order).

    `tokenizer`, when given, must be the one the shards were made with (checked by fingerprint).
    `cache_dir` holds `datasets`' Arrow copy of the shards (default: `<folder>/.arrow_cache`).
    `max_mapped_bytes` bounds how much of the memory maps may stay resident (per process; each
    DataLoader worker has its own budget); None leaves it to the OS (faster, RSS grows to the
    touched part of the data, reclaimable under memory pressure)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        max_seq_length: int | None = None,
        min_length: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        *,
        tokenizer=None,
        cache_dir: str | None = None,
        verify_checksums: bool = False,
        max_mapped_bytes: int | None = 128 * 1024 * 1024,
    ):
        import datasets

        if max_seq_length is not None and max_seq_length < 1:
            raise ValueError(f"max_seq_length must be >= 1 or None, got {max_seq_length}")
        if min_length < 0:
            raise ValueError(f"min_length must be >= 0, got {min_length}")
        self.folder = os.fspath(folder)
        self.manifest_path = os.path.join(self.folder, MANIFEST_NAME)
        self.manifest = read_manifest(self.folder)
        if tokenizer is not None:
            check_tokenizer_matches(self.manifest, tokenizer, self.manifest_path)
        self.max_seq_length, self.min_length, self.seed, self.shuffle = max_seq_length, min_length, seed, shuffle
        self.max_mapped_bytes = max_mapped_bytes
        shard_paths = self._check_shards(verify_checksums)
        if not shard_paths:
            raise ValueError(f"{self.manifest_path}: the manifest lists no shards; re-run preprocessing on non-empty input")

        if cache_dir is None:
            cache_dir = os.path.join(self.folder, ARROW_CACHE_DIRNAME) if os.access(self.folder, os.W_OK) else None
        full = datasets.load_dataset(
            "parquet", data_files=shard_paths, split="train", cache_dir=cache_dir, keep_in_memory=False
        )
        expected = self.manifest["totals"]["num_sequences"]
        if full.num_rows != expected:
            raise ValueError(f"{self.manifest_path}: manifest says {expected} sequences, shards hold {full.num_rows}")
        self._arrow_files = [c["filename"] for c in full.cache_files]
        lengths = full.data.column("length").to_numpy().astype(np.int64)  # [N] reads one small column
        self.has_position_ids = "position_ids" in full.column_names  # packed shards of format version 2
        del full  # drop its maps; items are read through this module's own maps of the same files

        counts = [datasets.Dataset.from_file(f).num_rows for f in self._arrow_files]
        self._file_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [F+1]
        if self.manifest.get("options", {}).get("pack") and not self.has_position_ids:
            logger.warning(
                "%s: packed shards without document boundaries (written before format version 2): each row is "
                "trained as one sequence, across the documents packed in it; re-run `python -m training.preprocess "
                "--pack` to record them (position_ids)", self.folder)
        self._rows = np.flatnonzero(lengths >= max(min_length, 1))  # [n] kept row ids
        if len(self._rows) == 0:
            raise ValueError(
                f"{self.folder}: no sequence has at least min_length={min_length} tokens "
                f"(longest is {int(lengths.max()) if len(lengths) else 0}); lower min_length"
            )
        self._row_lengths = lengths[self._rows]
        self._open: dict[int, object] = {}
        self._mapped, self._baseline, self._baseline_pid, self._reads = 0, None, None, 0
        self.num_releases = 0  # how often resident mapped pages were dropped to stay in budget
        self.epoch = 0
        self._order = self._permutation()

    # -- ordering

    def _permutation(self) -> np.ndarray:
        n = len(self._rows)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch` (deterministic in (seed, epoch)); the Trainer/accelerate call this.
        DataLoader workers see it when they start (not with persistent_workers=True)."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._order = self._permutation()

    @property
    def lengths(self) -> np.ndarray:
        """[len(self)] token counts in item order (after truncation), e.g. for length-grouped sampling."""
        lens = self._row_lengths[self._order]
        return np.minimum(lens, self.max_seq_length) if self.max_seq_length else lens

    def __len__(self) -> int:
        return len(self._rows)

    # -- reading

    def _check_shards(self, verify_checksums: bool) -> list[str]:
        paths = []
        for entry in self.manifest["shards"]:
            path = os.path.join(self.folder, entry["file"])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: listed in {self.manifest_path} but missing; re-run preprocessing")
            size = os.path.getsize(path)
            if size != entry["num_bytes"]:
                raise ValueError(
                    f"{path}: {size} bytes but the manifest says {entry['num_bytes']}; the shard was changed "
                    "or truncated, re-run preprocessing"
                )
            if verify_checksums and sha256_file(path) != entry["sha256"]:
                raise ValueError(f"{path}: sha256 differs from {self.manifest_path}; re-run preprocessing")
            paths.append(path)
        return paths

    def _columns_for(self, file_idx: int):
        """(map, chunk row starts [C+1], per chunk (ids offsets, ids values, labels offsets, labels
        values, position_ids offsets and values or None)) as numpy views into one memory-mapped Arrow file of
        the `datasets` cache."""
        entry = self._open.get(file_idx)
        if entry is None:
            mm, table = _map_arrow_file(self._arrow_files[file_idx])
            starts, chunks = [0], []
            pos_chunks = table.column("position_ids").chunks if self.has_position_ids else None
            for c, (ids, labels) in enumerate(zip(table.column("input_ids").chunks, table.column("labels").chunks)):
                pos = (pos_chunks[c].offsets.to_numpy(), pos_chunks[c].values.to_numpy()) if pos_chunks else None
                chunks.append((ids.offsets.to_numpy(), ids.values.to_numpy(), labels.offsets.to_numpy(),
                               labels.values.to_numpy(), pos))
                starts.append(starts[-1] + len(ids))
            entry = self._open[file_idx] = (mm, np.asarray(starts), chunks)
        return entry

    def _bound_resident_maps(self) -> None:
        """Keep resident mapped pages under `max_mapped_bytes`. Touched pages of a memory map count
        as resident memory, so every few reads the file-backed resident size is measured (Linux;
        estimated elsewhere) and, past the budget, this process's pages of the maps are dropped
        (MADV_DONTNEED: the maps stay valid and re-read from the OS page cache)."""
        if self.max_mapped_bytes is None:
            return
        if self._baseline_pid != os.getpid():  # first read in this process (or a forked worker)
            self._baseline, self._baseline_pid = _file_backed_resident_bytes(), os.getpid()
        self._reads += 1
        if self._reads % _CHECK_EVERY:
            return
        resident = _file_backed_resident_bytes()
        if resident is None or self._baseline is None:
            over = self._mapped > self.max_mapped_bytes
        else:
            over = resident - self._baseline > self.max_mapped_bytes
        if over:
            dontneed = getattr(mmap, "MADV_DONTNEED", None)
            if dontneed is not None and all(hasattr(e[0], "madvise") for e in self._open.values()):
                for mm, _, _ in self._open.values():
                    mm.madvise(dontneed)
            else:  # no madvise: close the maps (no view into them is alive before a read)
                self._open.clear()
            self._mapped, self._baseline = 0, _file_backed_resident_bytes()
            self.num_releases += 1

    def read_row(self, row: int) -> dict[str, torch.Tensor]:
        """Row `row` of the shards in file order (no shuffling, filtering or truncation)."""
        self._bound_resident_maps()
        file_idx = int(np.searchsorted(self._file_starts, row, side="right") - 1)
        local = int(row - self._file_starts[file_idx])
        _, starts, chunks = self._columns_for(file_idx)
        c = int(np.searchsorted(starts, local, side="right") - 1)
        i = local - int(starts[c])
        ids_off, ids_val, lab_off, lab_val, pos = chunks[c]
        ids = torch.from_numpy(ids_val[ids_off[i] : ids_off[i + 1]].astype(np.int64))  # [T] a copy, not a view
        labels = torch.from_numpy(lab_val[lab_off[i] : lab_off[i + 1]].astype(np.int64))  # [T]
        item = {"input_ids": ids, "labels": labels}
        if pos is not None:
            pos_off, pos_val = pos
            item["position_ids"] = torch.from_numpy(pos_val[pos_off[i] : pos_off[i + 1]].astype(np.int64))  # [T]
        self._mapped += len(item) * (ids.numel() * 4 + 2 * _PAGE_WINDOW)  # the estimate used without /proc
        return item

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} sequences")
        item = self.read_row(int(self._rows[self._order[index]]))
        if self.max_seq_length is not None:
            item = {k: v[: self.max_seq_length] for k, v in item.items()}
        return item

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"], state["_mapped"], state["_baseline_pid"] = {}, 0, None  # maps open lazily where received
        return state

    def __repr__(self) -> str:
        return (
            f"PretokenizedShardDataset({self.folder!r}, sequences={len(self)}, "
            f"tokens={self.manifest['totals']['num_tokens']}, seed={self.seed}, shuffle={self.shuffle})"
        )


# ----------------------------------------------------------------------------- packed rows


def document_starts(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] (or [T]) bool: the real tokens of a packed row that start a document after some real token of the row,
    where position_ids restart (0, or not above the previous token's) -- the rule `RetNetModel` applies. The loss
    never predicts such a token from the token before it, and no teacher or student state crosses it."""
    pos = position_ids.long()
    starts = pos == 0
    starts[..., 1:] |= pos[..., 1:] <= pos[..., :-1]
    real = torch.ones_like(starts) if attention_mask is None else attention_mask.bool()
    before = real.long().cumsum(-1) - real.long()  # real tokens before each token
    return starts & real & (before > 0)


def document_index(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """(doc [B, T] long, positions [B, T] long): each token's document number in its row (0, 1, ...; padding takes
    the number of the document before it) and its position counted from its document's first real token (what the
    document would have on its own; 0 on padding)."""
    starts = document_starts(position_ids, attention_mask)
    real = torch.ones_like(starts) if attention_mask is None else attention_mask.bool()
    doc = starts.long().cumsum(-1)
    index = real.long().cumsum(-1) - 1  # [B, T] index among the row's real tokens
    first = (starts | (real & (index == 0))).long()
    start_index = torch.where(first.bool(), index, torch.zeros_like(index)).cummax(-1).values
    positions = torch.where(real, index - start_index, torch.zeros_like(index))
    return doc, positions


# ----------------------------------------------------------------------------- collator


class PaddingCollator:
    """List of items -> {"input_ids" [B,T], "attention_mask" [B,T], "labels" [B,T]} (int64), padded
    to the longest item (rounded up to `pad_to_multiple_of`); labels are -100 on padding.

    Items of packed shards carry `position_ids`: the batch then has `position_ids` [B,T] too (0 on padding; items
    without them count 0, 1, ...), and labels are -100 at every document start after a row's first token, as
    transformers' `DataCollatorWithFlattening` marks them: no token is trained from a document before its own."""

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the eos token) first")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id, self.padding_side, self.pad_to_multiple_of = pad_token_id, padding_side, pad_to_multiple_of

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("PaddingCollator got an empty batch")
        ids = [torch.as_tensor(it["input_ids"], dtype=torch.long) for it in items]
        labels = [torch.as_tensor(it.get("labels", it["input_ids"]), dtype=torch.long) for it in items]
        for i, (a, b) in enumerate(zip(ids, labels)):
            if a.shape != b.shape or a.dim() != 1:
                raise ValueError(f"item {i}: input_ids {tuple(a.shape)} and labels {tuple(b.shape)} must be equal 1-D")
        width = max(len(a) for a in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(ids)
        packed = any("position_ids" in it for it in items)
        out_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)  # [B,T]
        out_mask = torch.zeros((batch, width), dtype=torch.long)  # [B,T]
        out_labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)  # [B,T]
        out_pos = torch.zeros((batch, width), dtype=torch.long) if packed else None  # [B,T]
        for i, (a, b) in enumerate(zip(ids, labels)):
            n = len(a)
            sl = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            if packed:
                pos = items[i].get("position_ids")
                pos = torch.arange(n) if pos is None else torch.as_tensor(pos, dtype=torch.long)
                if pos.shape != a.shape:
                    raise ValueError(f"item {i}: position_ids {tuple(pos.shape)} and input_ids {tuple(a.shape)} differ")
                b = b.masked_fill(document_starts(pos), IGNORE_INDEX)
                out_pos[i, sl] = pos
            out_ids[i, sl], out_labels[i, sl], out_mask[i, sl] = a, b, 1
        out = {"input_ids": out_ids, "attention_mask": out_mask, "labels": out_labels}
        if packed:
            out["position_ids"] = out_pos
        return out


# ----------------------------------------------------------------------------- on-the-fly tokenization


class TokenizedRecordsDataset(torch.utils.data.Dataset):
    """Raw records (text or chat) tokenized when read, with the same rules as preprocessing.
    For small and medium data; large corpora should be preprocessed into shards once."""

    def __init__(self, records, tokenizer, max_seq_length: int | None = None, seed: int = 0, shuffle: bool = True):
        self.records, self.tokenizer, self.max_seq_length = records, tokenizer, max_seq_length
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        if len(records) == 0:
            raise ValueError("no records to build a dataset from")
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        n = len(self.records)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._order = self._permutation()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        where, obj = self.records[int(self._order[index])]
        record = raw_records.normalize_record(obj, where)
        if record is None:  # empty text: an EOS-only sequence keeps indices stable
            ids = [self.tokenizer.eos_token_id]
            labels = list(ids)
        else:
            ids, labels = raw_records.encode_record(record, self.tokenizer, where)
        if self.max_seq_length is not None:
            ids, labels = ids[: self.max_seq_length], labels[: self.max_seq_length]
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


def build_dataset(spec, tokenizer, max_seq_length: int | None, seed: int = 0, shuffle: bool = True):
    """A Dataset of {"input_ids", "labels"} items from `spec`: a shard folder (checked against
    `tokenizer`), a JSONL / Parquet / text file or folder of them (tokenized on the fly), or a
    `datasets` id ("owner/name" or "owner/name:split"). `tokenizer` may be a tokenizer or its path/id."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    specs = [os.fspath(s) for s in spec] if isinstance(spec, (list, tuple)) else [os.fspath(spec)]
    if len(specs) == 1 and os.path.isfile(os.path.join(specs[0], MANIFEST_NAME)):
        return PretokenizedShardDataset(specs[0], max_seq_length, seed=seed, shuffle=shuffle, tokenizer=tokenizer)
    records = raw_records.read_records(specs, lazy_hub=True, require_records=True, validate=True)
    return TokenizedRecordsDataset(records, tokenizer, max_seq_length, seed=seed, shuffle=shuffle)

"""On-disk format of the teacher top-k cache: sequence keys, encodings, shard files and the manifest.

A cache is a folder with `manifest.json` and shards `shard-00000.safetensors`, ... Each shard is one
safetensors file (header + raw little-endian arrays), so it is written atomically with one `os.replace`
and read memory-mapped with `np.memmap` at the offsets the header gives. Every sequence is stored under
a 128-bit hash of its (unpadded) input ids, so an entry can never be applied to another sample.
The full specification, with byte layouts, is `docs/cache_format.md`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np

# The data pipeline's tokenizer fingerprint (vocabulary, merges, normalization, special tokens, chat template), so a
# cache and the shards it was made from agree; sha256 of a file's bytes names the data the cache was made from.
from training.data.format import tokenizer_fingerprint  # noqa: F401  (part of the cache format: public here)
from training.utils.io import atomic_write_bytes, sha256_file

FORMAT_NAME = "hf-retnet-teacher-cache"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
KEY_BYTES = 16
KEY_SCHEME = "blake2b-128 of the unpadded input ids as little-endian int32"
ENCODINGS = ("naive", "compact")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ----------------------------------------------------------------------------------------------------------
# Keys and fingerprints


def sequence_key(input_ids) -> bytes:
    """The 16-byte key of one sequence: blake2b-128 over its ids as little-endian int32 (no padding)."""
    ids = np.ascontiguousarray(np.asarray(input_ids), dtype="<i4")
    return hashlib.blake2b(ids.tobytes(), digest_size=KEY_BYTES).digest()


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def data_fingerprint(spec: str) -> str:
    """sha256 naming the dataset: of its manifest when the folder has one (written by `training.preprocess`),
    else of the names and contents of its data files. Used to tell caches of different data apart (by the
    producer when it writes the manifest, by `CachedTeacher` when it checks train_data / eval_data)."""
    import glob

    spec = os.path.expanduser(spec)
    if os.path.isdir(spec):
        manifests = sorted(glob.glob(os.path.join(spec, "*manifest*.json")))
        if manifests:
            return sha256_hex(b"".join(open(p, "rb").read() for p in manifests))
        files = sorted(f for f in glob.glob(os.path.join(spec, "**", "*"), recursive=True) if os.path.isfile(f))
        listing = [(os.path.relpath(f, spec), sha256_file(f)) for f in files]
        return sha256_hex(canonical_json(listing))
    if os.path.isfile(spec):
        return sha256_file(spec)
    raise FileNotFoundError(f"--data {spec!r} is neither a file nor a folder")


# ----------------------------------------------------------------------------------------------------------
# Bit packing: value i of width w occupies bits [w*i, w*i + w) of a little-endian bit stream.


def pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """[E] unsigned ints < 2**width -> uint8 bit stream, plus 8 zero bytes so any 8-byte window can be read."""
    if not 1 <= width <= 57:
        raise ValueError(f"bit width {width} must be in [1, 57]")
    values = np.asarray(values, dtype=np.uint64)
    bits = ((values[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)  # [E, w]
    stream = np.packbits(bits.reshape(-1), bitorder="little")
    return np.concatenate([stream, np.zeros(8, dtype=np.uint8)])


def _byte_windows(stream: np.ndarray) -> np.ndarray:
    """A zero-copy view of a uint8 stream as overlapping little-endian uint64s, one starting at every byte."""
    stream = np.ascontiguousarray(stream, dtype=np.uint8)
    return np.ndarray(shape=(max(stream.size - 7, 0),), dtype="<u8", buffer=stream, offset=0, strides=(1,))


def unpack_bits(stream: np.ndarray, width: int, start: int, count: int) -> np.ndarray:
    """Values start .. start+count-1 of a stream written by `pack_bits` -> [count] uint64."""
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    bit = np.arange(start, start + count, dtype=np.int64) * width  # [E]
    first = int(bit[0] >> 3)
    window = np.ascontiguousarray(stream[first : int(bit[-1] >> 3) + 8])  # the bytes we need, copied
    words = _byte_windows(window)[(bit >> 3) - first]  # [E] 8-byte little-endian windows
    return (words >> (bit & 7).astype(np.uint64)) & np.uint64((1 << width) - 1)


# ----------------------------------------------------------------------------------------------------------
# Encodings. Both take one batch of tokens' top-k answers (ids [N, k] int64, logprobs [N, k] float32, sorted
# by descending log-probability) and give `Staged` arrays; `pack` joins the staged parts of a shard into the
# arrays that are written; `decode` reads tokens back into [N, k] int64 ids and float32 logprobs.


@dataclass
class Staged:
    """Per-token arrays (first axis N) and per-entry arrays (first axis E) of some tokens, before packing."""

    tokens: dict[str, np.ndarray]
    entries: dict[str, np.ndarray] = field(default_factory=dict)
    num_entries: int = 0


class NaiveEncoding:
    """int32 ids + float16 log-probs, all k entries of every token: 6 bytes per entry, exact up to fp16."""

    name = "naive"

    def __init__(self, k: int, vocab_size: int):
        self.k, self.vocab_size = k, vocab_size

    @property
    def spec(self) -> dict:
        return {"name": self.name}

    def encode(self, ids: np.ndarray, logprobs: np.ndarray) -> Staged:
        n = ids.shape[0]
        return Staged(
            tokens={"token_ids": ids.astype("<i4"), "logprobs": logprobs.astype("<f2")}, num_entries=n * self.k
        )

    def pack(self, parts: list[Staged]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """-> (arrays to write, per-part entry counts)."""
        arrays = {
            "token_ids": _concat([p.tokens["token_ids"] for p in parts], (0, self.k), "<i4"),
            "logprobs": _concat([p.tokens["logprobs"] for p in parts], (0, self.k), "<f2"),
        }
        return arrays, np.array([p.num_entries for p in parts], dtype=np.int64)

    @staticmethod
    def num_entries(arrays) -> int:
        return int(arrays["token_ids"].size)

    def decode(self, arrays, token_ranges, entry_ranges, k: int):
        ids = np.concatenate([arrays["token_ids"][a:b, :k] for a, b in token_ranges]).astype(np.int64)
        logprobs = np.concatenate([arrays["logprobs"][a:b, :k] for a, b in token_ranges]).astype(np.float32)
        return ids, logprobs


class CompactEncoding:
    """Per token: the fewest top entries holding `mass` of the top-k's probability (at most k), the log of the
    probability left out (`log_tail`: kept + tail is still the whole distribution) and the kept entries sorted
    by id. Each entry is its id gap (Golomb-Rice coded with a per-token parameter r chosen to minimize the
    token's bits: r low bits plus the quotient in unary) and q, its log-prob below the token's best quantized
    uniformly on [0, that token's largest distance] (`scale`, per token) in `logprob_bits`. The fixed-width
    parts (low bits | q << r) and the unary parts go to two bit streams per sequence, with no per-token padding,
    so decoding is a handful of whole-array numpy operations. Decoding sorts the entries back by q (ties by
    id) and renormalizes them to 1 - tail. Bits per entry: about log2(V / m) + 1.5 + logprob_bits.
    """

    name = "compact"

    def __init__(self, k: int, vocab_size: int, mass: float | None = None, logprob_bits: int | None = None):
        mass = DEFAULT_MASS if mass is None else mass
        logprob_bits = DEFAULT_LOGPROB_BITS if logprob_bits is None else logprob_bits
        if not 0.0 < mass <= 1.0:
            raise ValueError(f"compact encoding mass={mass} must be in (0, 1]")
        if not 2 <= logprob_bits <= 16:
            raise ValueError(f"compact encoding logprob_bits={logprob_bits} must be in [2, 16]")
        if k > 65535:
            raise ValueError(f"compact encoding stores per-token counts as uint16; k={k} is too large")
        if vocab_size > 1 << 31:
            raise ValueError(f"compact encoding supports vocabularies up to 2**31 ids, not {vocab_size}")
        self.k, self.vocab_size, self.mass, self.logprob_bits = k, vocab_size, float(mass), int(logprob_bits)
        self.id_bits = max(1, math.ceil(math.log2(vocab_size)))
        self.levels = (1 << self.logprob_bits) - 1
        self.count_dtype = "u1" if k < 256 else "<u2"

    @property
    def spec(self) -> dict:
        return {"name": self.name, "mass": self.mass, "logprob_bits": self.logprob_bits, "id_bits": self.id_bits}

    def encode(self, ids: np.ndarray, logprobs: np.ndarray) -> Staged:
        """One sequence's [N, k] answers -> per-token arrays and its byte stream (low section, unary section)."""
        n, k = ids.shape
        lp = logprobs.astype(np.float64)  # [N, k]
        cum = np.cumsum(np.exp(lp), axis=1)  # [N, k]
        target = self.mass * cum[:, -1:]  # [N, 1] a share of the top-k's own mass (the rest is tail already)
        counts = np.minimum((cum < target).sum(axis=1) + 1, k)  # [N] smallest prefix reaching it
        counts = np.maximum(np.minimum(counts, np.isfinite(lp).sum(axis=1)), 1)  # never keep p = 0 entries
        rows = np.arange(n)
        tail = np.clip(1.0 - cum[rows, counts - 1], 0.0, 1.0)
        with np.errstate(divide="ignore"):
            log_tail = np.log(tail).astype("<f2")  # -inf when the kept entries hold everything
        dist = lp[:, :1] - lp  # [N, k] >= 0, non-decreasing along k
        scale_code = encode_scale(dist[rows, counts - 1] / self.levels)  # [N] uint8, step >= the needed one
        scale = decode_scale(scale_code).astype(np.float64)  # [N] nats per quantization step, as decoded
        q = np.clip(np.rint(np.where(np.isfinite(dist), dist, 0) / scale[:, None]), 0, self.levels).astype(np.int64)
        keep = np.arange(k)[None, :] < counts[:, None]  # [N, k]
        order = np.argsort(np.where(keep, ids, np.iinfo(np.int64).max), axis=1, kind="stable")  # kept, by id
        sorted_ids = np.take_along_axis(ids, order, 1)
        sorted_q = np.take_along_axis(q, order, 1)
        gaps = np.where(keep, np.diff(sorted_ids, axis=1, prepend=-1) - 1, 0)  # [N, k] >= 0 on kept slots
        rice = rice_parameters(gaps, counts, self.id_bits)  # [N]
        r = rice[:, None].astype(np.int64)
        low = (gaps & ((1 << r) - 1)) | (sorted_q << r)  # [N, k] r + b bits each
        low_bits = np.broadcast_to(r + self.logprob_bits, keep.shape)
        stream = np.concatenate([pack_varwidth(low[keep], low_bits[keep]), pack_unary((gaps >> r)[keep])])
        return Staged(
            tokens={"counts": counts.astype(self.count_dtype), "rice": rice.astype("u1"), "log_tail": log_tail,
                    "scale_code": scale_code},
            entries={"stream": stream},
            num_entries=int(stream.nbytes),
        )

    def pack(self, parts: list[Staged]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Per-sequence entry offsets count bytes of `entries` (each sequence's sections start on a byte)."""
        streams = [p.entries["stream"] for p in parts]
        arrays = {
            "counts": _concat([p.tokens["counts"] for p in parts], (0,), self.count_dtype),
            "rice": _concat([p.tokens["rice"] for p in parts], (0,), "u1"),
            "log_tail": _concat([p.tokens["log_tail"] for p in parts], (0,), "<f2"),
            "scale_code": _concat([p.tokens["scale_code"] for p in parts], (0,), "u1"),
            "entries": np.concatenate(streams + [np.zeros(8, np.uint8)]),  # 8 spare bytes for 8-byte reads
        }
        return arrays, np.array([p.num_entries for p in parts], dtype=np.int64)

    def decode(self, arrays, token_ranges, entry_ranges, k: int):
        """-> ids [N, k] int64, logprobs [N, k] float32. Slots past a token's kept count hold log-prob -inf and
        distinct ids that are not among that token's kept ids (see `fill_free_ids`).

        Sequences are decoded in groups of about DECODE_CHUNK_SLOTS / k tokens: the temporaries stay small
        enough for the allocator to reuse, where multi-MB ones would be mapped and page-faulted afresh on every
        call (2-3x slower)."""
        budget = max(1, DECODE_CHUNK_SLOTS // max(k, 1))
        groups, size = [[]], 0
        for i, (a, b) in enumerate(token_ranges):
            if groups[-1] and size + (b - a) > budget:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += b - a
        if len(groups) == 1:
            return self._decode(arrays, token_ranges, entry_ranges, k)
        n = sum(b - a for a, b in token_ranges)
        ids, logprobs = np.empty((n, k), dtype=np.int64), np.empty((n, k), dtype=np.float32)  # [N, k]
        at = 0
        for group in groups:
            part_ids, part_lp = self._decode(arrays, [token_ranges[i] for i in group],
                                             [entry_ranges[i] for i in group], k)
            ids[at : at + len(part_ids)] = part_ids
            logprobs[at : at + len(part_ids)] = part_lp
            at += len(part_ids)
        return ids, logprobs

    def _decode(self, arrays, token_ranges, entry_ranges, k: int):
        """`decode` of one group of sequences, all at once."""
        def gather(name):
            return np.concatenate([arrays[name][a:b] for a, b in token_ranges]) if token_ranges else arrays[name][:0]

        counts = gather("counts").astype(np.int64)  # [N]
        rice = gather("rice").astype(np.int64)  # [N]
        scale = decode_scale(gather("scale_code"))  # [N] float32
        log_tail = gather("log_tail").astype(np.float32)
        n = counts.shape[0]
        word_bits = rice + self.logprob_bits  # [N]
        token_bits = counts * word_bits  # [N] low-section bits of each token
        seq_lengths = np.array([b - a for a, b in token_ranges], dtype=np.int64)  # [S]
        seq_of = np.repeat(np.arange(len(token_ranges)), seq_lengths)  # [N]
        seq_first = np.cumsum(seq_lengths) - seq_lengths  # [S]
        excl = np.cumsum(token_bits) - token_bits  # [N] bit offset if all sequences were one run
        seq_low_bits = np.add.reduceat(token_bits, seq_first) if n else np.zeros(0, np.int64)
        seq_low_bits = np.where(seq_lengths > 0, seq_low_bits, 0)  # reduceat repeats a value for empty ranges
        seq_low_bytes = (seq_low_bits + 7) // 8  # [S]
        low_parts, unary_parts = [], []
        for (a, b), low_bytes in zip(entry_ranges, seq_low_bytes.tolist()):
            low_parts.append(np.asarray(arrays["entries"][a : a + low_bytes]))
            unary_parts.append(np.asarray(arrays["entries"][a + low_bytes : b]))
        low_stream = np.concatenate(low_parts + [np.zeros(8, np.uint8)])
        seq_low_start = (np.cumsum(seq_low_bytes) - seq_low_bytes) * 8  # [S] bit where each sequence's run starts
        token_start = seq_low_start[seq_of] + excl - excl[seq_first][seq_of] if n else excl  # [N]
        # every stored entry, flat in storage order (token by token, by id within a token): [E]
        num = int(counts.sum())
        row = np.repeat(np.arange(n), counts)  # [E] token of each entry
        first = np.cumsum(counts) - counts  # [N] index of each token's first entry
        slot = np.arange(num) - first[row]  # [E] rank by id within its token
        width = word_bits[row]
        bit = token_start[row] + slot * width  # [E]
        window = _byte_windows(low_stream)[bit >> 3]  # [E] the 8 bytes from each entry's first byte, as LE u64
        one = np.uint64(1)
        words = (window >> (bit & 7).astype(np.uint64)) & ((one << width.astype(np.uint64)) - one)
        r = rice[row].astype(np.uint64)
        quotient = unary_decode(unary_parts, counts, seq_lengths)  # [E]
        gaps = ((quotient << r) | (words & ((one << r) - one))).astype(np.int64)
        q = (words >> r).astype(np.int64)  # [E]
        run = np.cumsum(gaps + 1)  # ids = running sum of gap + 1 within each token, minus 1
        start_run = run - gaps - 1  # exclusive running sum
        ids_flat = run - 1 - start_run[np.minimum(first, max(num - 1, 0))][row]  # [E] ascending within a token
        step = scale[row]
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = np.log(np.add.reduceat(np.exp(-q.astype(np.float32) * step), first) if num else counts * 0.0)
            log_kept = np.log1p(-np.exp(log_tail.astype(np.float64))).astype(np.float32)  # [N] log(1 - tail)
        shift = (log_kept - norm).astype(np.float32)  # [N] log-prob of q = 0
        # sort each token by distance from the best, ties by id, padding last: one row sort of (q << id_bits | id),
        # in uint32 whenever it fits (numpy sorts 32-bit keys many times faster than 64-bit ones)
        M = int(counts.max()) if n else 0
        width_keys = max(M, k)
        small = self.logprob_bits + self.id_bits <= 31
        key_dtype, id_shift = (np.uint32, self.id_bits) if small else (np.int64, 32)
        keys = np.full((n, width_keys), np.iinfo(key_dtype).max, dtype=key_dtype)  # [N, max(M, k)]
        keys.reshape(-1)[row * width_keys + slot] = (q << id_shift) | ids_flat
        keys.sort(axis=1)
        keys = keys[:, :k]
        valid = np.arange(k)[None, :] < counts[:, None]  # [N, k] stored entries come first after the sort
        ids = (keys & key_dtype((1 << id_shift) - 1)).astype(np.int64)
        logprobs = (keys >> key_dtype(id_shift)).astype(np.float32)
        logprobs *= -scale[:, None]
        logprobs += shift[:, None]
        np.copyto(logprobs, -np.inf, where=~valid)
        fill_free_ids(ids, counts, ids_flat, row, slot)
        return ids, logprobs

    @staticmethod
    def num_entries(arrays) -> int:
        return int(arrays["counts"].astype(np.int64).sum())


DEFAULT_MASS, DEFAULT_LOGPROB_BITS = 0.99, 4  # loss error is set by the mass, gradient cosine by the bits
DECODE_CHUNK_SLOTS = 1 << 15  # tokens x k answer slots decoded in one pass
SCALE_CODE_OFFSET, SCALE_CODE_STEPS = 192, 16  # scale = 2 ** ((code - 192) / 16): 2**-12 .. 2**3.94 nats


def encode_scale(scale: np.ndarray) -> np.ndarray:
    """Quantization steps (nats, >= 0) -> uint8 codes of the smallest representable step >= each (so the
    token's largest distance still fits in the levels); 0 for steps below 2**-12 nats."""
    scale = np.asarray(scale, dtype=np.float64)
    with np.errstate(divide="ignore"):
        code = np.ceil(np.log2(np.maximum(scale, 1e-30)) * SCALE_CODE_STEPS - 1e-9) + SCALE_CODE_OFFSET
    return np.clip(code, 0, 255).astype("u1")


def decode_scale(code: np.ndarray) -> np.ndarray:
    """uint8 codes -> quantization steps in nats, float32."""
    return np.exp2((np.asarray(code, dtype=np.float32) - SCALE_CODE_OFFSET) / SCALE_CODE_STEPS)


def rice_parameters(gaps: np.ndarray, counts: np.ndarray, max_bits: int) -> np.ndarray:
    """Per row of gaps [N, k] (0 past the row's count), the Rice parameter r in [0, max_bits] with the fewest
    bits: count * r low bits + sum(gap >> r) unary zeros (the count terminating ones are the same for all r)."""
    n = gaps.shape[0]
    best, best_cost = np.zeros(n, np.int64), np.full(n, np.iinfo(np.int64).max)
    for r in range(max_bits + 1):
        cost = counts * r + (gaps >> r).sum(axis=1)
        better = cost < best_cost
        best, best_cost = np.where(better, r, best), np.where(better, cost, best_cost)
    return best


def _bit_length(values: np.ndarray) -> np.ndarray:
    """Bits needed to write each non-negative int (0 for 0)."""
    values = np.asarray(values, dtype=np.int64)
    return np.where(values > 0, np.floor(np.log2(np.maximum(values, 1))).astype(np.int64) + 1, 0)


def pack_varwidth(words: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Words [E] of widths [E] bits written back to back, LSB-first -> uint8 stream padded to whole bytes."""
    words = np.asarray(words, dtype=np.uint64)
    widths = np.asarray(widths, dtype=np.int64)
    if words.size == 0:
        return np.zeros(0, np.uint8)
    max_bits = int(widths.max())
    bit_index = np.arange(max_bits)
    bits = ((words[:, None] >> bit_index.astype(np.uint64)) & np.uint64(1)).astype(np.uint8)  # [E, max_bits]
    valid = bit_index[None, :] < widths[:, None]
    return np.packbits(bits[valid], bitorder="little")  # row-major order: word 0's bits, then word 1's, ...


def pack_unary(values: np.ndarray) -> np.ndarray:
    """Each value v [E] as v zero bits then a one, back to back, LSB-first -> uint8 stream padded to bytes."""
    values = np.asarray(values, dtype=np.int64)
    if values.size == 0:
        return np.zeros(0, np.uint8)
    ones = np.cumsum(values + 1) - 1  # [E] bit position of each terminating one
    flat = np.zeros(int(ones[-1]) + 1, np.uint8)
    flat[ones] = 1
    return np.packbits(flat, bitorder="little")


def unary_decode(parts: list[np.ndarray], counts: np.ndarray, seq_lengths: np.ndarray) -> np.ndarray:
    """The values of unary streams (`pack_unary`, one part per sequence, each holding sum(counts) values of its
    tokens) -> [E] uint64 in order. Padding zeros after a part's last one are never counted: each part's first
    value is measured from the part's own start."""
    if not parts:
        return np.zeros(0, np.uint64)
    part_bits = np.array([p.size * 8 for p in parts], dtype=np.int64)
    ones = np.flatnonzero(np.unpackbits(np.concatenate(parts), bitorder="little"))  # [E]
    per_part = np.add.reduceat(counts, np.cumsum(seq_lengths) - seq_lengths) if counts.size else counts
    per_part = np.where(seq_lengths > 0, per_part, 0)
    if ones.size != int(per_part.sum()):
        raise ValueError(f"cache entries are corrupted: {ones.size} unary codes where {int(per_part.sum())} "
                         "were expected; rebuild the cache")
    previous = np.empty_like(ones)
    previous[1:] = ones[:-1]
    first = np.cumsum(per_part) - per_part  # [S] index of each part's first value
    has = per_part > 0
    previous[first[has]] = (np.cumsum(part_bits) - part_bits)[has] - 1
    return (ones - previous - 1).astype(np.uint64)


def fill_free_ids(ids: np.ndarray, counts: np.ndarray, kept: np.ndarray, row: np.ndarray, slot: np.ndarray) -> None:
    """In place: in every row i of ids [N, k] with counts[i] < k, slots counts[i]..k-1 get the smallest ids not
    among the row's kept ids (so every row names k distinct tokens; the loss requires it). `kept` [E] holds each
    row's kept ids in ascending order (entry e is rank `slot[e]` of row `row[e]`). The j-th smallest integer
    missing from an ascending set s is j + #{i : s_i - i <= j}, counted for all rows at once."""
    n, k = ids.shape
    if n == 0 or bool((counts >= k).all()):
        return
    d = kept - slot  # [E] s_i - i, non-decreasing within a row
    near = d < k
    below = np.bincount(row[near] * k + d[near], minlength=n * k).reshape(n, k).cumsum(axis=1)  # [N, k]
    j = np.arange(k)[None, :] - counts[:, None]  # [N, k] rank of each empty slot among the row's empty slots
    jc = np.maximum(j, 0)
    free = jc + np.take_along_axis(below, jc, axis=1)  # [N, k] the j-th missing id of each row
    np.copyto(ids, free, where=j >= 0)


def _concat(arrays: list[np.ndarray], empty_shape: tuple, dtype: str) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(arrays)) if arrays else np.zeros(empty_shape, dtype=dtype)


def make_encoding(spec: str | dict, k: int, vocab_size: int):
    """An encoding from its manifest spec ({"name": ..., params}) or a CLI string such as
    "naive", "compact", "compact:mass=0.995,bits=6"."""
    if isinstance(spec, str):
        name, _, params = spec.partition(":")
        kwargs = {}
        for item in filter(None, params.split(",")):
            key, _, value = item.partition("=")
            key = {"bits": "logprob_bits"}.get(key.strip(), key.strip())
            kwargs[key] = float(value) if key == "mass" else int(value)
        spec = {"name": name.strip(), **kwargs}
    spec = dict(spec)
    name = spec.pop("name", None)
    spec.pop("id_bits", None)  # derived from the vocabulary
    if name == "naive" and not spec:
        return NaiveEncoding(k, vocab_size)
    if name == "compact":
        unknown = set(spec) - {"mass", "logprob_bits"}
        if not unknown:
            return CompactEncoding(k, vocab_size, **spec)
        raise ValueError(f"unknown compact encoding parameter(s) {sorted(unknown)}; known: mass, bits")
    raise ValueError(
        f"unknown cache encoding {name!r} with parameters {spec}; use one of {ENCODINGS}, "
        "e.g. 'naive', 'compact' or 'compact:mass=0.999,bits=8'"
    )


# ----------------------------------------------------------------------------------------------------------
# Shard files: safetensors layout (8-byte little-endian header size, JSON header, raw data).

_DTYPES = {"U8": "|u1", "I8": "|i1", "U16": "<u2", "I16": "<i2", "U32": "<u4", "I32": "<i4", "U64": "<u8",
           "I64": "<i8", "F16": "<f2", "F32": "<f4", "F64": "<f8", "BOOL": "|b1"}
_CODES = {v: k for k, v in _DTYPES.items()}


def shard_bytes(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """Serialize to the safetensors layout, deterministically (sorted JSON keys: the `safetensors` writer orders
    metadata by a randomized hash map, which would break byte-identical reruns). Arrays are laid out by
    decreasing item size, then name, so every array is aligned to its item size. Readable by `safetensors`."""
    names = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset, blobs = 0, []
    for name in names:
        array = np.ascontiguousarray(arrays[name])
        code = _CODES[array.dtype.newbyteorder("<").str if array.dtype.itemsize > 1 else array.dtype.str]
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)




def read_shard_header(path: str) -> tuple[dict, dict[str, str], int]:
    """-> (tensor table, metadata, data start offset); ValueError naming the file when it is not a valid shard."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"cache shard {path} is truncated ({size} bytes): rebuild the cache")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 1 << 28):
            raise ValueError(f"cache shard {path} is truncated or corrupted (header length {header_len}, "
                             f"file {size} bytes): rebuild the cache")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"cache shard {path} has a corrupted header ({err}): rebuild the cache") from None
    metadata = header.pop("__metadata__", {}) or {}
    start = 8 + header_len
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if start + end != size:
        raise ValueError(f"cache shard {path} is truncated or corrupted: its header describes {start + end} "
                         f"bytes, the file has {size}; rebuild the cache")
    return header, metadata, start


def open_shard(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map every array of a shard (read only, zero copy)."""
    header, metadata, start = read_shard_header(path)
    whole = np.memmap(path, dtype=np.uint8, mode="r")
    arrays = {}
    for name, info in header.items():
        lo, hi = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        arrays[name] = whole[start + lo : start + hi].view(dtype).reshape(info["shape"])
    return arrays, metadata


# ----------------------------------------------------------------------------------------------------------
# Manifest


def read_manifest(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, MANIFEST_NAME)
    if not os.path.isdir(cache_dir):
        raise FileNotFoundError(f"teacher cache folder {cache_dir!r} does not exist; build one with "
                                "`python -m training.cache_teacher_logits --output <folder> ...`")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: the cache is incomplete (was its producer interrupted?). Rerun "
            "`python -m training.cache_teacher_logits` with the same arguments to finish it."
        )
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rebuild the cache") from None
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a {FORMAT_NAME} v{FORMAT_VERSION} manifest "
                         f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r})")
    return manifest


def write_manifest(cache_dir: str, manifest: dict) -> None:
    text = json.dumps(manifest, sort_keys=True, indent=2) + "\n"
    atomic_write_bytes(os.path.join(cache_dir, MANIFEST_NAME), text.encode())  # fsync'd; readers see all or nothing

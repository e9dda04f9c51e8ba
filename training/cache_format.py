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

FORMAT_NAME = "hf-retnet-teacher-cache"
FORMAT_VERSION = 1
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


def tokenizer_fingerprint(tokenizer) -> str:
    """The data pipeline's tokenizer fingerprint (`training.data.tokenizer_fingerprint`: vocabulary, merges,
    normalization, special tokens, chat template), so a cache and the shards it was made from agree."""
    from training.data import tokenizer_fingerprint as data_tokenizer_fingerprint

    return data_tokenizer_fingerprint(tokenizer)


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
    probability left out (`log_tail`: kept + tail is still the whole distribution) and the kept entries as a
    byte-aligned run of bit-packed words, sorted by id: word = (id gap - 1) | q << w, where w (`widths`, per
    token) is the bit length of the token's largest id gap and q (`logprob_bits`) is the entry's log-prob
    below the token's best, quantized uniformly on [0, that token's largest distance] (`scale`, per token).
    Decoding sorts the entries back by q (ties by id) and renormalizes them to 1 - tail.
    Bytes per token: 7 + ceil(m * (w + logprob_bits) / 8), with w about log2(V / m) + 1.
    """

    name = "compact"

    def __init__(self, k: int, vocab_size: int, mass: float = 0.99, logprob_bits: int = 5):
        if not 0.0 < mass <= 1.0:
            raise ValueError(f"compact encoding mass={mass} must be in (0, 1]")
        if not 2 <= logprob_bits <= 16:
            raise ValueError(f"compact encoding logprob_bits={logprob_bits} must be in [2, 16]")
        if k > 65535:
            raise ValueError(f"compact encoding stores per-token counts as uint16; k={k} is too large")
        self.k, self.vocab_size, self.mass, self.logprob_bits = k, vocab_size, float(mass), int(logprob_bits)
        self.id_bits = max(1, math.ceil(math.log2(vocab_size)))
        self.levels = (1 << self.logprob_bits) - 1

    @property
    def spec(self) -> dict:
        return {"name": self.name, "mass": self.mass, "logprob_bits": self.logprob_bits, "id_bits": self.id_bits}

    def encode(self, ids: np.ndarray, logprobs: np.ndarray) -> Staged:
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
        scale = (dist[rows, counts - 1] / self.levels).astype("<f2")  # [N] nats per quantization step
        safe = np.where(scale > 0, scale.astype(np.float64), 1.0)
        q = np.clip(np.rint(np.where(np.isfinite(dist), dist, 0) / safe[:, None]), 0, self.levels).astype(np.int64)
        keep = np.arange(k)[None, :] < counts[:, None]  # [N, k]
        order = np.argsort(np.where(keep, ids, np.iinfo(np.int64).max), axis=1, kind="stable")  # kept, by id
        sorted_ids = np.take_along_axis(ids, order, 1)
        sorted_q = np.take_along_axis(q, order, 1)
        gaps = np.diff(sorted_ids, axis=1, prepend=-1) - 1  # [N, k] >= 0 on kept slots
        gaps = np.where(keep, gaps, 0)
        widths = _bit_length(gaps.max(axis=1))  # [N] bits per gap for each token
        word_bits = widths + self.logprob_bits  # [N]
        words = (gaps.astype(np.uint64) | (sorted_q.astype(np.uint64) << widths[:, None].astype(np.uint64)))
        stream = pack_runs(words[keep], np.repeat(word_bits, counts), counts)
        return Staged(
            tokens={"counts": counts.astype("<u2"), "widths": widths.astype("u1"), "log_tail": log_tail,
                    "scale": scale},
            entries={"stream": stream},
            num_entries=int(stream.nbytes),
        )

    def pack(self, parts: list[Staged]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Per-sequence entry offsets count bytes of `entries` (each token's run starts on a byte)."""
        streams = [p.entries["stream"] for p in parts]
        arrays = {
            "counts": _concat([p.tokens["counts"] for p in parts], (0,), "<u2"),
            "widths": _concat([p.tokens["widths"] for p in parts], (0,), "u1"),
            "log_tail": _concat([p.tokens["log_tail"] for p in parts], (0,), "<f2"),
            "scale": _concat([p.tokens["scale"] for p in parts], (0,), "<f2"),
            "entries": np.concatenate(streams + [np.zeros(8, np.uint8)]),  # 8 spare bytes for 8-byte reads
        }
        return arrays, np.array([p.num_entries for p in parts], dtype=np.int64)

    def decode(self, arrays, token_ranges, entry_ranges, k: int):
        """-> ids [N, k] int64, logprobs [N, k] float32. Slots past a token's kept count hold log-prob -inf and
        distinct ids that are not among that token's kept ids (see `fill_missing`)."""
        def gather(name):
            return np.concatenate([arrays[name][a:b] for a, b in token_ranges]) if token_ranges else arrays[name][:0]

        counts = gather("counts").astype(np.int64)  # [N]
        widths = gather("widths").astype(np.int64)
        scale = gather("scale").astype(np.float32)
        log_tail = gather("log_tail").astype(np.float32)
        stream = np.concatenate([np.asarray(arrays["entries"][a:b]) for a, b in entry_ranges] + [np.zeros(8, np.uint8)])
        n = counts.shape[0]
        M = int(counts.max()) if n else 0
        word_bits = widths + self.logprob_bits  # [N]
        run_bytes = (counts * word_bits + 7) // 8
        run_start = np.cumsum(run_bytes) - run_bytes  # [N] byte where each token's run starts
        slot = np.arange(M)[None, :]
        valid = slot < counts[:, None]  # [N, M] stored entries, in id order
        bit = np.where(valid, run_start[:, None] * 8 + slot * word_bits[:, None], 0)  # [N, M]
        window = _byte_windows(stream)[bit >> 3]  # [N, M] the 8 bytes from each entry's first byte, as LE u64
        one = np.uint64(1)
        words = (window >> (bit & 7).astype(np.uint64)) & ((one << word_bits[:, None].astype(np.uint64)) - one)
        w = widths[:, None].astype(np.uint64)
        gaps = (words & ((one << w) - one)).astype(np.int64)
        ids = np.cumsum(np.where(valid, gaps + 1, 0), axis=1) - 1  # [N, M] ascending on the valid prefix
        qtype = np.uint16 if self.logprob_bits < 16 else np.uint32
        q = np.where(valid, (words >> w).astype(np.int64), self.levels + 1).astype(qtype)
        order = np.argsort(q, axis=1, kind="stable")  # by distance from the best, ties by id; padding last
        ids = np.take_along_axis(ids, order, 1)
        neg_dist = np.take_along_axis(q, order, 1).astype(np.float32)
        neg_dist *= -scale[:, None]
        np.copyto(neg_dist, -np.inf, where=~valid)  # valid entries come first after the sort
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = np.log(np.exp(neg_dist).sum(axis=1))  # [N] over every stored entry; >= 0 (best has 0)
            log_kept = np.log1p(-np.exp(log_tail.astype(np.float64))).astype(np.float32)  # log(1 - tail)
        logprobs = neg_dist
        logprobs += (log_kept - norm)[:, None]  # [N, M], -inf past the count
        if M >= k:
            ids, logprobs, valid = ids[:, :k], logprobs[:, :k], valid[:, :k]
        else:
            pad = ((0, 0), (0, k - M))
            ids, logprobs = np.pad(ids, pad), np.pad(logprobs, pad, constant_values=-np.inf)
            valid = np.pad(valid, pad)
        fill_missing(ids, np.minimum(counts, k))
        return ids.astype(np.int64, copy=False), logprobs.astype(np.float32, copy=False)

    @staticmethod
    def num_entries(arrays) -> int:
        return int(arrays["counts"].astype(np.int64).sum())


def _bit_length(values: np.ndarray) -> np.ndarray:
    """Bits needed to write each non-negative int (0 for 0)."""
    values = np.asarray(values, dtype=np.int64)
    return np.where(values > 0, np.floor(np.log2(np.maximum(values, 1))).astype(np.int64) + 1, 0)


def pack_runs(words: np.ndarray, word_bits: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Words [E] of per-word widths `word_bits` [E], grouped in runs of `counts` [N] words, each run written
    LSB-first starting on a fresh byte -> uint8 stream (each run padded to whole bytes)."""
    E = words.shape[0]
    if E == 0:
        return np.zeros(0, np.uint8)
    run_bits = np.add.reduceat(word_bits, np.cumsum(counts) - counts) if counts.size else np.zeros(0, np.int64)
    run_bits = np.where(counts > 0, run_bits, 0)
    run_start = (np.cumsum((run_bits + 7) // 8) - (run_bits + 7) // 8) * 8  # [N] bit where each run starts
    first = np.cumsum(counts) - counts
    token_of = np.repeat(np.arange(counts.shape[0]), counts)
    offsets = np.cumsum(word_bits) - word_bits  # [E] bit offset in a stream with no padding
    run_offset = offsets[first[counts > 0]]  # [runs with words] where each run starts without padding
    shift = np.zeros(counts.shape[0], np.int64)
    shift[counts > 0] = run_start[counts > 0] - run_offset
    position = offsets + shift[token_of]  # [E] bit position with byte-aligned runs
    total_bytes = int((run_start[-1] + run_bits[-1] + 7) // 8) if counts.size else 0
    max_bits = int(word_bits.max())
    bit_index = np.arange(max_bits)
    bits = ((words[:, None] >> bit_index.astype(np.uint64)) & np.uint64(1)).astype(np.uint8)  # [E, max_bits]
    valid = bit_index[None, :] < word_bits[:, None]
    flat = np.zeros(total_bytes * 8, np.uint8)
    flat[(position[:, None] + bit_index[None, :])[valid]] = bits[valid]
    return np.packbits(flat, bitorder="little")


def fill_missing(ids: np.ndarray, counts: np.ndarray) -> None:
    """In place: in row i, slots counts[i]..k-1 get the smallest ids in 0..k-1 not among its first counts[i]
    ids, so every row names k distinct tokens (the loss requires it). At least k - counts[i] of 0..k-1 are
    free, because only counts[i] ids are taken."""
    n, k = ids.shape
    short = np.nonzero(counts < k)[0]
    if short.size == 0:
        return
    m = counts[short]
    kept = ids[short]  # [S, k]
    valid = (np.arange(k)[None, :] < m[:, None]) & (kept < k)
    taken = np.zeros((short.size, k), dtype=bool)
    taken[np.nonzero(valid)[0], kept[valid]] = True
    free = ~taken
    rank = np.cumsum(free, axis=1) - 1  # [S, k] rank of each free candidate id within its row
    rows, cand = np.nonzero(free & (rank < (k - m)[:, None]))
    ids[short[rows], m[rows] + rank[rows, cand]] = cand


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


def write_atomic(path: str, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then os.replace: readers see all or nothing."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)




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
    write_atomic(os.path.join(cache_dir, MANIFEST_NAME), text.encode())

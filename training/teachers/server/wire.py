"""Encodings of the `POST /v1/topk` answer, shared by the teacher server and `NetworkTeacher`.

Rows travel without padding, so an answer is ragged: row b has `lengths[b]` positions. Both encodings
carry the same `TopKAnswer`; the binary one is a fixed 32-byte header followed by three flat arrays
(layout and rationale: docs/topk_wire_format.md). JSON is the readable, slower twin.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"HRTK"
VERSION = 1
# magic, version, header_size, batch, tokens, k, id_dtype, logprob_dtype, flags, temperature, input_crc32
HEADER = struct.Struct("<4sHHIIIBBHfI")
assert HEADER.size == 32

# dtype codes in the header; arrays are little-endian.
ID_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<i4"), 3: np.dtype("<i8")}
LOGPROB_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
_ID_CODES = {v: k for k, v in ID_DTYPES.items()}
_LOGPROB_CODES = {v: k for k, v in LOGPROB_DTYPES.items()}

BINARY_MEDIA_TYPE = "application/octet-stream"
JSON_MEDIA_TYPE = "application/json"


class WireFormatError(ValueError):
    """A body that does not decode to a well-formed answer (truncated, wrong magic, ragged, ...)."""


def smallest_id_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), else int32: halves the id bytes for small vocabularies."""
    return ID_DTYPES[1] if vocab_size <= 1 << 16 else ID_DTYPES[2]


def input_checksum(rows: list[list[int]]) -> int:
    """CRC32 over the row lengths and the token ids; echoed by the server so the client can tell that
    an answer belongs to the request it sent (not to a stale or mixed-up one)."""
    lengths = np.asarray([len(r) for r in rows], dtype="<i8")
    flat = np.fromiter((t for r in rows for t in r), dtype="<i8", count=int(lengths.sum()))
    return zlib.crc32(flat.tobytes(), zlib.crc32(lengths.tobytes()))


@dataclass
class TopKAnswer:
    """The teacher's top-k for B unpadded rows.

    lengths:   [B] int64, positions per row (sum = N).
    token_ids: [N, k] integer ids, rows concatenated in request order, descending log-probability.
    logprobs:  [N, k] float32.
    temperature: the temperature the server applied; input_crc32: `input_checksum` of the request rows.
    """

    lengths: np.ndarray
    token_ids: np.ndarray
    logprobs: np.ndarray
    temperature: float = 1.0
    input_crc32: int = 0

    @property
    def k(self) -> int:
        return int(self.token_ids.shape[1])

    def row_slices(self) -> list[slice]:
        ends = np.cumsum(self.lengths)
        return [slice(int(e - n), int(e)) for e, n in zip(ends, self.lengths)]


def encode_binary(answer: TopKAnswer, id_dtype: np.dtype | None = None) -> memoryview:
    """Header + lengths [B] u32 + token_ids [N,k] + logprobs [N,k], all little-endian and C-ordered.

    Each array is cast straight into one preallocated buffer (a single pass over the data, no joins)."""
    id_dtype = np.dtype(id_dtype or ID_DTYPES[2])
    lp_dtype = np.dtype(answer.logprobs.dtype).newbyteorder("<")
    if id_dtype not in _ID_CODES or lp_dtype not in _LOGPROB_CODES:
        raise ValueError(f"no wire code for id dtype {id_dtype} / logprob dtype {lp_dtype}")
    n, k = answer.token_ids.shape
    batch = len(answer.lengths)
    sizes = (4 * batch, id_dtype.itemsize * n * k, lp_dtype.itemsize * n * k)
    buffer = bytearray(HEADER.size + sum(sizes))
    HEADER.pack_into(
        buffer, 0, MAGIC, VERSION, HEADER.size, batch, n, k, _ID_CODES[id_dtype], _LOGPROB_CODES[lp_dtype],
        0, float(answer.temperature), answer.input_crc32,
    )
    offset = HEADER.size
    for array, dtype, size in zip((answer.lengths, answer.token_ids, answer.logprobs), ("<u4", id_dtype, lp_dtype), sizes):
        view = np.frombuffer(buffer, dtype=dtype, count=size // np.dtype(dtype).itemsize, offset=offset)
        view[...] = np.asarray(array).reshape(-1)
        offset += size
    return memoryview(buffer)


def decode_binary(body: bytes | memoryview) -> TopKAnswer:
    """Inverse of `encode_binary`; raises WireFormatError unless the body is exactly one whole answer."""
    if len(body) < HEADER.size:
        raise WireFormatError(f"binary answer is {len(body)} bytes, shorter than its {HEADER.size}-byte header")
    magic, version, header_size, batch, tokens, k, id_code, lp_code, _flags, temperature, crc = HEADER.unpack_from(body)
    if magic != MAGIC:
        raise WireFormatError(f"binary answer starts with {magic!r}, not {MAGIC!r}: not a /v1/topk answer")
    if version != VERSION or header_size < HEADER.size:
        raise WireFormatError(f"binary answer has version {version}, header {header_size} B; this client reads v{VERSION}")
    if id_code not in ID_DTYPES or lp_code not in LOGPROB_DTYPES:
        raise WireFormatError(f"binary answer has unknown dtype codes ids={id_code} logprobs={lp_code}")
    id_dtype, lp_dtype = ID_DTYPES[id_code], LOGPROB_DTYPES[lp_code]
    sizes = (4 * batch, id_dtype.itemsize * tokens * k, lp_dtype.itemsize * tokens * k)
    expected = header_size + sum(sizes)
    if len(body) != expected:
        raise WireFormatError(
            f"binary answer is {len(body)} bytes but its header (B={batch}, N={tokens}, k={k}) needs {expected}: "
            "truncated or corrupted transfer"
        )
    offset = header_size
    lengths = np.frombuffer(body, dtype="<u4", count=batch, offset=offset).astype(np.int64)
    offset += sizes[0]
    ids = np.frombuffer(body, dtype=id_dtype, count=tokens * k, offset=offset).reshape(tokens, k)
    offset += sizes[1]
    logprobs = np.frombuffer(body, dtype=lp_dtype, count=tokens * k, offset=offset).reshape(tokens, k)
    if int(lengths.sum()) != tokens:
        raise WireFormatError(f"binary answer row lengths sum to {int(lengths.sum())}, header says N={tokens}")
    return TopKAnswer(lengths, ids, logprobs.astype(np.float32, copy=False), float(temperature), int(crc))


def encode_json(answer: TopKAnswer) -> bytes:
    """`{"token_ids": [[[int]*k]*T_b]*B, "logprobs": same, "temperature", "input_crc32"}` (ragged rows).

    float32 values go out as the shortest decimal of their float64 widening, so they round-trip exactly.
    """
    ids = answer.token_ids.astype(np.int64, copy=False)
    lps = answer.logprobs.astype(np.float64)
    slices = answer.row_slices()
    payload = {
        "token_ids": [ids[s].tolist() for s in slices],
        "logprobs": [lps[s].tolist() for s in slices],
        "temperature": answer.temperature,
        "input_crc32": answer.input_crc32,
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def decode_json(body: bytes | str) -> TopKAnswer:
    """Inverse of `encode_json`; raises WireFormatError on ragged k, mismatched rows or missing keys."""
    try:
        data = json.loads(body)
        id_rows, lp_rows = data["token_ids"], data["logprobs"]
    except (ValueError, KeyError, TypeError) as err:
        raise WireFormatError(f"JSON answer is not a /v1/topk answer: {err}") from None
    if not isinstance(id_rows, list) or not isinstance(lp_rows, list) or len(id_rows) != len(lp_rows):
        raise WireFormatError("JSON answer must hold equally many token_ids and logprobs rows")
    lengths, ids, lps = [], [], []
    for b, (id_row, lp_row) in enumerate(zip(id_rows, lp_rows)):
        try:
            row_ids = np.asarray(id_row, dtype=np.int64)
            row_lps = np.asarray(lp_row, dtype=np.float32)
        except (ValueError, TypeError) as err:
            raise WireFormatError(f"JSON answer row {b} is not a rectangular [T, k] array: {err}") from None
        if row_ids.ndim != 2 or row_ids.shape != row_lps.shape:
            raise WireFormatError(
                f"JSON answer row {b} has token_ids {row_ids.shape} and logprobs {row_lps.shape}; expected equal [T, k]"
            )
        lengths.append(row_ids.shape[0])
        ids.append(row_ids)
        lps.append(row_lps)
    ks = {a.shape[1] for a in ids}
    if len(ks) > 1:
        raise WireFormatError(f"JSON answer rows disagree on k: {sorted(ks)}")
    k = ks.pop() if ks else 0
    return TopKAnswer(
        np.asarray(lengths, dtype=np.int64),
        np.concatenate(ids) if ids else np.zeros((0, k), np.int64),
        np.concatenate(lps) if lps else np.zeros((0, k), np.float32),
        float(data.get("temperature", 1.0)),
        int(data.get("input_crc32", 0)),
    )


def topk_from_logprob_dicts(positions: list[dict[int, float]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-position {token_id: logprob} maps (OpenAI/vLLM shape, possibly k+1 entries because the
    scored token rides along) -> ([T, k] int64 ids, [T, k] float32 logprobs), descending, ties by id."""
    ids = np.empty((len(positions), k), dtype=np.int64)
    lps = np.empty((len(positions), k), dtype=np.float32)
    for t, entries in enumerate(positions):
        if len(entries) < k:
            raise WireFormatError(
                f"position {t} carries {len(entries)} log-probs, fewer than k={k} "
                "(a vLLM server needs --max-logprobs >= k)"
            )
        best = sorted(entries.items(), key=lambda item: (-item[1], item[0]))[:k]
        ids[t] = [i for i, _ in best]
        lps[t] = [lp for _, lp in best]
    return ids, lps

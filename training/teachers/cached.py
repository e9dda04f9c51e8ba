"""CachedTeacher: the teacher's top-k answers read back from a cache folder written by
`python -m training.cache_teacher_logits` (format: docs/cache_format.md). No teacher model is loaded.

Every row of a batch is looked up by the hash of its unpadded input ids, so a cache can only ever answer
for the exact sequence it was computed on; anything else is a clear error that names the cache.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from training.teachers.cache.format import (
    MANIFEST_NAME,
    data_fingerprint,
    make_encoding,
    open_shard,
    read_manifest,
    sequence_key,
    sha256_hex,
    tokenizer_fingerprint,
)
from training.utils.io import sha256_file

from .base import TeacherOutput, TeacherSource, padding_answer
from .prefetch import Prefetcher

# How much of the cache is checked when it is opened (config key `teacher_cache_verify`). The per-row key check
# (a row is answered only for the exact token sequence it was computed on) runs in every mode.
VERIFY_MODES = ("full", "manifest", "none")


class CachedTeacher(TeacherSource):
    """A `TeacherSource` over a teacher cache folder.

    Args:
        cache_dir: the folder (`manifest.json` + `shard-*.safetensors`).
        topk: the k training will ask for; checked against the cache's k at once (optional).
        temperature: the temperature training will ask for; checked against the cache's (optional).
        tokenizer: the training tokenizer (object, folder/id, or fingerprint string); must match the one the
            cache was made with (optional).
        data: the training data spec (folder/file) or its fingerprint; must be the data the cache was made
            from (optional; every row is checked by its hash regardless).
        verify: "full" (default) hashes every shard against the manifest's sha256 (reads the whole cache);
            "manifest" checks each shard's size against the manifest and its header's settings fingerprint
            (no data read; for large caches); "none" skips the size check too (the header is read to open the
            shard anyway, and the per-row key check always runs).
    """

    def __init__(self, cache_dir: str, *, topk: int | None = None, temperature: float | None = None,
                 tokenizer=None, data=None, verify: str = "full"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r} (config key teacher_cache_verify) must be one of {VERIFY_MODES}")
        self.cache_dir = os.path.expanduser(str(cache_dir))
        self.manifest = read_manifest(self.cache_dir)
        self.manifest_path = os.path.join(self.cache_dir, MANIFEST_NAME)
        self.k = int(self.manifest["topk"])
        self.temperature = float(self.manifest["temperature"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.encoding = make_encoding(self.manifest["encoding"], self.k, self.vocab_size)
        # True when answers can hold -inf slots (fewer than k stored entries) whose mass belongs to the tail
        self.empty_slots = self.encoding.name != "naive"
        # True when the encoding dropped top-k entries below a mass threshold: exact for forward KL (their
        # teacher mass is kept in the tail), not for reverse KL / JSD, which weigh the student's mass on them.
        self.drops_entries = getattr(self.encoding, "mass", 1.0) < 1.0
        if topk is not None:
            self._check_k(topk)
        if temperature is not None:
            self._check_temperature(temperature)
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)
        if data is not None:
            self._check_data(data)
        from tqdm.auto import tqdm

        entries = self.manifest["shards"]
        self._shards = [self._open(entry, verify) for entry in tqdm(
            entries, desc=f"checking teacher cache ({verify})", unit="shard", disable=len(entries) < 32)]
        self._build_index()
        self._prefetcher = Prefetcher(workers=1, max_pending=8, name="cached-teacher")

    # ---------------------------------------------------------------- checks

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.k:
            raise ValueError(f"teacher_topk={k} is larger than the cache's k={self.k} ({self.manifest_path}); "
                             f"train with teacher_topk <= {self.k} or rebuild the cache with --topk {k}")

    def _check_temperature(self, temperature: float) -> None:
        if not math.isclose(float(temperature), self.temperature, rel_tol=1e-6, abs_tol=1e-9):
            raise ValueError(
                f"temperature={temperature} differs from the cache's temperature={self.temperature} "
                f"({self.manifest_path}); top-k log-probs cannot be re-tempered exactly. Train at "
                f"{self.temperature} (no temperature schedule) or rebuild the cache with --temperature {temperature}"
            )

    def _check_tokenizer(self, tokenizer) -> None:
        if isinstance(tokenizer, str) and tokenizer.startswith("sha256:") and not os.path.exists(tokenizer):
            fingerprint = tokenizer
        else:
            if isinstance(tokenizer, str):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint != self.manifest["tokenizer_fingerprint"]:
            raise ValueError(
                f"the training tokenizer (fingerprint {fingerprint[:19]}) is not the one the cache was made with "
                f"({self.manifest['tokenizer_fingerprint'][:19]}, {self.manifest_path}); token ids would not "
                "match. Use the cache's tokenizer or rebuild the cache with this one."
            )

    def _check_data(self, data) -> None:
        """Every spec in `data` (a path, or a list of them) must be one of the inputs the cache was made from."""
        known = {src["fingerprint"]: src["path"] for src in self.manifest["data"]["sources"]}
        for spec in [data] if isinstance(data, (str, os.PathLike)) else list(data):
            path = os.path.expanduser(os.fspath(spec))
            if os.path.exists(path):
                fingerprint = data_fingerprint(path)
            else:  # a datasets id
                fingerprint = sha256_hex(f"datasets:{spec}")
            if fingerprint not in known:
                raise ValueError(
                    f"the data {os.fspath(spec)!r} (train_data / eval_data) is not data the cache was made from ({self.manifest_path} "
                    f"lists {sorted(known.values())}); rebuild the cache with `--data {os.fspath(spec)}`"
                )

    def _open(self, entry: dict, verify: str) -> dict:
        path = os.path.join(self.cache_dir, entry["file"])
        if not os.path.exists(path):
            raise FileNotFoundError(f"cache shard {path} listed in {self.manifest_path} is missing; restore it "
                                    "or rebuild the cache (rerunning the producer recreates missing shards)")
        if verify != "none":
            size = os.path.getsize(path)
            if size != entry["bytes"]:
                raise ValueError(f"cache shard {path} is truncated or was replaced: {size} bytes, the manifest "
                                 f"says {entry['bytes']}; rebuild it (rerun the producer after deleting it)")
        if verify == "full" and sha256_file(path) != entry["sha256"]:
            raise ValueError(f"cache shard {path} is corrupted: its sha256 does not match {self.manifest_path}; "
                             "delete it and rerun the producer with the same arguments to rebuild it")
        arrays, metadata = open_shard(path)
        if metadata.get("settings_fingerprint") != self.manifest["settings_fingerprint"]:
            raise ValueError(f"cache shard {path} belongs to another cache (settings fingerprint differs from "
                             f"{self.manifest_path})")
        return arrays

    def _build_index(self) -> None:
        """A sorted table of the first 8 key bytes -> (shard, row); full keys and lengths are checked on use."""
        prefixes, shard_of, row_of = [], [], []
        for s, arrays in enumerate(self._shards):
            keys = np.ascontiguousarray(arrays["keys"])  # [n, 16] uint8
            prefixes.append(keys[:, :8].copy().view("<u8")[:, 0])
            shard_of.append(np.full(keys.shape[0], s, dtype=np.int32))
            row_of.append(np.arange(keys.shape[0], dtype=np.int64))
        prefix = np.concatenate(prefixes) if prefixes else np.zeros(0, np.uint64)
        order = np.argsort(prefix, kind="stable")
        self._prefix = prefix[order]
        self._shard_of = np.concatenate(shard_of)[order] if prefixes else np.zeros(0, np.int32)
        self._row_of = np.concatenate(row_of)[order] if prefixes else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self._prefix.shape[0])

    # ---------------------------------------------------------------- lookup

    def locate(self, ids: np.ndarray) -> tuple[int, int]:
        """(shard, row) of the entry for one unpadded sequence; ValueError when the cache does not have it."""
        key = sequence_key(ids)
        prefix = np.frombuffer(key[:8], dtype="<u8")[0]
        pos = int(np.searchsorted(self._prefix, prefix))
        while pos < len(self._prefix) and self._prefix[pos] == prefix:
            s, r = int(self._shard_of[pos]), int(self._row_of[pos])
            arrays = self._shards[s]
            if bytes(arrays["keys"][r]) == key and int(arrays["lengths"][r]) == len(ids):
                return s, r
            pos += 1
        raise LookupError(key.hex())

    def topk(self, input_ids, attention_mask=None, k: int | None = None, temperature: float = 1.0,
             position_ids=None) -> TeacherOutput:
        """input_ids / attention_mask [B, T] -> TeacherOutput [B, T, k] on input_ids' device.

        `position_ids` (packed rows) change nothing here: a row is answered with what the cache builder computed
        for that very row, and it read a packed row's documents apart (from the same shards' position_ids).

        Each row's real tokens (attention_mask 1; padding may be on either side) are looked up by hash; its
        answer goes to those positions. Padding positions get a uniform distribution over ids 0..k-1 (finite,
        never trained on). When the cache stores fewer than k entries for a token (compact encoding), the
        remaining slots hold log-prob -inf and ids unused in that token: they belong to the tail bucket.
        """
        k = self.k if k is None else int(k)
        prefetched = self._prefetcher.take(self._request_key(input_ids, attention_mask, k, temperature))
        if prefetched is not None:
            return prefetched
        return self._topk(input_ids, attention_mask, k, temperature)

    def prefetch(self, input_ids, attention_mask=None, k: int | None = None, temperature: float = 1.0,
                 position_ids=None) -> None:
        """Start decoding an upcoming batch on a background thread; `topk` with the same inputs returns it."""
        k = self.k if k is None else int(k)
        key = self._request_key(input_ids, attention_mask, k, temperature)
        ids = input_ids.detach().clone()
        mask = attention_mask.detach().clone() if attention_mask is not None else None
        self._prefetcher.submit(key, self._topk, ids, mask, k, temperature)

    @staticmethod
    def _request_key(input_ids, attention_mask, k, temperature) -> tuple:
        ids = input_ids.detach().cpu().numpy()
        mask = attention_mask.detach().cpu().numpy().tobytes() if attention_mask is not None else b""
        return (ids.shape, ids.tobytes(), mask, k, float(temperature))

    def _topk(self, input_ids, attention_mask, k: int, temperature: float) -> TeacherOutput:
        start = time.perf_counter()
        self._check_k(k)
        self._check_temperature(temperature)
        ids = input_ids.detach().cpu().numpy()  # [B, T]
        B, T = ids.shape
        mask = (attention_mask.detach().cpu().numpy() != 0) if attention_mask is not None else np.ones((B, T), bool)
        out = padding_answer(torch.from_numpy(mask), k)  # padding positions hold the stand-in already
        out_ids, out_lp = out.token_ids.numpy(), out.logprobs.numpy()  # [B, T, k] views, filled below
        by_shard: dict[int, list[tuple[int, int, np.ndarray]]] = {}
        for b in range(B):
            positions = np.nonzero(mask[b])[0]
            if positions.size == 0:
                continue
            row = ids[b, positions]
            try:
                s, r = self.locate(row)
            except LookupError as err:
                raise ValueError(
                    f"batch row {b} ({positions.size} tokens, key {err.args[0][:16]}...) is not in the teacher "
                    f"cache {self.cache_dir} (made from {self.manifest['data']['path']!r}, max_seq_length "
                    f"{self.manifest['data']['max_seq_length']}): this cache was made for other data, another "
                    "tokenizer or another truncation. Rebuild it with `python -m training.cache_teacher_logits` "
                    "on the training data with the training max_seq_length."
                ) from None
            by_shard.setdefault(s, []).append((b, r, positions))
        for s, items in by_shard.items():
            arrays = self._shards[s]
            tok = arrays["token_offsets"]
            ent = arrays["entry_offsets"]
            token_ranges = [(int(tok[r]), int(tok[r + 1])) for _, r, _ in items]
            entry_ranges = [(int(ent[r]), int(ent[r + 1])) for _, r, _ in items]
            dec_ids, dec_lp = self.encoding.decode(arrays, token_ranges, entry_ranges, k)  # [n, k] each
            at = 0
            for b, _, positions in items:
                n = positions.size
                out_ids[b, positions] = dec_ids[at : at + n]
                out_lp[b, positions] = dec_lp[at : at + n]
                at += n
        device = input_ids.device
        return TeacherOutput(
            token_ids=out.token_ids.to(device),
            logprobs=out.logprobs.to(device),
            seconds=time.perf_counter() - start,
        )

    def close(self) -> None:
        """Stop the prefetch thread (pending prefetches are dropped); `topk` keeps working."""
        self._prefetcher.close()

    def __repr__(self) -> str:
        return (f"CachedTeacher({self.cache_dir!r}, k={self.k}, encoding={self.encoding.spec}, "
                f"sequences={len(self)}, tokens={self.manifest['totals']['num_tokens']})")


__all__ = ["CachedTeacher"]

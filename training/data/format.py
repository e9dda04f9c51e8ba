"""The pretokenized shard format's names and checks, without the dataset: the file names, the manifest reader and the
tokenizer identity (`tokenizer_fingerprint`) that a shard folder, and a teacher cache made from it, record.

Light on purpose (json and hashlib only): the shard writer (`training.data.preprocess`) and its worker processes,
the teacher cache (`training.teachers.cache.format`) and the evaluation read these without importing torch or the
dataset in `training.data.shards`. Byte layout and fields: docs/data_format.md.
"""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "hf-retnet-pretokenized-shards"
FORMAT_VERSION = 2  # the newest: packed shards carry a `position_ids` column (document boundaries)
UNPACKED_FORMAT_VERSION = 1  # unpacked shards have nothing version 2 adds: written as 1, byte-identical as before
SUPPORTED_FORMAT_VERSIONS = (1, 2)
SHARD_TEMPLATE = "shard-{:05d}.parquet"
ARROW_CACHE_DIRNAME = ".arrow_cache"


# ----------------------------------------------------------------------------- tokenizer identity


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of everything that decides token ids: vocabulary, merges, normalisation,
    special tokens and chat template. Runtime state (padding/truncation settings) is left out, so a
    tokenizer reloaded from disk has the same fingerprint as the one that was saved; so is the pad token,
    which decides no id of the text: training sets pad = EOS on tokenizers that lack one (Llama-3 base),
    and shards made with the tokenizer as shipped must still match."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:  # slow tokenizer: the vocabulary is the best stable description available
        state = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])}
    payload = {
        "backend": state,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(getattr(tokenizer, k, None)) for k in ("bos_token", "eos_token", "unk_token")},
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def describe_tokenizer(tokenizer) -> dict:
    """The manifest's `tokenizer` entry."""
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def check_tokenizer_matches(manifest: dict, tokenizer, manifest_path: str) -> None:
    """Raise a ValueError when `tokenizer` is not the one the shards were made with."""
    want = manifest["tokenizer"]
    got = tokenizer_fingerprint(tokenizer)
    if got != want["fingerprint"]:
        name = getattr(tokenizer, "name_or_path", "") or "<in-memory tokenizer>"
        raise ValueError(
            f"{manifest_path}: these shards were tokenized with {want.get('name_or_path') or '<unnamed>'} "
            f"(fingerprint {want['fingerprint']}), but the tokenizer given is {name} (fingerprint {got}); "
            "token ids would not mean the same thing. Use the tokenizer the shards were made with, or "
            "re-run `python -m training.preprocess --tokenizer <yours>` into a new --output folder."
        )


# ----------------------------------------------------------------------------- versions


def shard_format_version(pack: bool) -> int:
    """The version a folder is written as: 2 for packed shards (they have the `position_ids` column, which a reader
    of version 1 would silently ignore, training across document boundaries), 1 for unpacked ones (unchanged since
    version 1, so they stay readable by older code and byte-identical to what it wrote)."""
    return FORMAT_VERSION if pack else UNPACKED_FORMAT_VERSION


# ----------------------------------------------------------------------------- manifest


def read_manifest(folder: str | os.PathLike) -> dict:
    """Load and sanity-check `folder/manifest.json`; errors name the file and say how to fix it."""
    folder = os.fspath(folder)
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        hint = ""
        if os.path.isdir(folder) and any(n.startswith("shard-") for n in os.listdir(folder)):
            hint = " The folder has shards but no manifest: preprocessing did not finish; re-run it (it resumes)."
        raise FileNotFoundError(f"{path}: no manifest; expected a folder written by `python -m training.preprocess`.{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: manifest is not valid JSON ({e.msg}); re-run preprocessing") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a {FORMAT_NAME} manifest (format={manifest.get('format')!r})")
    if manifest.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported (this code reads "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); re-run preprocessing with this version"
        )
    for key in ("tokenizer", "shards", "totals"):
        if key not in manifest:
            raise ValueError(f"{path}: manifest has no {key!r} entry; re-run preprocessing")
    return manifest

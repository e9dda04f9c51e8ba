"""Training data: raw records and their tokenization rules (`records`), the shard writer (`preprocess`,
`python -m training.preprocess`), the memory-mapped shard dataset and the padding collator (`shards`), public
datasets (`download`) and the offline synthetic corpus (`synthetic`).

The names below load lazily, so `python -m training.preprocess` and its workers import neither torch's data stack
nor anything they do not use: `from training.data import PaddingCollator, build_dataset`.
"""

import importlib

_EXPORTS = {
    "IGNORE_INDEX": ".records",
    "MANIFEST_NAME": ".shards",
    "PaddingCollator": ".shards",
    "PretokenizedShardDataset": ".shards",
    "TokenizedRecordsDataset": ".shards",
    "build_dataset": ".shards",
    "read_manifest": ".shards",
    "tokenizer_fingerprint": ".shards",
    "describe_tokenizer": ".shards",
    "check_tokenizer_matches": ".shards",
    "sha256_file": ".shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)

"""Training data: raw records and their tokenization rules (`records`), the shard writer (`preprocess`,
`python -m training.preprocess`), the memory-mapped shard dataset and the padding collator (`shards`), public
datasets (`download`) and the offline synthetic corpus (`synthetic`).

The names below load lazily, so `python -m training.preprocess` and its workers import neither torch's data stack
nor anything they do not use: `from training.data import PaddingCollator, build_dataset`.
"""

from training.utils.exports import lazy

_EXPORTS = {
    "IGNORE_INDEX": ".records",
    "MANIFEST_NAME": ".format",
    "PaddingCollator": ".shards",
    "PretokenizedShardDataset": ".shards",
    "TokenizedRecordsDataset": ".shards",
    "build_dataset": ".shards",
    "read_manifest": ".format",
    "tokenizer_fingerprint": ".format",
    "describe_tokenizer": ".format",
    "check_tokenizer_matches": ".format",
    "sha256_file": "training.utils.io",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy(__name__, _EXPORTS)

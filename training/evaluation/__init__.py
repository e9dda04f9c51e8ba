"""`python -m training.evaluate` and its parts, one concept a file: the suite and its CLI (`evaluator`:
`evaluate`, `EvalConfig`), loading models, held-out scoring, passkey retrieval, generation samples, decoding
latency, lm-evaluation-harness, plots and the report files.

Nothing here is imported by the trainer: evaluation stays out of the training import path. `evaluate` and
`EvalConfig` load on first use: `from training.evaluation import evaluate`.
"""

import importlib

__all__ = ["EvalConfig", "evaluate"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(".evaluator", __name__), name)

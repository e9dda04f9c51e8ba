"""`python -m training.evaluate` and its parts, one concept a file: the suite and its CLI (`evaluator`:
`evaluate`, `EvalConfig`), loading models, held-out scoring, passkey retrieval, generation samples, decoding
latency, lm-evaluation-harness, plots and the report files.

Nothing here is imported by the trainer: evaluation stays out of the training import path. `evaluate` and
`EvalConfig` load on first use: `from training.evaluation import evaluate`.
"""

from training.utils.exports import lazy

__all__ = ["EvalConfig", "evaluate"]
__getattr__, __dir__ = lazy(__name__, {"EvalConfig": ".evaluator", "evaluate": ".evaluator"})

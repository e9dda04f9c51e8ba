"""Training stability and telemetry as plain `transformers.TrainerCallback`s, usable by any Trainer.

- `SaddleEscapeCallback` (+ `SaddleEscapeConfig`): plateau detection and a temporary LR boost, restored exactly.
- `NonFiniteGuardCallback`: skips NaN/Inf steps, stops after N in a row.
- `MemoryCallback`, `ThroughputCallback`: peak CUDA memory / host RSS; tokens/s, data and step seconds.
- `configure_cuda_allocator()`: `expandable_segments` before CUDA initialises.

They add their metrics to the Trainer's logs in `on_log`, so WandB / TensorBoard (`report_to`) get them too --
provided they run before the reporting callbacks: `Trainer(callbacks=[...])` appends after the reporters, so use
`attach_callbacks(trainer, ...)`, which inserts them in front (the metrics always reach `trainer_state.json`).
"""

from __future__ import annotations

from transformers import TrainerCallback

from .nonfinite import NonFiniteGuardCallback, NonFiniteTrainingError
from .saddle import SaddleDetector, SaddleEscapeCallback, SaddleEscapeConfig
from .telemetry import MemoryCallback, StepTap, ThroughputCallback, configure_cuda_allocator

# Callbacks whose on_log adds keys that the reporters should see.
LOG_CONTRIBUTORS = (SaddleEscapeCallback, NonFiniteGuardCallback, MemoryCallback, ThroughputCallback)


def _is_reporter(callback) -> bool:
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    reporters = tuple(c for c in INTEGRATION_TO_CALLBACK.values() if isinstance(c, type))
    return isinstance(callback, reporters)


def attach_callbacks(trainer, *callbacks: TrainerCallback):
    """Add `callbacks` to `trainer` and move every metric-adding callback of this package in front of the first
    reporting integration (WandB, TensorBoard, ...), keeping relative order; returns the trainer."""
    handler = trainer.callback_handler
    for cb in callbacks:
        handler.callbacks.append(cb)
    ours = [cb for cb in handler.callbacks if isinstance(cb, LOG_CONTRIBUTORS)]
    rest = [cb for cb in handler.callbacks if not isinstance(cb, LOG_CONTRIBUTORS)]
    first_reporter = next((i for i, cb in enumerate(rest) if _is_reporter(cb)), len(rest))
    handler.callbacks = rest[:first_reporter] + ours + rest[first_reporter:]
    return trainer


def report_step_loss(trainer, loss) -> None:
    """Hand a micro-batch's loss (the value backpropagated) to every callback that watches the loss; for trainers
    whose loss is not the model forward's `.loss` (call it from `training_step` or `compute_loss`)."""
    for cb in trainer.callback_handler.callbacks:
        if callable(getattr(cb, "report_loss", None)):
            cb.report_loss(loss)


def default_callbacks(saddle: bool | dict | SaddleEscapeConfig = False) -> list[TrainerCallback]:
    """NaN guard, memory, throughput, and (when asked, with an optional config) saddle escape."""
    out: list[TrainerCallback] = [NonFiniteGuardCallback(), MemoryCallback(), ThroughputCallback()]
    if saddle is not False:
        out.append(SaddleEscapeCallback(None if saddle is True else saddle))
    return out


__all__ = [
    "SaddleEscapeCallback", "SaddleEscapeConfig", "SaddleDetector", "NonFiniteGuardCallback",
    "NonFiniteTrainingError", "MemoryCallback", "ThroughputCallback", "StepTap", "configure_cuda_allocator",
    "attach_callbacks", "report_step_loss", "default_callbacks",
]

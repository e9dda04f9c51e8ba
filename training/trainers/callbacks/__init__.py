"""Training stability and telemetry as plain `transformers.TrainerCallback`s, usable by any Trainer.

- `SaddleEscapeCallback` (+ `SaddleEscapeConfig`): plateau detection and a temporary LR boost, restored exactly.
- `NonFiniteGuardCallback`: skips NaN/Inf steps, stops after N in a row.
- `MemoryCallback`, `ThroughputCallback`: peak CUDA memory / host RSS; tokens/s, data and step seconds.
- `configure_cuda_allocator()`: `expandable_segments` before CUDA initialises.

They add their metrics to the Trainer's logs in `on_log`, so WandB / TensorBoard (`report_to`) get them too --
provided they run before the reporting callbacks: `Trainer(callbacks=[...])` appends after the reporters, so use
`attach_callbacks(trainer, ...)`, which moves them in front (the metrics always reach `trainer_state.json`).
"""

from __future__ import annotations

from transformers import TrainerCallback

from .nonfinite import NonFiniteGuardCallback, NonFiniteTrainingError
from .saddle import SaddleDetector, SaddleEscapeCallback, SaddleEscapeConfig
from .telemetry import MemoryCallback, StepTap, ThroughputCallback, configure_cuda_allocator

# Callbacks whose on_log adds keys that the reporters should see.
LOG_CONTRIBUTORS = (SaddleEscapeCallback, NonFiniteGuardCallback, MemoryCallback, ThroughputCallback)


def _reads_logs(callback) -> bool:
    """Reporting integrations (WandB, TensorBoard, ...) and the console printers: callbacks that consume `logs`."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    readers = tuple(c for c in INTEGRATION_TO_CALLBACK.values() if isinstance(c, type))
    # NotebookProgressCallback by name: importing it needs IPython.
    return isinstance(callback, (*readers, PrinterCallback, ProgressCallback)) or (
        type(callback).__name__ == "NotebookProgressCallback")


def attach_callbacks(trainer, *callbacks: TrainerCallback):
    """Add `callbacks` to `trainer` and move every metric-adding callback of this package in front of the first
    callback that reads the logs (reporting integrations such as WandB / TensorBoard, the console printer), keeping
    relative order; returns the trainer. Safe to call again (e.g. after the Trainer re-added restored callbacks)."""
    handler = trainer.callback_handler
    for cb in callbacks:
        handler.callbacks.append(cb)
    ours = [cb for cb in handler.callbacks if isinstance(cb, LOG_CONTRIBUTORS)]
    rest = [cb for cb in handler.callbacks if not isinstance(cb, LOG_CONTRIBUTORS)]
    first_reader = next((i for i, cb in enumerate(rest) if _reads_logs(cb)), len(rest))
    handler.callbacks = rest[:first_reader] + ours + rest[first_reader:]
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

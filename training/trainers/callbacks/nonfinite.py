"""Skip optimizer steps whose loss or gradients are NaN/Inf instead of writing them into the weights.

The check runs in `on_pre_optimizer_step`, i.e. after the Trainer has clipped the gradients (clipping a NaN
gradient makes every gradient NaN, which is still caught) and right before `optimizer.step()`. A bad step has all
its gradients set to None: torch optimizers (AdamW, Muon, SGD, ...) leave a parameter without a gradient untouched
-- no update, no weight decay, no moment or step-count change -- so the weights and optimizer state stay exactly
those of the last good step. The scheduler still advances (the step is counted, not replayed).

A loss that is non-finite while the gradients are finite (e.g. a NaN added outside the graph) is also skipped: the
loss is what was optimised, and its gradients cannot be trusted. After `max_consecutive` bad steps in a row the run
stops with `NonFiniteTrainingError`, before any further checkpoint, so the last checkpoint on disk is intact.

fp16 with a GradScaler: gradient overflow is the scaler's normal signal (it skips the step and lowers the scale),
so such steps are left to it and not counted; a non-finite loss is still skipped and counted.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from transformers.trainer_utils import get_last_checkpoint

from .telemetry import StepLossCallback, StepTap, add_to_log, distributed_any, grads_of, is_train_log

logger = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Raised after too many consecutive optimizer steps with a non-finite loss or gradient."""


def _gradients_finite(grads: list[torch.Tensor]) -> bool:
    # Max-abs (inf-norm) over every gradient: exact (no overflow, unlike a 2-norm of large fp16 values) and
    # NaN-propagating.
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))))


def _scaler_active(optimizer) -> bool:
    scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer under fp16
    return scaler is not None and getattr(scaler, "is_enabled", lambda: True)()


class NonFiniteGuardCallback(StepLossCallback):
    """Skips (no optimizer update) and counts steps with a NaN/Inf loss or gradient; stops after
    `max_consecutive` bad steps in a row with a `NonFiniteTrainingError` naming the last checkpoint.

    Logs `nonfinite/skipped_steps` (cumulative) and `nonfinite/consecutive`.

    Args:
        max_consecutive: 5 -- a single bad batch (corrupt sample, one overflow) is survivable and common; five in
            a row means the run has diverged and further steps only burn compute.
        check_loss / check_grads: which signals to test. The loss is read from the model's output (`.loss`) or from
            `report_loss()` calls by a trainer that computes its own loss.
    """

    def __init__(self, max_consecutive: int = 5, check_loss: bool = True, check_grads: bool = True):
        if max_consecutive < 1:
            raise ValueError(f"NonFiniteGuardCallback: max_consecutive={max_consecutive} must be >= 1")
        self.max_consecutive, self.check_loss, self.check_grads = max_consecutive, check_loss, check_grads
        self.skipped_steps = 0
        self.consecutive = 0
        self.skipped_at: list[int] = []  # global steps (1-based, as logged) that were skipped
        self._tap = StepTap(loss=check_loss)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        loss = self._tap.step_loss("NonFiniteGuardCallback") if self.check_loss else None
        loss_bad = loss is not None and not math.isfinite(loss)
        grads = grads_of(model) if model is not None else []
        grads_bad = self.check_grads and not _gradients_finite(grads)
        if grads_bad and not loss_bad and _scaler_active(optimizer):
            grads_bad = False  # the GradScaler skips this step and lowers its scale
        if not distributed_any(loss_bad or grads_bad, args.device):
            self.consecutive = 0
            return
        self._drop_gradients(model, optimizer)
        step = state.global_step + 1
        self.skipped_steps += 1
        self.consecutive += 1
        self.skipped_at.append(step)
        what = {(True, False): "loss", (False, True): "gradients"}.get((loss_bad, grads_bad), "loss and gradients")
        logger.warning(f"step {step}: non-finite {what} (loss={loss}); optimizer update skipped "
                       f"({self.consecutive} in a row, {self.skipped_steps} in total)")
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(self._stop_message(args, step))

    def on_step_end(self, args, state, control, **kwargs):
        self._seen_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and is_train_log(logs):
            add_to_log(state, logs, {"nonfinite/skipped_steps": float(self.skipped_steps),
                                     "nonfinite/consecutive": float(self.consecutive)})

    @staticmethod
    def _drop_gradients(model, optimizer) -> None:
        params = list(model.parameters()) if model is not None else []
        if optimizer is not None:
            params += [p for group in optimizer.param_groups for p in group["params"]]
        for p in params:
            p.grad = None

    def _stop_message(self, args, step: int) -> str:
        first = step - self.consecutive + 1
        folder = args.output_dir if args.output_dir and os.path.isdir(args.output_dir) else None
        last = get_last_checkpoint(folder) if folder else None
        where = (f"the last checkpoint, {last}, is untouched: resume from it with --resume_from_checkpoint {last}"
                 if last else "no checkpoint had been saved yet")
        return (
            f"{self.consecutive} consecutive optimizer steps ({first}..{step}) had a non-finite loss or gradient, "
            f"so training stopped (NonFiniteGuardCallback max_consecutive={self.max_consecutive}). None of these "
            f"steps was applied: the weights in memory are those after step {first - 1}, and {where}. Usual causes: "
            "a learning rate too high for this model (lower learning_rate or raise warmup), fp16 overflow (use bf16), "
            "or corrupt batches (check the data around these steps)."
        )

    # ---- checkpoint state ----
    def _init_args(self) -> dict:
        return {"max_consecutive": self.max_consecutive, "check_loss": self.check_loss,
                "check_grads": self.check_grads}

    def _export(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive,
                "skipped_at": list(self.skipped_at)}

    def _import(self, value: dict) -> None:
        self.skipped_steps = int(value.get("skipped_steps", 0))
        self.consecutive = int(value.get("consecutive", 0))
        self.skipped_at = list(value.get("skipped_at", []))

"""Plateau / saddle escape: when the training loss has been flat for a window and the gradients are small, raise
the learning rate for a while, then hand the scheduler's learning rate back exactly.

`SaddleDetector` is the decision logic on plain numbers (loss and gradient norm per optimizer step), so it can be
tested on synthetic sequences. `SaddleEscapeCallback` feeds it from any `transformers.Trainer` and applies its
factor around `optimizer.step()` only: every `param_group["lr"]` is multiplied in `on_pre_optimizer_step` and the
saved values are put back in `on_optimizer_step`, before the Trainer calls `lr_scheduler.step()`. The scheduler
therefore never sees a boosted value, whatever its kind (lambda, cosine, chained, per-group) and however many
groups the optimizer has (Muon + AdamW families, decay / no-decay groups), and the logged `learning_rate` stays
the scheduler's. See docs/stability.md for the reasoning behind each default.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, fields

import torch

from .telemetry import StepLossCallback, StepTap, add_to_log, distributed_mean, finite, grads_of, is_train_log


@dataclass
class SaddleEscapeConfig:
    """Thresholds of the saddle detector and of its intervention (defaults and reasons in docs/stability.md).

    Detection (all must hold, evaluated every optimizer step once the window is full):
    - window: 100 -- steps of loss / grad-norm statistics; 100 per-step losses cut batch noise about 10x while
      still reacting within a few hundred steps.
    - min_steps: 200 -- no detection before this many steps: the loss falls fastest and the LR warms up early on.
    - min_relative_improvement: 0.005 -- "flat" means the least-squares trend across the window changes the loss by
      less than 0.5% of its mean (either way: a rising loss is instability, not a saddle).
    - noise_z: 1.0 -- the flatness must hold with this many standard errors of the trend to spare, so a noisy window
      whose trend is merely uncertain does not count as flat.
    - grad_norm_threshold: 1.0 -- the window's mean gradient norm (as the optimizer applies it, after clipping)
      must be below this; 1.0 is the Trainer's default `max_grad_norm`, so a window clipped on every step is never a
      saddle. None disables the test.
    - loss_floor: 0.0 -- no detection when the window's mean loss is at or below this (nothing left to escape);
      set it to an achievable loss, e.g. the teacher's entropy for KD.

    Intervention:
    - boost_factor: 2.0 -- first LR multiplier; 2x stays within the stable range of tuned Adam/Muon peak LRs.
    - escalation: 1.5 -- each intervention that did not escape multiplies the next factor by this (2, 3, 4.5, ...);
      an escape resets it.
    - max_factor: 8.0 -- cap on the multiplier; beyond ~8x a tuned LR usually diverges.
    - boost_steps: 50 -- steps the boost lasts; long enough to move across a flat region, short enough that Adam's
      second-moment estimate (horizon ~1/(1-beta2) = 1000 steps) stays calibrated.
    - judge_steps: 50 -- after the boost, mean loss over this many steps is compared with the detection window.
    - escape_relative_improvement: 0.005 -- escaped when that mean is at least 0.5% below the plateau's mean loss
      (the same margin that defined "flat").
    - cooldown_steps: 200 -- no new detection for this many steps after a boost ends (the window is also refilled
      with post-boost losses only, so the effective gap is max(cooldown_steps, window)).
    - max_interventions: 10 -- after this many boosts, stop intervening: the plateau is the model/data's limit.
    """

    window: int = 100
    min_steps: int = 200
    min_relative_improvement: float = 0.005
    noise_z: float = 1.0
    grad_norm_threshold: float | None = 1.0
    loss_floor: float = 0.0
    boost_factor: float = 2.0
    escalation: float = 1.5
    max_factor: float = 8.0
    boost_steps: int = 50
    judge_steps: int = 50
    escape_relative_improvement: float = 0.005
    cooldown_steps: int = 200
    max_interventions: int | None = 10

    def __post_init__(self):
        def need(ok: bool, what: str):
            if not ok:
                raise ValueError(f"SaddleEscapeConfig: {what}")

        need(self.window >= 3, f"window={self.window} must be >= 3 (a trend needs three points)")
        need(self.min_steps >= 0, f"min_steps={self.min_steps} must be >= 0")
        need(self.min_relative_improvement > 0, "min_relative_improvement must be > 0")
        need(self.noise_z >= 0, "noise_z must be >= 0")
        need(self.grad_norm_threshold is None or self.grad_norm_threshold > 0,
             "grad_norm_threshold must be > 0 or None")
        need(self.boost_factor > 1, f"boost_factor={self.boost_factor} must be > 1 (it multiplies the LR)")
        need(self.escalation >= 1, f"escalation={self.escalation} must be >= 1")
        need(self.max_factor >= self.boost_factor, "max_factor must be >= boost_factor")
        need(self.boost_steps >= 1 and self.judge_steps >= 1, "boost_steps and judge_steps must be >= 1")
        need(self.escape_relative_improvement >= 0, "escape_relative_improvement must be >= 0")
        need(self.cooldown_steps >= 0, "cooldown_steps must be >= 0")
        need(self.max_interventions is None or self.max_interventions >= 0, "max_interventions must be >= 0 or None")

    @classmethod
    def from_dict(cls, values: dict) -> SaddleEscapeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"SaddleEscapeConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


def window_trend(values) -> tuple[float, float, float]:
    """(mean, change, stderr) of a least-squares line through `values` (one per step): `change` is the fitted
    loss at the last step minus at the first, `stderr` its standard error from the residual scatter."""
    n = len(values)
    t_mean = (n - 1) / 2.0
    mean = sum(values) / n
    sxx = sum((t - t_mean) ** 2 for t in range(n))
    slope = sum((t - t_mean) * (v - mean) for t, v in enumerate(values)) / sxx
    residual = sum((v - mean - slope * (t - t_mean)) ** 2 for t, v in enumerate(values))
    sigma = math.sqrt(residual / max(n - 2, 1))
    span = n - 1
    return mean, slope * span, sigma / math.sqrt(sxx) * span


class SaddleDetector:
    """The state machine: watch -> boost (boost_steps) -> judge (judge_steps) -> watch, with cooldown.

    `update(loss, grad_norm)` is called once per optimizer step, before the update, and returns the LR factor for
    that step's update (1.0 outside a boost). Non-finite losses are ignored as samples."""

    def __init__(self, config: SaddleEscapeConfig | None = None):
        self.config = config or SaddleEscapeConfig()
        self.steps = 0  # update() calls
        self.phase = "watch"
        self.losses: deque = deque(maxlen=self.config.window)
        self.grad_norms: deque = deque(maxlen=self.config.window)
        self.level = 0  # escalation level: failed interventions since the last escape
        self.factor = 1.0
        self.boost_left = 0
        self.plateau_loss = math.nan  # mean loss of the window that triggered the current intervention
        self.judge_losses: list[float] = []
        self.since_boost_end: int | None = None
        self.detections = self.escapes = self.failures = 0
        self.last_improvement = math.nan  # relative loss change measured by the last judgement
        self.events: list[dict] = []  # {"step", "event": detected|escaped|failed, ...}, for logs and tests

    # ---- decision ----
    def stats(self) -> dict:
        mean, change, stderr = window_trend(list(self.losses))
        return {"mean": mean, "change": change, "stderr": stderr}

    def plateau(self) -> bool:
        """The detection test on the current window (ignores phase, warm-up and cooldown)."""
        c = self.config
        if len(self.losses) < c.window:
            return False
        s = self.stats()
        if s["mean"] <= c.loss_floor:
            return False
        if c.grad_norm_threshold is not None:
            if len(self.grad_norms) < c.window // 2:  # the gradient test needs the gradient norms
                return False
            if sum(self.grad_norms) / len(self.grad_norms) >= c.grad_norm_threshold:
                return False
        return abs(s["change"]) + c.noise_z * s["stderr"] < c.min_relative_improvement * abs(s["mean"])

    def _may_detect(self) -> bool:
        c = self.config
        return (
            self.phase == "watch"
            and self.steps >= c.min_steps
            and (self.since_boost_end is None or self.since_boost_end > c.cooldown_steps)
            and (c.max_interventions is None or self.detections < c.max_interventions)
        )

    # ---- per step ----
    def update(self, loss: float | None, grad_norm: float | None = None) -> float:
        c = self.config
        self.steps += 1
        if self.phase == "boost":
            return self._boost_step()
        if self.since_boost_end is not None:
            self.since_boost_end += 1
        if not finite(loss):
            return 1.0
        self.losses.append(float(loss))
        if finite(grad_norm):
            self.grad_norms.append(float(grad_norm))
        if self.phase == "judge":
            self.judge_losses.append(float(loss))
            if len(self.judge_losses) >= c.judge_steps:
                self._judge()
        if self._may_detect() and self.plateau():
            self._start_boost()
            return self._boost_step()
        return 1.0

    def _start_boost(self) -> None:
        c = self.config
        self.plateau_loss = sum(self.losses) / len(self.losses)
        self.factor = min(c.max_factor, c.boost_factor * c.escalation**self.level)
        self.detections += 1
        self.phase, self.boost_left = "boost", c.boost_steps
        self.events.append({"step": self.steps, "event": "detected", "factor": self.factor, "loss": self.plateau_loss})

    def _boost_step(self) -> float:
        factor = self.factor
        self.boost_left -= 1
        if self.boost_left == 0:
            self.phase, self.factor = "judge", 1.0
            self.judge_losses, self.since_boost_end = [], 0
            self.losses.clear()  # the next detection sees post-boost losses only
            self.grad_norms.clear()
        return factor

    def _judge(self) -> None:
        after = sum(self.judge_losses) / len(self.judge_losses)
        self.last_improvement = (self.plateau_loss - after) / abs(self.plateau_loss)
        escaped = self.last_improvement >= self.config.escape_relative_improvement
        if escaped:
            self.escapes, self.level = self.escapes + 1, 0
        else:
            self.failures, self.level = self.failures + 1, self.level + 1
        self.events.append({"step": self.steps, "event": "escaped" if escaped else "failed",
                            "improvement": self.last_improvement})
        self.phase, self.judge_losses = "watch", []

    # ---- checkpointing (JSON values only) ----
    _STATE = ("steps", "phase", "level", "factor", "boost_left", "plateau_loss", "judge_losses", "since_boost_end",
              "detections", "escapes", "failures", "last_improvement", "events")

    def state_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self._STATE}
        out["judge_losses"], out["events"] = list(self.judge_losses), [dict(e) for e in self.events]
        out["losses"], out["grad_norms"] = list(self.losses), list(self.grad_norms)
        return out

    def load_state_dict(self, state: dict) -> None:
        for k in self._STATE:
            if k in state:
                setattr(self, k, state[k])
        self.losses = deque(state.get("losses", []), maxlen=self.config.window)
        self.grad_norms = deque(state.get("grad_norms", []), maxlen=self.config.window)


class SaddleEscapeCallback(StepLossCallback):
    """Detects loss plateaus (`SaddleDetector`) and boosts every param group's LR around `optimizer.step()`.

    Logs (cumulative counts, so no event is lost between logs): `saddle/detected`, `saddle/escaped`,
    `saddle/failed`; and for the interval since the last log: `saddle/intervention` (1.0 if a boost was applied),
    `saddle/factor` (largest LR multiplier applied, 1.0 if none), `saddle/improvement` (last judgement's relative
    loss drop). Its state (window, phase, escalation) is saved in every checkpoint and restored on resume.

    Args:
        config: a `SaddleEscapeConfig` or a dict of its fields; keyword overrides win.
    """

    def __init__(self, config: SaddleEscapeConfig | dict | None = None, **overrides):
        base = asdict(config) if isinstance(config, SaddleEscapeConfig) else dict(config or {})
        self.config = SaddleEscapeConfig.from_dict({**base, **overrides})
        self.detector = SaddleDetector(self.config)
        self._tap = StepTap(loss=True)
        self._saved_lrs: list | None = None
        self._interval_factor = 1.0

    # ---- trainer hooks ----
    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        # Averaged over processes, so that every process takes the same decision.
        loss = distributed_mean(self._tap.step_loss("SaddleEscapeCallback"), args.device)
        grad_norm = None  # gradients are already averaged over processes here
        if self.config.grad_norm_threshold is not None and model is not None:
            grads = grads_of(model)
            grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else None
        factor = self.detector.update(loss, grad_norm)
        if factor != 1.0 and optimizer is not None:
            self._saved_lrs = [group["lr"] for group in optimizer.param_groups]
            for group, lr in zip(optimizer.param_groups, self._saved_lrs):
                group["lr"] = lr * factor
            self._interval_factor = max(self._interval_factor, factor)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._restore_lrs(optimizer)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self._restore_lrs(optimizer)  # in case a custom loop skipped on_optimizer_step
        self._seen_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not is_train_log(logs):
            return
        d = self.detector
        add_to_log(state, logs, {
            "saddle/detected": float(d.detections),
            "saddle/escaped": float(d.escapes),
            "saddle/failed": float(d.failures),
            "saddle/intervention": 1.0 if self._interval_factor > 1.0 else 0.0,
            "saddle/factor": self._interval_factor,
            "saddle/improvement": d.last_improvement if finite(d.last_improvement) else 0.0,
        })
        self._interval_factor = d.factor if d.phase == "boost" else 1.0

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self._restore_lrs(optimizer)
        super().on_train_end(args, state, control, **kwargs)

    def _restore_lrs(self, optimizer) -> None:
        if self._saved_lrs is not None and optimizer is not None:
            for group, lr in zip(optimizer.param_groups, self._saved_lrs):
                group["lr"] = lr  # the very object the scheduler set: exact, not lr * f / f
        self._saved_lrs = None

    # ---- checkpoint state ----
    def _init_args(self) -> dict:
        return {"config": asdict(self.config)}

    def _export(self) -> dict:
        return {"detector": self.detector.state_dict()}

    def _import(self, value: dict) -> None:
        self.detector.load_state_dict(value.get("detector", {}))


__all__ = ["SaddleEscapeConfig", "SaddleDetector", "SaddleEscapeCallback", "window_trend"]

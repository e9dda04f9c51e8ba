"""Saddle escape: the detector on synthetic loss sequences, and the LR boost inside real tiny Trainer runs."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from training.trainers.callbacks import SaddleDetector, SaddleEscapeCallback, SaddleEscapeConfig
from training.trainers.callbacks.saddle import window_trend
from tests.tiny_models import build_tiny_llama

from .random_tokens import VOCAB, RandomTokens


# Small windows so synthetic runs stay short; the logic is the same at the defaults.
SMALL = dict(window=40, min_steps=60, min_relative_improvement=0.005, noise_z=1.0, grad_norm_threshold=0.5,
             boost_steps=10, judge_steps=10, cooldown_steps=60, boost_factor=2.0, escalation=1.5, max_factor=5.0,
             max_interventions=None)


def run_detector(losses, grad_norm=0.1, **overrides):
    det = SaddleDetector(SaddleEscapeConfig(**{**SMALL, **overrides}))
    factors = [det.update(loss, grad_norm) for loss in losses]
    return det, factors


def noisy(values, sigma, seed=0):
    rng = random.Random(seed)
    return [v + rng.gauss(0.0, sigma) for v in values]


# ---------------- synthetic sequences ----------------

def test_window_trend_recovers_a_line_and_its_noise():
    mean, change, stderr = window_trend([5.0 - 0.1 * t for t in range(11)])
    assert mean == pytest.approx(4.5) and change == pytest.approx(-1.0) and stderr == pytest.approx(0.0, abs=1e-9)
    _, change, stderr = window_trend(noisy([1.0] * 400, 0.1))
    assert abs(change) < 3 * stderr and 0.01 < stderr < 0.05  # stderr of the change ~ sigma * sqrt(12 / n)


@pytest.mark.parametrize("sigma", [0.0, 0.002])
def test_fires_on_a_plateau_after_min_steps(sigma):
    descent = [3.0 - 0.01 * t for t in range(100)]  # a real descent first, then flat at 2.0
    det, factors = run_detector(descent + noisy([2.0] * 300, sigma))
    assert det.detections >= 1
    first = det.events[0]
    assert first["event"] == "detected" and first["step"] > 100 and first["loss"] == pytest.approx(2.0, abs=0.01)
    assert factors[first["step"] - 1] == 2.0  # the detecting step's update is already boosted


@pytest.mark.parametrize("curve", ["linear", "exponential", "power"])
def test_never_fires_on_a_steady_descent(curve):
    # "Steady": every window still improves by more than min_relative_improvement (0.5% over 40 steps here).
    n = 1500
    f = {"linear": lambda t: 4.0 - 0.0015 * t,
         "exponential": lambda t: 1.0 + 3.0 * math.exp(-t / 600),
         "power": lambda t: 1.0 + 3.0 * (1 + t / 300) ** -0.5}[curve]
    det, factors = run_detector([f(t) for t in range(n)])
    assert det.detections == 0 and set(factors) == {1.0}


@pytest.mark.parametrize("seed", range(5))
def test_never_fires_on_a_noisy_but_improving_curve(seed):
    # 5% per-step noise around a descent of ~1.5% per window: single points go up and down, the trend does not.
    losses = noisy([3.0 - 0.0012 * t for t in range(1500)], sigma=0.15, seed=seed)
    det, _ = run_detector(losses)
    assert det.detections == 0


def test_never_fires_on_a_rising_loss():
    det, _ = run_detector([2.0 + 0.002 * t for t in range(600)])
    assert det.detections == 0  # divergence is not a saddle: more LR would make it worse


def test_no_detection_above_gradient_threshold_or_below_loss_floor():
    flat = [2.0] * 400
    assert run_detector(flat, grad_norm=0.1)[0].detections > 0
    assert run_detector(flat, grad_norm=0.9)[0].detections == 0  # clipped / steep: not a saddle
    assert run_detector(flat, grad_norm=None)[0].detections == 0  # the gradient test cannot be checked
    assert run_detector(flat, grad_norm=None, grad_norm_threshold=None)[0].detections > 0
    assert run_detector(flat, loss_floor=2.5)[0].detections == 0  # already at the achievable loss


def test_cooldown_and_escalation_on_a_plateau_that_never_escapes():
    det, factors = run_detector([2.0] * 800)
    detections = [e for e in det.events if e["event"] == "detected"]
    assert len(detections) >= 4
    # Each detection waits for boost + cooldown (the window is refilled after the boost too).
    gaps = [b["step"] - a["step"] for a, b in zip(detections, detections[1:])]
    assert min(gaps) >= SMALL["boost_steps"] + max(SMALL["cooldown_steps"], SMALL["window"])
    # Every judgement failed, so the factor escalates 2, 3, 4.5 and is then capped at max_factor.
    assert [e["factor"] for e in detections[:4]] == [2.0, 3.0, 4.5, 5.0]
    assert det.failures >= 3 and det.escapes == 0
    # The factor is applied for exactly boost_steps updates each time.
    unfinished = det.boost_left if det.phase == "boost" else 0
    assert sum(f > 1.0 for f in factors) == len(detections) * SMALL["boost_steps"] - unfinished


def simulate(escape_each_boost: bool, steps=900):
    """A plateau that drops 10% after each boost when escape_each_boost, else stays put."""
    det = SaddleDetector(SaddleEscapeConfig(**SMALL))
    level = 2.0
    for _ in range(steps):
        was_boosting = det.phase == "boost"
        det.update(level, 0.1)
        if was_boosting and det.phase != "boost" and escape_each_boost:
            level *= 0.9  # the boost's last update moved the model off the plateau
    return det


def test_escape_is_judged_and_resets_escalation():
    det = simulate(escape_each_boost=True)
    judged = [e for e in det.events if e["event"] in ("escaped", "failed")]
    assert judged and all(e["event"] == "escaped" for e in judged)
    assert all(e["improvement"] == pytest.approx(0.1) for e in judged)
    assert {e["factor"] for e in det.events if e["event"] == "detected"} == {2.0}  # never escalated
    assert det.escapes == len(judged) and det.failures == 0


def test_max_interventions_stops_intervening():
    det, _ = run_detector([2.0] * 1500, max_interventions=2)
    assert det.detections == 2


def test_detector_state_round_trips_mid_boost():
    losses = [2.0] * 300
    ref, ref_factors = run_detector(losses)
    cut = next(e["step"] for e in ref.events if e["event"] == "detected") + 3  # inside the first boost
    first, _ = run_detector(losses[:cut])
    assert first.phase == "boost"
    state = json.loads(json.dumps(first.state_dict()))  # it goes through trainer_state.json
    resumed = SaddleDetector(SaddleEscapeConfig(**SMALL))
    resumed.load_state_dict(state)
    assert [resumed.update(v, 0.1) for v in losses[cut:]] == ref_factors[cut:]
    assert resumed.state_dict() == ref.state_dict()


@pytest.mark.parametrize("bad", [dict(window=2), dict(boost_factor=1.0), dict(max_factor=1.5), dict(boost_steps=0),
                                 dict(grad_norm_threshold=0.0), dict(min_relative_improvement=0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SaddleEscapeConfig(**bad)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys.*windw"):
        SaddleEscapeCallback({"windw": 10})


# ---------------- real tiny Trainer runs ----------------

class LRRecorder(TrainerCallback):
    """Every param group's lr as `optimizer.step()` sees it (a torch step pre-hook, so it does not depend on the
    order of callbacks), after the saddle callback put it back (before the scheduler steps), and after the
    scheduler stepped."""

    def __init__(self):
        self.applied, self.restored, self.scheduled = [], [], []

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
        inner.register_step_pre_hook(lambda opt, a, k: self.applied.append([g["lr"] for g in opt.param_groups]))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.restored.append([g["lr"] for g in optimizer.param_groups])

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        self.scheduled.append([g["lr"] for g in optimizer.param_groups])


def tiny_args(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), max_steps=16, per_device_train_batch_size=4, learning_rate=1e-5,
                lr_scheduler_type="cosine", warmup_steps=4, logging_steps=1, save_strategy="no", report_to="none",
                use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0, weight_decay=0.01)
    base.update(kw)
    return TrainingArguments(**base)


def make_optimizer(model, kind):
    if kind == "muon+adamw":  # two families, Muon groups then AdamW groups, with different learning rates
        from training.trainers.optim import build_muon_optimizer

        return build_muon_optimizer(model, muon_lr=2e-4, adamw_lr=1e-5, weight_decay=0.01)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01, "lr": 1e-5},
                              {"params": rest, "weight_decay": 0.0, "lr": 3e-6}])


SADDLE_FAST = dict(window=6, min_steps=6, min_relative_improvement=0.05, noise_z=1.0, grad_norm_threshold=None,
                   boost_steps=4, judge_steps=3, cooldown_steps=4, boost_factor=3.0, escalation=2.0, max_factor=12.0)


def train_once(tmp_path, name, optim_kind, callbacks, **kw):
    model = build_tiny_llama(VOCAB, hidden_size=32, num_layers=2, seed=0)
    recorder = LRRecorder()
    trainer = Trainer(model=model, args=tiny_args(tmp_path, name, **kw), train_dataset=RandomTokens(),
                      optimizers=(make_optimizer(model, optim_kind), None), callbacks=[*callbacks, recorder])
    trainer.train()
    return trainer, recorder


@pytest.mark.parametrize("optim_kind", ["adamw-2-groups", "muon+adamw"])
def test_boost_then_exact_scheduler_lr(tmp_path, optim_kind):
    saddle = SaddleEscapeCallback(SADDLE_FAST)
    trainer, with_cb = train_once(tmp_path, "with", optim_kind, [saddle])
    baseline, without = train_once(tmp_path, "without", optim_kind, [])

    boosted = [e for e in saddle.detector.events if e["event"] == "detected"]
    assert len(boosted) >= 2, saddle.detector.events  # the induced plateau was detected, more than once
    assert len(with_cb.applied[0]) >= 2  # several param groups, with different learning rates
    assert len(set(with_cb.applied[-1])) >= 2
    # Put back before the scheduler steps, bit for bit: identical to the run without the callback, every step.
    assert with_cb.restored == without.applied
    assert with_cb.scheduled == without.scheduled

    def logged(t, key):
        return [h[key] for h in t.state.log_history if key in h]

    assert logged(trainer, "learning_rate") == logged(baseline, "learning_rate")
    # During a boost every group got scheduler lr x factor; outside it the optimizer saw the scheduler's lr.
    factors = {}
    for e in boosted:
        for s in range(e["step"], e["step"] + SADDLE_FAST["boost_steps"]):
            factors[s] = e["factor"]
    for step, (applied, base) in enumerate(zip(with_cb.applied, without.applied), start=1):
        f = factors.get(step, 1.0)
        if f == 1.0:
            assert applied == base, step
        else:
            assert applied == pytest.approx([lr * f for lr in base], rel=1e-12) and applied != base, step
    # The tiny LR keeps the loss flat, so each boost fails to escape and the next one escalates.
    assert [e["factor"] for e in boosted[:2]] == [3.0, 6.0]
    assert saddle.detector.failures >= 1
    assert max(logged(trainer, "saddle/factor")) == max(e["factor"] for e in boosted)
    assert 1.0 in logged(trainer, "saddle/intervention") and 0.0 in logged(trainer, "saddle/intervention")
    assert logged(trainer, "saddle/detected")[-1] == float(len(boosted))


@pytest.mark.parametrize("trainer_restores", [False, True])
def test_state_survives_checkpoint_and_resume(tmp_path, trainer_restores):
    """Checkpoint in the middle of a boost; a fresh callback in a resumed Trainer continues that boost."""
    saved = {}

    class Snapshot(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            saved[state.global_step] = json.loads(json.dumps(saddle.detector.state_dict()))

    saddle = SaddleEscapeCallback(SADDLE_FAST)
    kw = dict(save_strategy="steps", save_steps=8, max_steps=16,
              restore_callback_states_from_checkpoint=trainer_restores)
    _, first_lrs = train_once(tmp_path, "run", "adamw-2-groups", [saddle, Snapshot()], **kw)
    assert saved[8]["phase"] == "boost"  # premise: the detection at step 6 boosts steps 6..9

    fresh = SaddleEscapeCallback(SADDLE_FAST)
    model = build_tiny_llama(VOCAB, hidden_size=32, num_layers=2, seed=0)
    recorder = LRRecorder()
    trainer = Trainer(model=model, args=tiny_args(tmp_path, "run", **kw), train_dataset=RandomTokens(),
                      optimizers=(make_optimizer(model, "adamw-2-groups"), None), callbacks=[fresh, recorder])
    loaded = {}

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            live = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SaddleEscapeCallback))
            loaded.update(live.detector.state_dict())

    trainer.add_callback(AtStart())
    trainer.train(resume_from_checkpoint=os.path.join(str(tmp_path / "run"), "checkpoint-8"))
    assert loaded == saved[8]
    with open(tmp_path / "run" / "checkpoint-8" / "trainer_state.json") as f:
        assert "SaddleEscapeCallback" in json.load(f)["stateful_callbacks"]
    # Steps 9 (boosted, from the restored state) onwards use the same LRs as the uninterrupted run.
    assert recorder.applied == first_lrs.applied[8:]
    assert recorder.scheduled == first_lrs.scheduled[8:]

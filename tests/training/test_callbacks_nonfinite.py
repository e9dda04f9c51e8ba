"""Non-finite guard: an injected NaN/Inf step leaves weights and optimizer state untouched; a streak stops the run."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from training.trainers.callbacks import NonFiniteGuardCallback, NonFiniteTrainingError, report_step_loss
from tests.tiny_models import build_tiny_llama

from .random_tokens import VOCAB, RandomTokens



class WeightWatch(TrainerCallback):
    """For each optimizer step (1-based): did any parameter change between its begin and its end?"""

    def __init__(self):
        self.changed: dict[int, bool] = {}
        self._before = None

    def on_step_begin(self, args, state, control, model=None, **kw):
        self._before = [p.detach().clone() for p in model.parameters()]

    def on_step_end(self, args, state, control, model=None, **kw):
        after = list(model.parameters())
        self.changed[state.global_step] = any(not torch.equal(a, b) for a, b in zip(after, self._before))


def tiny_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-3,
                weight_decay=0.1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                disable_tqdm=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


class Corruptor:
    """Corrupts the training forward passes whose 1-based index is in `calls` (micro-batches, in order)."""

    def __init__(self, model, kind: str, calls):
        self.kind, self.calls, self.n = kind, set(calls), 0
        model.register_forward_pre_hook(self._count)
        if kind == "embeddings":  # NaN activations: loss and every gradient NaN
            model.get_input_embeddings().register_forward_hook(
                lambda m, a, out: out * math.nan if self._now() else out)
        elif kind == "loss_only":  # a NaN constant added to the loss: the loss is NaN, the gradients finite
            def add_nan(m, a, out):
                if self._now():
                    out["loss"] = out["loss"] + torch.tensor(math.nan)
                return out
            model.register_forward_hook(add_nan)
        elif kind == "one_grad_inf":  # one parameter's gradient overflows (clipping then spreads NaN)
            weight = model.model.layers[0].mlp.up_proj.weight
            self._armed = False
            model.register_forward_hook(lambda m, a, out: setattr(self, "_armed", self._now()))
            weight.register_hook(lambda g: g * math.inf if self._armed else g)
        else:
            raise ValueError(kind)

    def _count(self, module, args):
        if module.training:
            self.n += 1

    def _now(self) -> bool:
        return self.n in self.calls


@pytest.mark.parametrize("kind", ["embeddings", "loss_only", "one_grad_inf"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_bad_step_is_skipped_and_training_continues(tmp_path, kind, accumulation):
    model = build_tiny_llama(VOCAB, hidden_size=32, num_layers=2, seed=0)
    bad_step = 4
    Corruptor(model, kind, calls=[(bad_step - 1) * accumulation + 1])  # the step's first micro-batch
    guard, watch = NonFiniteGuardCallback(), WeightWatch()
    trainer = Trainer(model=model, args=tiny_args(tmp_path, gradient_accumulation_steps=accumulation),
                      train_dataset=RandomTokens(), callbacks=[guard, watch])
    trainer.train()

    assert trainer.state.global_step == 8  # training went on
    assert guard.skipped_at == [bad_step] and guard.skipped_steps == 1 and guard.consecutive == 0
    assert watch.changed == {s: s != bad_step for s in range(1, 9)}  # that step, and only it, left weights alone
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # No AdamW state moved either: every parameter's step count missed exactly the skipped step.
    steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps == {7.0}
    logged = [h["nonfinite/skipped_steps"] for h in trainer.state.log_history if "nonfinite/skipped_steps" in h]
    assert logged == [0.0] * (bad_step - 1) + [1.0] * (8 - bad_step + 1)


def test_muon_family_is_skipped_too(tmp_path):
    from training.trainers.optim import build_muon_optimizer

    model = build_tiny_llama(VOCAB, hidden_size=32, num_layers=2, seed=0)
    Corruptor(model, "embeddings", calls=[2])
    opt = build_muon_optimizer(model, muon_lr=1e-2, adamw_lr=1e-3, weight_decay=0.1)
    guard, watch = NonFiniteGuardCallback(), WeightWatch()
    trainer = Trainer(model=model, args=tiny_args(tmp_path, max_steps=4), train_dataset=RandomTokens(),
                      optimizers=(opt, None), callbacks=[guard, watch])
    trainer.train()
    assert watch.changed == {1: True, 2: False, 3: True, 4: True}
    assert guard.skipped_at == [2]


class ReportingTrainer(Trainer):
    """A trainer that computes its loss itself and reports it (as the DistillationTrainer does): here the model's
    own `.loss` is finite, and only the reported loss is NaN, on step 3."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.state.global_step + 1 == 3:
            loss = loss + torch.tensor(math.nan)
        report_step_loss(self, loss)
        return loss


def test_reported_loss_takes_precedence_over_the_model_output(tmp_path):
    model = build_tiny_llama(VOCAB, hidden_size=32, num_layers=2, seed=0)
    guard, watch = NonFiniteGuardCallback(), WeightWatch()
    trainer = ReportingTrainer(model=model, args=tiny_args(tmp_path, max_steps=5), train_dataset=RandomTokens(),
                               callbacks=[guard, watch])
    trainer.train()
    assert guard.skipped_at == [3]
    assert watch.changed == {1: True, 2: True, 3: False, 4: True, 5: True}


def test_a_streak_stops_with_a_clear_error_and_the_checkpoint_intact(tmp_path):
    model = build_tiny_llama(VOCAB, hidden_size=32, num_layers=2, seed=0)
    Corruptor(model, "embeddings", calls=range(5, 1000))  # diverged from step 5 on
    guard = NonFiniteGuardCallback(max_consecutive=3)
    trainer = Trainer(model=model, args=tiny_args(tmp_path, max_steps=20, save_strategy="steps", save_steps=3),
                      train_dataset=RandomTokens(), callbacks=[guard])
    with pytest.raises(NonFiniteTrainingError) as err:
        trainer.train()
    out = tmp_path / "out"
    message = str(err.value)
    assert "3 consecutive optimizer steps (5..7)" in message
    assert "weights in memory are those after step 4" in message
    assert f"--resume_from_checkpoint {out / 'checkpoint-6'}" in message
    assert sorted(os.listdir(out)) == ["checkpoint-3", "checkpoint-6"]  # nothing written after the error
    # checkpoint-6 was saved inside the streak, but no bad step was applied: it holds step 4's finite weights,
    # exactly the weights in memory now.
    saved = load_file(out / "checkpoint-6" / "model.safetensors")
    live = dict(model.named_parameters())
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    assert all(torch.equal(t, live[name].detach()) for name, t in saved.items())
    assert guard.skipped_at == [5, 6, 7]


def test_rejects_bad_max_consecutive():
    with pytest.raises(ValueError, match="max_consecutive=0"):
        NonFiniteGuardCallback(max_consecutive=0)

"""Micro-batches without a trained token (all labels -100, or an empty text) are skipped cleanly: zero loss,
nothing divided by zero, the teacher not asked, no optimizer update when the whole step is empty, and counted."""

import pytest
import torch

from training.teachers import DirectTeacher, TeacherSource
from tests.tiny_models import default_texts

from .test_trainer import make_config, make_items, make_trainer, sharp_teacher_dir, step_losses, tok  # noqa: F401


class CountingTeacher(TeacherSource):
    """A real DirectTeacher that counts the batches it is asked about."""

    def __init__(self, inner):
        self.inner, self.vocab_size, self.calls = inner, inner.vocab_size, 0

    def topk(self, input_ids, attention_mask, k, temperature=1.0):
        self.calls += 1
        return self.inner.topk(input_ids, attention_mask, k, temperature)


def empty_items(tok):
    """A row whose labels are all -100 (a prompt-only chunk) and an empty text (BOS only, nothing to predict)."""
    ids = tok(default_texts(1)[0])["input_ids"]
    return [{"input_ids": ids, "labels": [-100] * len(ids)},
            {"input_ids": tok("")["input_ids"], "labels": tok("")["input_ids"]}]


def params_of(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_an_empty_micro_batch_contributes_nothing(tmp_path, sharp_teacher_dir, tok):
    """Gradient accumulation over (empty, real) micro-batches gives the real micro-batch's loss and update."""
    real = make_items(tok, default_texts(2))
    teacher = DirectTeacher(sharp_teacher_dir)
    runs = {}
    for name, items, accumulation in (("with-empty", empty_items(tok) + real, 2), ("real-only", real, 1)):
        config = make_config(tmp_path / name, sharp_teacher_dir, per_device_train_batch_size=2,
                             gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=0.5)
        trainer = make_trainer(config, tok, items, teacher=teacher)
        trainer.train()
        runs[name] = (step_losses(trainer)[1], params_of(trainer), trainer.state.log_history[0])
    (loss_a, params_a, log_a), (loss_b, params_b, _) = runs["with-empty"], runs["real-only"]
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert log_a["skipped_empty_batches"] == 1 and log_a["skipped_empty_steps"] == 0


def test_a_step_without_tokens_updates_nothing(tmp_path, sharp_teacher_dir, tok):
    """An optimizer step whose every micro-batch is empty: zero loss, the weights and AdamW's state untouched
    (even with weight decay), the step counted and logged; the next step trains normally."""
    teacher = CountingTeacher(DirectTeacher(sharp_teacher_dir))
    items = empty_items(tok) + make_items(tok, default_texts(2))
    config = make_config(tmp_path / "empty-step", sharp_teacher_dir, per_device_train_batch_size=2, max_steps=2,
                         weight_decay=0.1)
    trainer = make_trainer(config, tok, items, teacher=teacher)
    before = params_of(trainer)
    seen = {}

    class AfterFirstStep(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 1:
                seen["params"] = [p.detach().clone() for p in model.parameters()]
                seen["optimizer_state"] = len(optimizer.state)

    trainer.add_callback(AfterFirstStep())
    trainer.train()
    for a, b in zip(before, seen["params"]):
        assert torch.equal(a, b)
    assert seen["optimizer_state"] == 0  # no moment was created: the optimizer skipped every parameter
    assert teacher.calls == 1  # only the real batch was sent to the teacher
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert logs[1]["loss"] == 0.0 and "loss/ce" not in logs[1]
    assert logs[1]["skipped_empty_batches"] == 1 and logs[1]["skipped_empty_steps"] == 1
    assert logs[2]["loss"] > 1.0 and logs[2]["loss/ce"] > 1.0 and logs[2]["skipped_empty_steps"] == 1
    assert any(not torch.equal(a, b) for a, b in zip(seen["params"], params_of(trainer)))


def test_an_empty_eval_batch_is_left_out_of_the_means(tmp_path, sharp_teacher_dir, tok):
    real = make_items(tok, default_texts(4)[2:])
    config = make_config(tmp_path / "ev", sharp_teacher_dir, per_device_eval_batch_size=2)
    teacher = DirectTeacher(sharp_teacher_dir)
    with_empty = make_trainer(config, tok, real, teacher=teacher, eval_dataset=empty_items(tok) + real).evaluate()
    real_only = make_trainer(config, tok, real, teacher=teacher, eval_dataset=real).evaluate()
    for key in ("eval_loss", "eval_ce", "eval_kd", "eval_kl", "eval_top1"):
        assert with_empty[key] == pytest.approx(real_only[key], rel=1e-6), key


def test_skip_counts_continue_after_a_resume(tmp_path, sharp_teacher_dir, tok):
    items = empty_items(tok) + make_items(tok, default_texts(4))
    out = tmp_path / "run"
    settings = dict(per_device_train_batch_size=2, save_strategy="steps", save_steps=1)
    make_trainer(make_config(out, sharp_teacher_dir, max_steps=1, **settings), tok, items).train()
    resumed = make_trainer(make_config(out, sharp_teacher_dir, max_steps=3, **settings), tok, items)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    logs = {h["step"]: h for h in resumed.state.log_history if "loss" in h}
    assert sorted(logs) == [1, 2, 3]
    assert [logs[s]["skipped_empty_steps"] for s in (1, 2, 3)] == [1, 1, 1]
    assert logs[3]["skipped_empty_batches"] == 1

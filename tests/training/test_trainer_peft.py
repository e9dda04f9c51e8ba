"""A peft LoRA student (hf_retnet.LORA_TARGET_MODULES) trains through DistillationTrainer: the loss is finite, it
is the same loss as the plain student's at step 1 (LoRA starts as the identity), and only adapter weights move."""

import pytest
import torch

import hf_retnet
from training.teachers import DirectTeacher
from tests.tiny_models import default_texts

from .test_trainer import (  # noqa: F401
    make_config, make_items, make_trainer, sharp_teacher_dir, step_losses, tiny_student, tok,
)

peft = pytest.importorskip("peft")


def lora_student(vocab_size):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=hf_retnet.LORA_TARGET_MODULES, lora_dropout=0.0,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(tiny_student(vocab_size), config)


def test_lora_student_trains_only_its_adapters(tmp_path, sharp_teacher_dir, tok):
    teacher = DirectTeacher(sharp_teacher_dir)
    items = make_items(tok, default_texts(24))
    student = lora_student(len(tok))
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    config = make_config(tmp_path / "lora", sharp_teacher_dir, max_steps=3, learning_rate=1e-2)
    trainer = make_trainer(config, tok, items, teacher=teacher, student=student)
    trainer.train()

    losses = step_losses(trainer)
    assert sorted(losses) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    plain = make_trainer(make_config(tmp_path / "plain", sharp_teacher_dir, max_steps=1), tok, items,
                         teacher=teacher, student=tiny_student(len(tok)))
    plain.train()
    assert losses[1] == pytest.approx(step_losses(plain)[1], rel=1e-5)  # B = 0: the adapters start as identity

    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    adapters = {name for name, _ in trainer.model.named_parameters() if "lora_" in name}
    assert changed and changed <= adapters
    assert any(".lora_B." in name for name in changed)  # B starts at zero: it moves only if gradients reached it

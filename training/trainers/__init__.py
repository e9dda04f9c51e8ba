"""The trainers and what they train with.

- `distillation_config` (`DistillationConfig`, the YAML + `--key value` loader), `distillation_trainer`
  (`DistillationTrainer`), `distillation` (the `python -m training.train` run: tokenizer, student, data, teacher,
  train, save), `losses` (the KD losses), `optim` (Muon + AdamW), `callbacks/` (NaN guard, saddle escape, telemetry).
- `alignment`: stage 1 of a teacher-initialised student (`python -m training.align`).
- `teacher_sft`: correcting the teacher with TRL + LoRA (`python -m training.finetune_teacher`).

Nothing is imported here: `import training.trainers.losses` does not pull in TRL or the Trainer.
"""

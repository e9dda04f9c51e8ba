"""The trainers and what they train with.

- `distillation_config` (`DistillationConfig`, the YAML + `--key value` loader), `distillation_trainer`
  (`DistillationTrainer`), `distillation` (the `python -m training.train` run: tokenizer, student, data, teacher,
  train, save), `losses` (the KD losses), `optim` (Muon + AdamW), `callbacks/` (NaN guard, saddle escape, telemetry).
- `alignment_config` (`AlignConfig`), `alignment_trainer` (`AlignmentTrainer`, the per-layer loss
  `RetentionAlignment`), `alignment` (the `python -m training.align` run: convert, align, save): stage 1 of a
  teacher-initialised student.
- `teacher_sft`: correcting the teacher with TRL + LoRA (`python -m training.finetune_teacher`).

Nothing is imported here: `import training.trainers.losses` does not pull in TRL or the Trainer.
"""

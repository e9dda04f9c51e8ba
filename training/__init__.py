"""Distillation of a Transformer teacher into a RetNet student: config, trainer, losses, teacher sources.

The public names load lazily, so `python -m training.preprocess` and its worker processes do not import the
Trainer stack they never use.
"""

import importlib

_EXPORTS = {
    "DistillationConfig": ".config",
    "load_config": ".config",
    "DistillationTrainer": ".trainer",
    "distillation_loss": ".losses",
    "TeacherOutput": ".teachers",
    "TeacherSource": ".teachers",
    "DirectTeacher": ".teachers",
    "build_teacher_source": ".teachers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)

"""Deprecated: `training.trainer` moved to `training.trainers.distillation_trainer`; this alias goes in the next release."""

from training.utils.exports import moved

__getattr__, __dir__ = moved(__name__, "training.trainers.distillation_trainer")

"""Deprecated: `training.optim` moved to `training.trainers.optim`; this alias goes in the next release."""

from training.utils.exports import moved

__getattr__, __dir__ = moved(__name__, "training.trainers.optim")

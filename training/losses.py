"""Deprecated: `training.losses` moved to `training.trainers.losses`; this alias goes in the next release."""

from training.utils.exports import moved

__getattr__, __dir__ = moved(__name__, "training.trainers.losses")

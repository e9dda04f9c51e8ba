"""Deprecated: `training.callbacks` moved to `training.trainers.callbacks`; this alias goes in the next release."""

from training.utils.exports import moved

__getattr__, __dir__ = moved(__name__, "training.trainers.callbacks")

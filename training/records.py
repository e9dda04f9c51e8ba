"""Deprecated: `training.records` moved to `training.data.records`; this alias goes in the next release."""

from training.utils.exports import moved

__getattr__, __dir__ = moved(__name__, "training.data.records")

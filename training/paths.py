"""Deprecated: `training.paths` moved to `training.utils.paths`; this alias goes in the next release."""

from training.utils.exports import moved

__getattr__, __dir__ = moved(__name__, "training.utils.paths")

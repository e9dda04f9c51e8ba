"""Deprecated: `training.plots` moved to `training.utils.plots`; this alias goes in the next release."""

from training.utils.exports import moved

__getattr__, __dir__ = moved(__name__, "training.utils.plots")

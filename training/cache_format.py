"""Deprecated: `training.cache_format` moved to `training.teachers.cache.format`; this alias goes in the next release."""

from training.utils.exports import moved

__getattr__, __dir__ = moved(__name__, "training.teachers.cache.format")

"""Deprecated: `training.wire` moved to `training.teachers.server.wire`; this alias goes in the next release."""

from training.utils.exports import moved

__getattr__, __dir__ = moved(__name__, "training.teachers.server.wire")

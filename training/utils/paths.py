"""Telling local folders from Hub ids, for the config's checks and the model loaders alike.

A module of its own (no imports from the package) so that the distillation config can validate paths without importing
a teacher source, and the teacher sources can use the same rule without importing the config.
"""

from __future__ import annotations

import os


def looks_like_local_path(value: str) -> bool:
    """A Hub id is `org/name`; anything starting with '/', '.', '~' or with more than one '/' is a local path."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or (os.path.sep == "\\" and "\\" in value)

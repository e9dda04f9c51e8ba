"""Old module paths that keep working for one release after their code moved.

A module that moved leaves a two-line alias behind:

    from training.utils.deprecation import moved
    __getattr__, __dir__ = moved(__name__, "training.trainers.distillation_config")

Every name looked up on the old module is then taken from the new one (the very same object, so `isinstance` checks
and pickles made before the move keep working), with a `DeprecationWarning` that names the new path.
"""

from __future__ import annotations

import importlib
import warnings


def moved(old: str, new: str):
    """The module-level `__getattr__` and `__dir__` of `old`, forwarding to module `new` with a DeprecationWarning."""

    def __getattr__(name: str):
        if name.startswith("__") and name.endswith("__"):  # __path__, __file__, ...: looked up by the import system
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        try:
            value = getattr(importlib.import_module(new), name)
        except AttributeError:
            raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved to {new!r})") from None
        warnings.warn(f"{old}.{name} moved to {new}.{name}; the old path {old!r} goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return value

    def __dir__():
        return sorted(set(dir(importlib.import_module(new))))

    return __getattr__, __dir__

"""Module-level `__getattr__` / `__dir__` pairs: names a module offers without defining them.

- `lazy`: a package's public names, each imported from its defining module on first use (so that
  `import training` or `python -m training.preprocess` does not import the Trainer stack):

      __getattr__, __dir__ = lazy(__name__, {"DistillationTrainer": ".trainers.distillation_trainer"})

- `moved`: an old module path that keeps working for one release after its code moved. Every name looked up on the
  old module is taken from the new one (the very same object, so `isinstance` checks and pickles made before the
  move keep working), with a `DeprecationWarning` that names the new path:

      __getattr__, __dir__ = moved(__name__, "training.trainers.distillation_config")
"""

from __future__ import annotations

import importlib
import sys
import warnings


def lazy(package: str, exports: dict[str, str]):
    """The `__getattr__` and `__dir__` of `package`, whose names in `exports` (name -> defining module, relative to
    `package` when it starts with a dot) load on first use and are then kept as ordinary attributes."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)  # later look-ups skip this function
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__


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

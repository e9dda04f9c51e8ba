"""Helpers shared by every part of `training`, importing nothing else from the package: telling local paths from
Hub ids (`paths`), writing files and folders atomically (`io`), the loss-curve plot (`plots`), and the lazy public
names and moved-module aliases of a module's `__getattr__` (`exports`)."""

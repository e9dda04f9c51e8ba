"""Helpers shared by every part of `training`, importing nothing else from the package: telling local paths from
Hub ids (`paths`), writing files and folders atomically (`io`), the loss-curve plot (`plots`) and the aliases that
keep moved module paths importable for one release (`deprecation`)."""

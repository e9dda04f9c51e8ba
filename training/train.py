"""`python -m training.train`: distil a teacher into a RetNet student (`--config YAML`, any key as `--key value`). The code is `training.trainers.distillation`."""

import sys

from training.trainers.distillation import main
from training.utils.exports import moved

# The names this module held before the code moved keep working for one release (with a DeprecationWarning).
__getattr__, __dir__ = moved(__name__, "training.trainers.distillation")

if __name__ == "__main__":
    sys.exit(main())

"""`python -m training.align`: stage 1 of a teacher-initialised student: attention transfer. The code is `training.trainers.alignment`."""

import sys

from training.trainers.alignment import main
from training.utils.exports import moved

# The names this module held before the code moved keep working for one release (with a DeprecationWarning).
__getattr__, __dir__ = moved(__name__, "training.trainers.alignment")

if __name__ == "__main__":
    sys.exit(main())

"""`python -m training.cache_teacher_logits`: compute the teacher's top-k once into a cache folder. The code is `training.teachers.cache.build`."""

import sys

from training.teachers.cache.build import main
from training.utils.exports import moved

# The names this module held before the code moved keep working for one release (with a DeprecationWarning).
__getattr__, __dir__ = moved(__name__, "training.teachers.cache.build")

if __name__ == "__main__":
    sys.exit(main())

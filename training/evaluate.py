"""`python -m training.evaluate`: evaluate a student against its teacher into `<run>/eval/`. The code is `training.evaluation.evaluator`."""

import sys

from training.evaluation.evaluator import main
from training.utils.exports import moved

# The names this module held before the code moved keep working for one release (with a DeprecationWarning).
__getattr__, __dir__ = moved(__name__, "training.evaluation.evaluator")

if __name__ == "__main__":
    sys.exit(main())

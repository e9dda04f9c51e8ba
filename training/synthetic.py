"""`python -m training.synthetic`: write a deterministic synthetic corpus (JSON lines) for offline runs. The code is `training.data.synthetic`."""

import sys

from training.data.synthetic import main
from training.utils.exports import moved

# The names this module held before the code moved keep working for one release (with a DeprecationWarning).
__getattr__, __dir__ = moved(__name__, "training.data.synthetic")

if __name__ == "__main__":
    sys.exit(main())

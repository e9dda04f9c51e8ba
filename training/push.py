"""`python -m training.push`: publish a finished run to the Hugging Face Hub. The code is `training.hub.push`."""

import sys

from training.hub.push import main
from training.utils.exports import moved

# The names this module held before the code moved keep working for one release (with a DeprecationWarning).
__getattr__, __dir__ = moved(__name__, "training.hub.push")

if __name__ == "__main__":
    sys.exit(main())

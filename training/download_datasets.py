"""`python -m training.download_datasets`: fetch the public training datasets as JSONL. The code is `training.data.download`."""

import sys

from training.data.download import main
from training.utils.exports import moved

# The names this module held before the code moved keep working for one release (with a DeprecationWarning).
__getattr__, __dir__ = moved(__name__, "training.data.download")

if __name__ == "__main__":
    sys.exit(main())

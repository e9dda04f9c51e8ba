"""`python -m training.preprocess`: tokenize text and chat data into Parquet shards plus a manifest. The code is `training.data.preprocess`."""

import sys

from training.data.preprocess import main
from training.utils.exports import moved

# The names this module held before the code moved keep working for one release (with a DeprecationWarning).
__getattr__, __dir__ = moved(__name__, "training.data.preprocess")

if __name__ == "__main__":
    sys.exit(main())

"""`python -m training.serve_teacher`: serve a teacher's top-k over HTTP (`POST /v1/topk`). The code is `training.teachers.server.app`."""

import sys

from training.teachers.server.app import main
from training.utils.exports import moved

# The names this module held before the code moved keep working for one release (with a DeprecationWarning).
__getattr__, __dir__ = moved(__name__, "training.teachers.server.app")

if __name__ == "__main__":
    sys.exit(main())

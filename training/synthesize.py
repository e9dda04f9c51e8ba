"""`python -m training.synthesize`: instruction data written by an instruct teacher. The code is `training.teachers.synthesize`."""

import sys

from training.teachers.synthesize import main

if __name__ == "__main__":
    sys.exit(main())

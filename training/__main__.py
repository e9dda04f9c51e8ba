"""`python -m training <command> ...`: the same as `hf-retnet <command> ...` (see training/utils/commands.py)."""

import sys

from training.utils.commands import main

if __name__ == "__main__":
    sys.exit(main())

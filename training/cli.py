"""`hf-retnet <command> ...`: the console script (setup.cfg). The table and the dispatcher are
`training.utils.commands`; `python -m training <command>` runs the same."""

import sys

from training.utils.commands import COMMANDS, PROG, Command, find_command, main, overview  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())

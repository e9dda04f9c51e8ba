"""How every command answers a mistake in its input: one line, `error: <what is wrong and the fix>`, on stderr, exit
status 2, no traceback. A traceback is for a bug, or when asked for: `--debug` anywhere on the command line (it is
taken out before the command parses its arguments) or `HF_RETNET_DEBUG=1` in the environment.

    from training.utils.errors import command

    @command
    def main(argv: list[str] | None = None) -> int:
        ...

An expected mistake is what the project's own checks raise (`ValueError` and its subclasses: a bad value, a wrong
file, a mismatch) and what the file system or the Hub answer about the inputs (`OSError`: `FileNotFoundError`,
`FileExistsError`, `NotADirectoryError`, a Hub id that cannot be reached), plus a missing optional package
(`ImportError`, whose message says what to install). Anything else (`RuntimeError`, `KeyError`, `TypeError`, ...)
is treated as a bug and keeps its traceback. `SystemExit` (argparse's usage errors, `--help`) and
`KeyboardInterrupt` pass through untouched.
"""

from __future__ import annotations

import functools
import os
import sys

DEBUG_ENV = "HF_RETNET_DEBUG"
DEBUG_FLAG = "--debug"
EXIT_INPUT_ERROR = 2  # argparse's status for a usage error
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)


# Values of TrainingArguments' own `--debug` option (transformers.debug_utils.DebugOption): `--debug
# underflow_overflow` is the Trainer's, not a request for tracebacks, and is left in place.
TRAINER_DEBUG_VALUES = ("underflow_overflow", "tpu_metrics_debug")


def _debug_flags(argv: list[str]) -> list[int]:
    """Positions of our `--debug` in argv (not TrainingArguments' `--debug <option>`)."""
    return [i for i, arg in enumerate(argv) if arg == DEBUG_FLAG and not (
        i + 1 < len(argv) and any(value in argv[i + 1].split() for value in TRAINER_DEBUG_VALUES))]


def debug_requested(argv: list[str] | None = None) -> bool:
    """True when `--debug` is in `argv` or HF_RETNET_DEBUG is set to something other than '', '0', 'false', 'no'."""
    if argv is not None and _debug_flags(list(argv)):
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def error_line(err: BaseException) -> str:
    """The message of `err` as printed: its text (the class name when it has none), prefixed with `error: `."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return f"error: {text}"


def run_command(main, argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Call `main(argv)` (argv: the command's arguments, default `sys.argv[1:]`, `--debug` taken out) and turn an
    expected mistake into `error: ...` on stderr and exit status 2. Returns main's status (None counts as 0)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debug_requested(argv)
    ours = set(_debug_flags(argv))
    argv = [arg for i, arg in enumerate(argv) if i not in ours]
    try:
        status = main(argv)
    except EXPECTED_ERRORS as err:
        if debug:
            raise
        line = error_line(err)
        if prog:
            line = f"{prog}: {line}"
        print(line, file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
    return 0 if status is None else int(status)


def command(main):
    """Decorator for a command's `main(argv=None) -> int`: the same function, answering expected mistakes with one
    line and exit status 2 (see the module docstring). The undecorated function is `main.__wrapped__`."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        return run_command(main, argv)

    return wrapper

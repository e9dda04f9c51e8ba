"""One parser for every command: a YAML file (`--config FILE`) and `--key value` flags, over dataclasses.

    parser = CommandParser(MyArguments, prog="python -m training.my_command", description="...")
    (args,) = parser.parse_or_exit(argv)      # a command's main: a bad key exits 2 with one line on stderr
    (args,) = parser.parse(argv)              # library code and tests: raises ConfigError (a ValueError)

Built on `transformers.HfArgumentParser` (as TRL's `TrlParser` is): every dataclass field is a flag, spelled with
`_` or `-` (`--max_seq_length`, `--max-seq-length`, even `--max_seq-length`), and a YAML key. What it adds:

- `--config FILE`: a YAML mapping of the same keys; flags given on the command line win over it.
- Unknown keys, in the YAML or on the command line, fail with one line naming the key and the closest valid one.
- YAML values are checked against the field's type and reported as YAML (`config file 'x.yaml': key 'max_steps'
  must be an integer, got 'ten'`); a config path that is a folder, is missing or is not a YAML mapping says so.
- Required keys may come from either place; a missing one is named.
- Fields with `metadata={"positional": True}` are positional arguments (`push RUN_DIR REPO_ID`), `tuple[X, ...]`
  fields take several values like lists, and help text may contain a literal `%`.
- Mapping and list-of-mapping fields (`dict`, `list`, `list[dict]`) take one YAML value on the command line
  (`--train '{max_steps: 5}'`); with `metadata={"merge": True}` a mapping given there updates the YAML file's
  mapping key by key instead of replacing it.

Nothing here imports the rest of `training`. The dataclasses' own `__post_init__` checks ranges and paths; their
errors are theirs and pass through unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import difflib
import enum
import os
import re
import sys
import types
import typing
from typing import Any, Iterable

from transformers import HfArgumentParser

CONFIG_OPTION = "--config"


class ConfigError(ValueError):
    """A bad command line or config file: an unknown key, a value of the wrong type, a missing file or key."""


class ConfigFileError(ConfigError, FileNotFoundError):
    """The config file is missing or is not a file."""


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET = _Unset()  # "not given": lets the parser tell flags given on the command line from defaults

# The program name the `hf-retnet` dispatcher sets while a command runs, so its --help and errors say
# `hf-retnet train` rather than `python -m training.train`.
_PROG: contextvars.ContextVar[str | None] = contextvars.ContextVar("hf_retnet_prog", default=None)


@contextlib.contextmanager
def program_name(name: str):
    """Commands parsed inside this block call themselves `name` (in usage lines and errors)."""
    token = _PROG.set(name)
    try:
        yield
    finally:
        _PROG.reset(token)


def current_program(default: str) -> str:
    return _PROG.get() or default


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions kept as written; a default shown only where it says something (not None, not already in the help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is UNSET or default is argparse.SUPPRESS or "default" in text.lower()
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def _escape_percent(text: str) -> str:
    """argparse formats help with `%`: escape the literal ones (transformers' own help has "~20% slower")."""
    return re.sub(r"(?<!%)%(?![(%])", "%%", text)


class CommandParser(HfArgumentParser):
    """`HfArgumentParser` + `--config YAML`, strict keys, YAML type checks and positional fields (module docstring)."""

    def __init__(self, dataclass_types, *, prog: str | None = None, description: str | None = None,
                 epilog: str | None = None, config_option: bool = True, **kwargs):
        if dataclasses.is_dataclass(dataclass_types):
            dataclass_types = [dataclass_types]
        self.dataclass_types = list(dataclass_types)
        self.config_option = config_option
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # `--max_step` is a typo, not `--max_steps`
        super().__init__(self.dataclass_types, prog=current_program(prog or os.path.basename(sys.argv[0])),
                         description=description, epilog=epilog, **kwargs)
        if config_option:
            self.add_argument(CONFIG_OPTION, metavar="YAML", default=UNSET,
                              help="a YAML file of keys (the flags' names, without --); flags on the command line win")
        self._fields: dict[str, tuple[type, dataclasses.Field, Any]] = {}
        for dtype in self.dataclass_types:
            hints = typing.get_type_hints(dtype)
            for f in dataclasses.fields(dtype):
                if f.init:
                    self._fields[f.name] = (dtype, f, hints[f.name])
        self.required_keys = [name for name, (_, f, _) in self._fields.items()
                              if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                              and not f.metadata.get("positional")]
        self._spellings: dict[str, str] = {}  # "max_seq_length" -> "--max_seq_length" (any `-`/`_` mix maps here)
        for action in self._actions:
            if action.help:
                action.help = _escape_percent(action.help)
            if action.option_strings and action.dest in self.required_keys and action.required:
                action.required = False  # may come from the YAML; parse() names a key missing from both
                action.help = "(required) " + (action.help or "")
            for option in action.option_strings:
                if option.startswith("--"):
                    self._spellings.setdefault(option[2:].replace("-", "_"), option)

    # ------------------------------------------------------------------ building the flags

    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field):
        """Positional fields and `tuple[X, ...]` fields here; everything else as HfArgumentParser does it."""
        metadata = {k: v for k, v in field.metadata.items() if k != "positional"}
        origin = typing.get_origin(field.type)
        if field.metadata.get("positional"):
            has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
            parser.add_argument(field.name, metavar=field.name.upper(), help=metadata.get("help"),
                                **({"nargs": "?", "default": UNSET} if has_default else {}))
            return
        if _takes_yaml(field.type):
            parser.add_argument(f"--{field.name}", *([f"--{field.name.replace('_', '-')}"] if "_" in field.name else []),
                                type=_yaml_value, metavar="YAML", default=UNSET, help=metadata.get("help"))
            return
        if origin is tuple:
            args = [a for a in typing.get_args(field.type) if a is not Ellipsis]
            default = field.default if field.default is not dataclasses.MISSING else (
                field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
            parser.add_argument(f"--{field.name}", *([f"--{field.name.replace('_', '-')}"] if "_" in field.name else []),
                                nargs="*", type=args[0] if args else str, default=default,
                                **{k: v for k, v in metadata.items() if k in ("help", "choices", "metavar")})
            return
        HfArgumentParser._parse_dataclass_field(parser, field)

    # ------------------------------------------------------------------ parsing

    def error(self, message: str):  # argparse's errors (a bad value on the command line) become ConfigError
        raise ConfigError(f"command line: {message}")

    def parse(self, argv: Iterable[str] | None = None) -> tuple:
        """The dataclass instances (one per dataclass type, in order). Raises ConfigError on a bad key or value;
        a dataclass's own `__post_init__` errors pass through."""
        return self.build(self.parse_values(argv))

    def parse_or_exit(self, argv: Iterable[str] | None = None) -> tuple:
        """`parse` for a command's `main`: a ConfigError prints `<prog>: error: <message>` and exits with status 2."""
        try:
            return self.parse(argv)
        except ConfigError as err:
            self.exit(2, f"{self.prog}: error: {err}\n")

    def values_or_exit(self, argv: Iterable[str] | None = None) -> dict[str, Any]:
        """`parse_values` for a command's `main` (exits 2 with one line on a ConfigError)."""
        try:
            return self.parse_values(argv)
        except ConfigError as err:
            self.exit(2, f"{self.prog}: error: {err}\n")

    def parse_values(self, argv: Iterable[str] | None = None) -> dict[str, Any]:
        """The merged values, YAML then command line, type-checked, before any dataclass is built (commands that
        must act before their config's `__post_init__`, such as CUDA allocator settings, read them here)."""
        argv = list(sys.argv[1:] if argv is None else argv)
        cli = self._parse_command_line(argv)
        config_path = cli.pop("config", None) if self.config_option else None
        values = self.read_config_file(config_path) if config_path is not None else {}
        for key, value in cli.items():
            _, f, hint = self._fields.get(key, (None, None, None))
            if f is not None and _takes_yaml(hint):
                try:
                    value = coerce(value, hint, none_ok=f.default is None)
                except _Mismatch as mismatch:
                    raise ConfigError(f"command line: --{key} must be {mismatch.expected}, got {value!r}") from None
                if f.metadata.get("merge") and isinstance(value, dict) and isinstance(values.get(key), dict):
                    value = {**values[key], **value}
            values[key] = value
        missing = [key for key in self.required_keys if key not in values]
        if missing:
            key = missing[0]
            raise ConfigError(f"missing required key '{key}': pass --{key} VALUE"
                              + (" or set it in the --config YAML" if self.config_option else ""))
        return values

    def build(self, values: dict[str, Any]) -> tuple:
        out = []
        for dtype in self.dataclass_types:
            names = {f.name for f in dataclasses.fields(dtype) if f.init}
            out.append(dtype(**{k: v for k, v in values.items() if k in names}))
        return tuple(out)

    def _parse_command_line(self, argv: list[str]) -> dict[str, Any]:
        argv = self._canonical_spellings(argv)
        dests = {a.dest for a in self._actions if a.dest != "help"}
        namespace = argparse.Namespace(**dict.fromkeys(dests, UNSET))
        namespace, extras = self.parse_known_args(argv, namespace)
        if extras:
            raise ConfigError(f"command line: unexpected argument {extras[0]!r}; pass values as --key VALUE"
                              + (" (a YAML file as --config FILE)" if self.config_option else ""))
        values = {k: v for k, v in vars(namespace).items() if v is not UNSET}
        for key, value in values.items():
            if key in self._fields and isinstance(value, list) and typing.get_origin(self._fields[key][2]) is tuple:
                values[key] = tuple(value)
        return values

    def _canonical_spellings(self, argv: list[str]) -> list[str]:
        out = []
        for i, token in enumerate(argv):
            if token == "--":
                return out + argv[i:]
            if token.startswith("--"):
                key, eq, value = token[2:].partition("=")
                option = self._spellings.get(key.replace("-", "_"))
                if option is None:
                    raise ConfigError(f"unknown config key '{key.replace('-', '_')}' ({token.partition('=')[0]} "
                                      f"on the command line){self._suggest(key, flags=True)}")
                token = option + eq + value
            out.append(token)
        return out

    def _suggest(self, key: str, flags: bool = False) -> str:
        candidates = list(self._fields) + ([CONFIG_OPTION[2:]] if flags and self.config_option else [])
        key = key.replace("-", "_")
        close = difflib.get_close_matches(key, candidates, n=1) or sorted(
            (c for c in candidates if len(key) >= 3 and key in c), key=len)[:1]
        if close:
            return f"; did you mean '--{close[0]}'?" if flags else f"; did you mean '{close[0]}'?"
        return f"; see `{self.prog} --help`"

    # ------------------------------------------------------------------ the YAML file

    def read_config_file(self, path: str | os.PathLike) -> dict[str, Any]:
        """The file's mapping, every key known and every value of its field's type (else ConfigError naming both)."""
        import yaml

        path = os.fspath(path)
        where = f"config file {path!r}"
        if os.path.isdir(path):
            raise ConfigFileError(f"{where} is a folder, not a YAML file")
        if not os.path.isfile(path):
            raise ConfigFileError(f"{where} does not exist")
        try:
            with open(path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{where}: not valid YAML{at} ({getattr(err, 'problem', None) or err})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: not UTF-8 text") from None
        if loaded is None:
            return {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where} must hold a mapping of keys to values, not a {type(loaded).__name__}")
        values = {}
        for key, value in loaded.items():
            if not isinstance(key, str) or key not in self._fields:
                raise ConfigError(f"unknown config key '{key}' in {where}{self._suggest(str(key))}")
            _, f, hint = self._fields[key]
            try:
                values[key] = coerce(value, hint, none_ok=f.default is None)
            except _Mismatch as mismatch:
                raise ConfigError(f"{where}: key '{key}' must be {mismatch.expected}, got {value!r} "
                                  f"({type(value).__name__})") from None
            choices = f.metadata.get("choices")
            given = values[key] if isinstance(values[key], (list, tuple)) else [values[key]]
            if choices is not None and values[key] is not None and any(v not in choices for v in given):
                raise ConfigError(f"{where}: key '{key}' must be one of {list(choices)}, got {value!r}")
        return values


# ---------------------------------------------------------------------- YAML values against field types


def _takes_yaml(hint) -> bool:
    """A mapping, or a list that is not of scalars: one YAML value on the command line (`str` unions excepted: a
    field that also takes a string parses it itself)."""
    args = [a for a in typing.get_args(hint) if a is not _NONE]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return str not in args and any(_takes_yaml(a) for a in args)
    if hint is dict or typing.get_origin(hint) is dict:
        return True
    if hint is list or typing.get_origin(hint) is list:
        return not args or not (isinstance(args[0], type) and args[0] in (str, int, float, bool))
    return False


def _yaml_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not a YAML value ({getattr(err, 'problem', None) or err})") from None



class _Mismatch(Exception):
    def __init__(self, expected: str):
        self.expected = expected


_NONE = type(None)
_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


def coerce(value, hint, none_ok: bool = False):
    """`value` (as YAML gave it) as a value of type `hint`, or _Mismatch. Numbers written as YAML strings
    ("3e-4", which YAML 1.1 does not read as a float) become numbers; anything unknown is passed through."""
    if value is None and (none_ok or hint is _NONE or hint is Any):
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and _NONE in args:
            return None
        wanted = []
        for member in (a for a in args if a is not _NONE):
            try:
                return coerce(value, member)
            except _Mismatch as mismatch:
                wanted.append(mismatch.expected)
        raise _Mismatch(" or ".join(dict.fromkeys(wanted)) + (" (or null)" if _NONE in args else ""))
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch(f"one of {list(args)}")
    if hint is Any or hint is object:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise _Mismatch("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    number = float(value)
                except ValueError:
                    pass
                else:
                    if number.is_integer():
                        return int(number)
        raise _Mismatch("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch("a string" + (" (quote it: YAML reads yes/no/on/off as booleans)"
                                      if isinstance(value, bool) else ""))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        choices = [m.value for m in hint]
        if value in choices:
            return value
        raise _Mismatch(f"one of {choices}")
    if origin in (list, tuple) or hint in (list, tuple):
        element = args[0] if args and args[0] is not Ellipsis else Any
        if isinstance(value, dict):
            raise _Mismatch("a list")
        items = value if isinstance(value, (list, tuple)) else [value]
        try:
            out = [coerce(item, element) for item in items]
        except _Mismatch as mismatch:
            raise _Mismatch(f"a list of {mismatch.expected.removeprefix('a ').removeprefix('an ')}s"
                            if mismatch.expected.startswith(("a ", "an ")) else f"a list ({mismatch.expected})") from None
        return tuple(out) if (origin or hint) is tuple else out
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch("a mapping")
    if isinstance(hint, type) and not isinstance(value, hint) and hint.__module__ == "builtins":
        raise _Mismatch(f"a {hint.__name__}")
    return value  # a type this check does not know: the dataclass decides


def type_name(hint) -> str:
    """A short human name of a field type, for help pages: `int`, `str | None`, `list[str]`, `one of a, b`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        names = [type_name(a) for a in args if a is not _NONE]
        return " | ".join(dict.fromkeys(names)) + (" | None" if _NONE in args else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return f"list[{type_name(inner[0])}]" if inner else "list"
    if origin is dict:
        return "mapping"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in hint)
    if hint is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))

"""`hf-retnet <command> ...` (and `python -m training <command> ...`): one entry point for every command.

The table of commands and the dispatcher. It names each command's module as a string and imports only the one it
runs, so `hf-retnet --help` is instant and nothing here imports the rest of the package at import time.
`training/cli.py` (the console script's target) and `training/__main__.py` call it.

Each command is also its own module, `python -m training.<command with _>` (`python -m training.train`), and
works under `accelerate launch -m training <command> ...` or `accelerate launch -m training.<command> ...`.
Every command parses its arguments the same way (`training.utils.parser.CommandParser`: `--config YAML`, then
`--key value` flags in either `_` or `-` spelling); `hf-retnet <command> --help` lists its keys.

Adding a command is one line in COMMANDS: its name, the module whose `main(argv)` runs it (and whose
`build_parser()` documents it: `python -m training.docgen`), and a one-line description.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from dataclasses import dataclass

PROG = "hf-retnet"


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # defines main(argv) -> int and, except the demo, build_parser()
    summary: str
    aliases: tuple[str, ...] = ()

    @property
    def python_module(self) -> str:
        """`python -m <this>` runs the command too."""
        return "training." + self.name.replace("-", "_")


COMMANDS: tuple[Command, ...] = (
    Command("train", "training.trainers.distillation", "distil a teacher into a RetNet student (direct, cached or network teacher)"),
    Command("align", "training.trainers.alignment", "stage 1 of a teacher-initialised student: attention transfer from a Llama"),
    Command("preprocess", "training.data.preprocess", "tokenize text and chat records into Parquet shards + manifest"),
    Command("cache-teacher-logits", "training.teachers.cache.build", "run the teacher once and store its top-k in a cache folder", ("cache",)),
    Command("serve-teacher", "training.teachers.server.app", "serve a teacher's top-k over HTTP (POST /v1/topk)", ("serve",)),
    Command("finetune-teacher", "training.trainers.teacher_sft", "correct the teacher on the data first (TRL SFTTrainer + LoRA)"),
    Command("evaluate", "training.evaluation.evaluator", "held-out loss and agreement with the teacher, passkey, latency, lm-eval"),
    Command("push", "training.hub.push", "publish a finished run (weights, code, tokenizer, card) to the Hub"),
    Command("model-card", "training.hub.model_card", "write a finished run's model card (RUN_DIR/README.md)"),
    Command("convert-llama2c", "training.converters.llama2c", "convert a llama2.c checkpoint and tokenizer into a Llama folder"),
    Command("convert-gguf", "training.converters.gguf", "convert a Llama GGUF file (llama.cpp) into a checked safetensors Llama folder"),
    Command("synthesize", "training.teachers.synthesize", "let an instruct teacher write its own chat data (Magpie-style), resumable"),
    Command("download-datasets", "training.data.download", "download the public training datasets as JSON lines"),
    Command("synthetic", "training.data.synthetic", "write a deterministic synthetic corpus (JSON lines) for offline runs"),
    Command("demo", "training.demo.pipeline", "the end-to-end demo: a real Llama distilled into RetNet students, with a report"),
)


def find_command(name: str) -> Command | None:
    for command in COMMANDS:
        if name == command.name or name in command.aliases or name == command.name.replace("-", "_"):
            return command
    return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hf-retnet")
    except PackageNotFoundError:
        return "unknown (not installed)"


def overview() -> str:
    width = max(len(c.name) for c in COMMANDS) + 2
    lines = [
        f"usage: {PROG} <command> [--config YAML] [--key value ...]",
        "       python -m training <command> ...    (or python -m training.<command>, with _ for -)",
        "",
        "Distil a pretrained Transformer (a Llama) into a RetNet student on the Hugging Face stack.",
        "",
        "commands:",
    ]
    for c in COMMANDS:
        alias = f" (alias: {', '.join(c.aliases)})" if c.aliases else ""
        lines.append(f"  {c.name:<{width}}{c.summary}{alias}")
    lines += [
        "",
        f"`{PROG} <command> --help` lists the command's keys: every key is a --flag (spelled with _ or -) and a",
        "key of the YAML file given with --config. Documentation: docs/index.md.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        sys.stderr.write(overview())
        return 2
    first, rest = argv[0], argv[1:]
    if first in ("-h", "--help", "help") and not rest:
        sys.stdout.write(overview())
        return 0
    if first == "help":  # `hf-retnet help train` = `hf-retnet train --help`
        first, rest = rest[0], ["--help"]
    if first in ("-V", "--version"):
        print(f"{PROG} {_version()}")
        return 0
    command = find_command(first)
    if command is None:
        names = [c.name for c in COMMANDS] + [a for c in COMMANDS for a in c.aliases]
        close = difflib.get_close_matches(first, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; `{PROG} --help` lists the commands"
        sys.stderr.write(f"{PROG}: error: unknown command '{first}'{hint}\n")
        return 2
    from training.utils.parser import program_name

    module = importlib.import_module(command.module)
    with program_name(f"{PROG} {command.name}"):
        code = module.main(rest)
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())

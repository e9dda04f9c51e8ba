"""Every command in README.md and docs/**/*.md runs as written, and the command reference is what the code says.

The fenced bash blocks are read; each `python -m ...`, `hf-retnet ...`, `accelerate launch ... -m ...` and
`python <script>.py ...` command in them is checked:

- a project command (`hf-retnet <command>`, `python -m training[.<command>]`, `python -m training.docgen`) is
  parsed for real, in process, by its own parser (`build_parser().parse_values`): every flag and every key of
  the YAML it names exists and has the right type. Nothing is loaded or run, so no GPU, Hub or data is needed;
- any other module or script (`python -m hf_retnet.convert_torchscale`, `python bench/bench_cache.py --quick`)
  runs with `--help`, which must succeed and list every flag the doc uses.

A command that cannot be checked here (it needs a GPU, the Hub or the network, or is another program's) carries
the marker `# doc-test: skip (<why>)` at the end of its line or on the line above it. A failure names the file and
line of the command.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = re.compile(r"#\s*doc-test:\s*skip\b(.*)$")
SKIP_REASONS = re.compile(r"GPU|Hub|network|vLLM", re.IGNORECASE)
SEPARATORS = {"&&", "||", ";", "|"}


@dataclass
class DocCommand:
    where: str  # file:line
    argv: list[str]
    skip: str | None = None


def doc_files() -> list[str]:
    files = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))
    return [f for f in files if os.path.isfile(f)]


def bash_commands(path: str) -> list[DocCommand]:
    """The commands of the file's ```bash blocks, continuation lines joined, with the line each starts on."""
    rel = os.path.relpath(path, REPO)
    out: list[DocCommand] = []
    in_block, pending, start, skip_next, skip_this = False, "", 0, None, None
    for number, line in enumerate(open(path, encoding="utf-8").read().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_block = not in_block and stripped[3:].strip() in ("bash", "sh", "shell", "console")
            pending, skip_next = "", None
            continue
        if not in_block:
            continue
        marker = SKIP.search(line)
        if not pending:
            start = number
            skip_this = skip_next
            skip_next = None
            if stripped.startswith("#"):
                if marker:
                    skip_next = marker.group(1).strip() or "?"
                continue
        if marker:
            skip_this = marker.group(1).strip() or "?"
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        try:
            tokens = shlex.split(text, comments=True)
        except ValueError as err:
            out.append(DocCommand(f"{rel}:{start}", ["<unparsable>", str(err)], None))
            continue
        command: list[str] = []
        for token in tokens + [";"]:
            if token in SEPARATORS:
                if command:
                    out.append(DocCommand(f"{rel}:{start}", command, skip_this))
                command = []
            else:
                command.append(token)
    return out


def _strip_env(argv: list[str]) -> list[str]:
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
        argv = argv[1:]
    return argv


def classify(argv: list[str]):
    """("module", name, args) | ("script", path, args) | ("hf-retnet", None, args) | None (not ours to check)."""
    argv = _strip_env(argv)
    if not argv:
        return None
    program = os.path.basename(argv[0])
    if program == "hf-retnet":
        return "hf-retnet", None, argv[1:]
    if program == "accelerate" and argv[1:2] == ["launch"] and "-m" in argv:
        i = argv.index("-m")
        return "module", argv[i + 1], argv[i + 2:]
    if re.fullmatch(r"python(3(\.\d+)?)?", program):
        if argv[1:2] == ["-m"]:
            return "module", argv[2], argv[3:]
        if len(argv) > 1 and argv[1].endswith(".py"):
            return "script", argv[1], argv[2:]
    return None


def all_doc_commands() -> list[DocCommand]:
    return [c for path in doc_files() for c in bash_commands(path) if classify(c.argv) is not None]


# ---------------------------------------------------------------------------------------------------- checks


def _project_command(module: str, args: list[str]):
    """(command registry entry or "docgen", args) for our modules; None for anything else."""
    from training.utils.commands import COMMANDS, find_command

    if module == "training":
        if not args or args[0].startswith("-"):
            return "dispatcher", args
        return find_command(args[0]) or "unknown", args[1:]
    if module == "training.docgen":
        return "docgen", args
    for command in COMMANDS:
        if module in (command.python_module, command.module):
            return command, args
    return None


def check_project(command, args: list[str]) -> str | None:
    """None when the command's own parser accepts `args` (flags, YAML keys, value types), else why not."""
    from training.utils.parser import ConfigError

    if command == "unknown":
        return "unknown command"
    if command == "dispatcher":
        from training.utils.commands import main

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return None if main(args) == 0 else "hf-retnet exits non-zero"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if command == "docgen":
                from training.docgen import DocgenArguments
                from training.utils.parser import CommandParser

                CommandParser(DocgenArguments).parse_values(args)
            elif command.name == "demo":
                from training.demo.config import load_demo_config

                config, rest = "examples/configs/demo.yaml", list(args)
                if "--config" in rest:
                    i = rest.index("--config")
                    config, rest = rest[i + 1], rest[:i] + rest[i + 2:]
                if "--help" not in rest and "-h" not in rest:
                    load_demo_config(config, rest)
            else:
                import importlib

                importlib.import_module(command.module).build_parser().parse_values(args)
    except SystemExit as exit_info:  # --help
        return None if exit_info.code in (0, None) else f"exits with {exit_info.code}"
    except (ConfigError, ValueError, FileNotFoundError) as err:
        return str(err)
    return None


_HELP_CACHE: dict[tuple, tuple[int, str]] = {}


def check_with_help(kind: str, target: str, args: list[str]) -> str | None:
    """Run `<target> [subcommand] --help`; it must succeed and list every --flag in `args`."""
    words = []
    for token in args:  # a leading subcommand (bench_teacher_init.py run ...) has its own --help
        if token.startswith("-"):
            break
        words.append(token)
    words = words[:1] if kind == "script" and words and re.fullmatch(r"[a-z_]+", words[0]) else []
    call = [sys.executable] + (["-m", target] if kind == "module" else [os.path.join(REPO, target)]) + words + ["--help"]
    key = tuple(call)
    if key not in _HELP_CACHE:
        env = {**os.environ, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run(call, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        _HELP_CACHE[key] = (proc.returncode, proc.stdout + proc.stderr)
    code, text = _HELP_CACHE[key]
    if code != 0:
        return f"`{' '.join(call[1:])}` exits with {code}: {text.strip().splitlines()[-1:] }"
    missing = [t.split("=")[0] for t in args if t.startswith("--") and t.split("=")[0] not in text]
    return f"--help does not list {missing}" if missing else None


def check(command: DocCommand) -> str | None:
    kind, target, args = classify(command.argv)
    if kind == "hf-retnet":
        from training.utils.commands import find_command

        if not args or args[0].startswith("-"):
            return check_project("dispatcher", args)
        found = find_command(args[0])
        return check_project(found or "unknown", args[1:])
    if kind == "module":
        project = _project_command(target, args)
        if project is not None:
            return check_project(*project)
    return check_with_help(kind, target, args)


# ---------------------------------------------------------------------------------------------------- tests


def test_the_reader_finds_commands_lines_and_markers(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```bash\n# a comment\nmake test\npython -m training.train --config a.yaml \\\n"
                   "    --max_steps 3  # trailing comment\nFOO=1 hf-retnet cache --help && python -m x --y\n"
                   "# doc-test: skip (needs a GPU)\npython bench/b.py --quick\n"
                   "python -m z  # doc-test: skip (the Hub)\n```\n```python\npython -m not.bash\n```\n")
    found = [(c.where.split(":")[-1], c.argv, c.skip) for c in bash_commands(str(doc))]
    assert found == [
        ("4", ["make", "test"], None),
        ("5", ["python", "-m", "training.train", "--config", "a.yaml", "--max_steps", "3"], None),
        ("7", ["FOO=1", "hf-retnet", "cache", "--help"], None),
        ("7", ["python", "-m", "x", "--y"], None),
        ("9", ["python", "bench/b.py", "--quick"], "(needs a GPU)"),
        ("10", ["python", "-m", "z"], "(the Hub)"),
    ]
    assert classify(["accelerate", "launch", "--config_file", "c.yaml", "-m", "training.train", "--a"]) == (
        "module", "training.train", ["--a"])
    assert classify(["make", "demo"]) is None


def test_a_broken_command_is_caught(monkeypatch):
    monkeypatch.chdir(REPO)
    assert "unknown config key 'teacher_top_k'" in check(DocCommand("x:1", ["python", "-m", "training.train",
                                                                             "--teacher_top_k", "8"]))
    assert "does not exist" in check(DocCommand("x:1", ["hf-retnet", "train", "--config", "examples/configs/no.yaml"]))
    assert check(DocCommand("x:1", ["hf-retnet", "cache", "--data", "d", "--output", "o", "--topk", "8"])) is None


def test_every_documented_command_runs_as_written(monkeypatch):
    monkeypatch.chdir(REPO)  # the docs' paths are relative to the repository root
    commands = all_doc_commands()
    assert len(commands) > 20, "the README and docs hold the project's commands"
    failures, skipped = [], []
    for command in commands:
        if command.skip is not None:
            if not SKIP_REASONS.search(command.skip):
                failures.append(f"{command.where}: skip marker without a GPU / Hub / network reason: {command.skip}")
            skipped.append(command)
            continue
        why = check(command)
        if why:
            failures.append(f"{command.where}: {shlex.join(command.argv)}\n    -> {why}")
    assert not failures, "documented commands that do not run as written:\n" + "\n".join(failures)
    assert len(skipped) < len(commands) / 3


def test_the_command_reference_is_generated_from_the_code():
    from training.docgen import HEADER, pages

    folder = os.path.join(REPO, "docs", "reference")
    generated = pages()
    stale = []
    for name, text in generated.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or open(path, encoding="utf-8").read() != text:
            stale.append(name)
    for path in glob.glob(os.path.join(folder, "*.md")):
        if os.path.basename(path) not in generated and open(path, encoding="utf-8").read().startswith(HEADER):
            stale.append(os.path.basename(path) + " (no longer generated)")
    assert not stale, f"docs/reference differs from the code in {stale}: run `python -m training.docgen`"


def test_docs_links_point_at_files():
    broken = []
    for path in doc_files():
        text = open(path, encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), target))):
                broken.append(f"{os.path.relpath(path, REPO)} -> {target}")
    assert not broken, broken


def test_no_reference_to_issues_a_reader_cannot_see():
    found = []
    for path in doc_files():
        for number, line in enumerate(open(path, encoding="utf-8"), 1):
            if re.search(r"\bissues?\s*#?\d+|\bthe issue'?s?\b", line, re.IGNORECASE):
                found.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()[:80]}")
    assert not found, found


def python_blocks(path: str) -> list[str]:
    blocks, current = [], None
    for line in open(path, encoding="utf-8").read().splitlines():
        if line.strip().startswith("```"):
            if current is not None:
                blocks.append("\n".join(current))
                current = None
            elif line.strip()[3:].strip() == "python":
                current = []
            continue
        if current is not None:
            current.append(line)
    return blocks


def test_the_readme_chat_quickstart_runs(tmp_path, tiny_tokenizer, capsys):
    """README's "chat with a student" code, as written, on a tiny RetNet saved in place of runs/my-retnet."""
    from hf_retnet import RetNetConfig, RetNetForCausalLM

    (code,) = [b for b in python_blocks(os.path.join(REPO, "README.md")) if 'pipeline("text-generation"' in b]
    assert '"runs/my-retnet"' in code
    folder = tmp_path / "my-retnet"
    config = RetNetConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1, num_heads=2,
                          intermediate_size=64, bos_token_id=tiny_tokenizer.bos_token_id,
                          eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    RetNetForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    exec(compile(code.replace('"runs/my-retnet"', repr(str(folder))), "README.md", "exec"), {})
    assert capsys.readouterr().out  # the reply was printed (a random tiny model says little)

"""`hf-retnet <command>` / `python -m training <command>`: the registry, help, aliases and one-line errors."""

from __future__ import annotations

import configparser
import importlib
import os
import subprocess
import sys

import pytest

from training.cli import COMMANDS, find_command, main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPECTED = ("train", "align", "preprocess", "cache-teacher-logits", "serve-teacher", "finetune-teacher", "evaluate",
            "push", "model-card", "convert-llama2c", "convert-gguf", "synthesize", "download-datasets", "synthetic",
            "demo")


def test_help_lists_every_command_with_a_description(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in EXPECTED:
        command = find_command(name)
        assert command is not None, name
        assert f"  {name} " in out and command.summary in out
    assert "(alias: cache)" in out and "(alias: serve)" in out
    assert main([]) == 2 and "commands:" in capsys.readouterr().err


def test_each_command_is_its_module_and_its_shim():
    for command in COMMANDS:
        library = importlib.import_module(command.module)
        assert callable(library.main), command.name
        if command.name != "demo":  # the demo documents its keys itself (training/demo/config.py)
            assert callable(library.build_parser), command.name
        shim = importlib.import_module(command.python_module)  # python -m training.<command>
        if command.name == "demo":  # a package: python -m training.demo runs training/demo/__main__.py
            shim = importlib.import_module("training.demo.__main__")
        assert shim.main is library.main, command.name


def test_aliases_and_underscore_names():
    assert find_command("cache") is find_command("cache-teacher-logits") is find_command("cache_teacher_logits")
    assert find_command("serve") is find_command("serve-teacher")
    assert find_command("nope") is None


@pytest.mark.parametrize("name", [n for n in EXPECTED if n != "demo"])
def test_command_help_names_the_entry_point(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hf-retnet {name}") and "--config YAML" in out


@pytest.mark.parametrize("name", [n for n in EXPECTED if n != "demo"])
def test_unknown_key_is_one_line_naming_it(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--no_such_key", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"hf-retnet {name}: error: unknown config key 'no_such_key'"), err


def test_wrong_yaml_type_and_folder_config_are_reported_as_such(tmp_path, capsys):
    bad = tmp_path / "pre.yaml"
    bad.write_text("input: [a.jsonl]\noutput: o\ntokenizer: t\nnum_proc: four\n")
    with pytest.raises(SystemExit):
        main(["preprocess", "--config", str(bad)])
    err = capsys.readouterr().err
    assert f"config file '{bad}': key 'num_proc' must be an integer, got 'four'" in err
    with pytest.raises(SystemExit):
        main(["train", "--config", str(tmp_path)])
    assert "is a folder, not a YAML file" in capsys.readouterr().err


def test_unknown_command_suggests_one(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'; did you mean 'train'?" in capsys.readouterr().err


def test_a_command_runs_through_the_dispatcher(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main(["synthetic", "--output", str(out), "--n", "3", "--kind", "text"]) == 0
    assert len(out.read_text().splitlines()) == 3


def test_setup_cfg_declares_the_console_script():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    scripts = cfg["options.entry_points"]["console_scripts"]
    assert "hf-retnet = training.cli:main" in scripts


def test_python_m_training():
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "training", "--help"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "cache-teacher-logits" in proc.stdout, proc.stderr

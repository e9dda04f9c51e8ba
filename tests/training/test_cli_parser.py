"""The one command parser (training.utils.parser.CommandParser): YAML + `--key value` over dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from training.utils.parser import CommandParser, ConfigError, coerce, program_name


@dataclass
class Toy:
    data: str = field(metadata={"help": "required: data file"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per row (100% of them)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "step size"})
    pack: bool = field(default=False, metadata={"help": "pack rows"})
    shuffle: bool = field(default=True, metadata={"help": "shuffle rows"})
    tags: list[str] = field(default_factory=list, metadata={"help": "labels"})
    lengths: tuple[int, ...] = field(default=(1, 2), metadata={"help": "lengths"})
    overrides: dict | str | None = field(default=None, metadata={"help": "a mapping"})
    kind: str = field(default="a", metadata={"choices": ["a", "b"], "help": "a or b"})
    teacher: str | None = field(default=None, metadata={"help": "optional"})


@dataclass
class WithPositional:
    run_dir: str = field(metadata={"positional": True, "help": "the run"})
    repo_id: str = field(metadata={"positional": True, "help": "the repo"})
    private: bool = field(default=False, metadata={"help": "private"})


def parser(cls=Toy):
    return CommandParser(cls, prog="toy")


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_both_spellings_and_mixed_ones():
    for flag in ("--max_seq_length", "--max-seq-length", "--max_seq-length"):
        (args,) = parser().parse(["--data", "d", flag, "64"])
        assert args.max_seq_length == 64
    (args,) = parser().parse(["--data=d", "--max-seq-length=32", "--no-shuffle", "--pack"])
    assert (args.data, args.max_seq_length, args.shuffle, args.pack) == ("d", 32, False, True)


def test_yaml_then_flags_win(tmp_path):
    path = write(tmp_path, "data: d.txt\nmax_seq_length: 256\nlearning_rate: 3e-4\ntags: [x, y]\nlengths: [4, 8]\n"
                           "overrides: {hidden_size: 8}\npack: true\n")
    (args,) = parser().parse(["--config", path, "--max-seq-length", "512"])
    assert args.max_seq_length == 512 and args.data == "d.txt"  # the flag wins, the rest is the YAML's
    assert args.learning_rate == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string; the parser makes it a number
    assert args.tags == ["x", "y"] and args.lengths == (4, 8) and args.overrides == {"hidden_size": 8} and args.pack
    (args,) = parser().parse(["--config", path, "--lengths", "1", "2", "3", "--tags", "z"])
    assert args.lengths == (1, 2, 3) and args.tags == ["z"]


def test_required_key_may_come_from_either_place(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'data'"):
        parser().parse([])
    (args,) = parser().parse(["--config", write(tmp_path, "data: from-yaml\n")])
    assert args.data == "from-yaml"


def test_unknown_keys_name_the_key_and_the_closest_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'max_seq_len' .*did you mean 'max_seq_length'"):
        parser().parse(["--config", write(tmp_path, "data: d\nmax_seq_len: 3\n")])
    with pytest.raises(ConfigError, match=r"unknown config key 'max_seq_len' \(--max-seq-len on the command line\)"
                                          r".*did you mean '--max_seq_length'"):
        parser().parse(["--data", "d", "--max-seq-len", "3"])
    with pytest.raises(ConfigError, match="did you mean '--learning_rate'"):
        parser().parse(["--data", "d", "--learning_rat", "3"])  # no prefix matching: a typo is an error
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        parser().parse(["--data", "d", "stray"])


def test_wrong_yaml_types_are_reported_as_yaml(tmp_path):
    path = write(tmp_path, "data: d\nmax_seq_length: many\n")
    with pytest.raises(ConfigError) as err:
        parser().parse(["--config", path])
    message = str(err.value)
    assert f"config file '{path}': key 'max_seq_length' must be an integer, got 'many'" in message
    assert "command line" not in message
    for text, needle in [("pack: maybe", "'pack' must be true or false"), ("tags: {a: 1}", "'tags' must be a list"),
                         ("kind: c", "'kind' must be"), ("data: [a, b]", "'data' must be a string"),
                         ("data: d\nteacher: no", "quote it")]:
        with pytest.raises(ConfigError, match=needle):
            parser().parse(["--config", write(tmp_path, "data: d\n" + text + "\n" if "data" not in text else text)])
    with pytest.raises(ConfigError, match="command line: argument --max_seq_length.*invalid int value: 'many'"):
        parser().parse(["--data", "d", "--max_seq_length", "many"])


def test_bad_config_files_say_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a YAML file") as err:
        parser().parse(["--config", str(tmp_path)])
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parser().parse(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parser().parse(["--config", write(tmp_path, "- a\n- b\n")])
    with pytest.raises(ConfigError, match="not valid YAML at line 2"):
        parser().parse(["--config", write(tmp_path, "data: d\n  bad: [\n")])
    (args,) = parser().parse(["--config", write(tmp_path, "# nothing\n"), "--data", "d"])  # an empty file is fine
    assert args.data == "d"


def test_positional_fields():
    (args,) = parser(WithPositional).parse(["runs/x", "user/x", "--private"])
    assert (args.run_dir, args.repo_id, args.private) == ("runs/x", "user/x", True)
    with pytest.raises(ConfigError, match="REPO_ID"):
        parser(WithPositional).parse(["runs/x"])


def test_parse_or_exit_prints_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_or_exit(["--data", "d", "--nope", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and err.startswith("toy: error: unknown config key 'nope'")


def test_help_shows_every_key_and_escapes_percent(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "100% of them" in out and "--config YAML" in out and "(required)" in out
    for f in dataclasses.fields(Toy):
        assert f"--{f.name}" in out


def test_program_name_comes_from_the_dispatcher():
    with program_name("hf-retnet toy"):
        assert CommandParser(Toy, prog="python -m toy").prog == "hf-retnet toy"
    assert CommandParser(Toy, prog="python -m toy").prog == "python -m toy"


@pytest.mark.parametrize("value, hint, expected", [
    ("3e-4", float, 3e-4), (3, float, 3), ("1e5", int, 100000), (2.0, int, 2), ("true", bool, True),
    (5, str, "5"), ("x", list[str], ["x"]), ([1, "2"], tuple[int, ...], (1, 2)), (None, int | None, None),
    ({"a": 1}, dict | str | None, {"a": 1}), ('{"a": 1}', dict | str | None, '{"a": 1}'),
])
def test_coerce(value, hint, expected):
    assert coerce(value, hint) == expected


def test_distillation_config_yaml_types_and_spellings(tmp_path, tiny_teacher_dir):
    """The train config goes through the same parser: a wrong YAML type names the file and the key."""
    from training.trainers.distillation_config import load_config

    path = write(tmp_path, f"teacher_model: {tiny_teacher_dir}\noutput_dir: {tmp_path / 'o'}\nreport_to: none\n"
                           "max_steps: ten\n")
    with pytest.raises(ValueError, match=r"config file .*: key 'max_steps' must be an integer, got 'ten'"):
        load_config(path)
    path = write(tmp_path, f"teacher_model: {tiny_teacher_dir}\noutput_dir: {tmp_path / 'o'}\nreport_to: none\n"
                           "learning_rate: 3e-4\n")
    config = load_config(path, ["--teacher-topk", "8", "--distill_alpha=0.25", "--per-device-train-batch-size", "2"])
    assert (config.learning_rate, config.teacher_topk, config.distill_alpha) == (3e-4, 8, 0.25)
    assert config.per_device_train_batch_size == 2
    with pytest.raises(FileNotFoundError, match="is a folder"):
        load_config(str(tmp_path))

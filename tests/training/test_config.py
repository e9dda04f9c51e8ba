"""DistillationConfig: YAML + `--key value` overrides, validation before anything loads, schedules."""

import dataclasses
import os

import pytest
import yaml

from training.trainers.distillation_config import DistillationConfig, distillation_field_names, load_config
from training.trainers.distillation import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "configs", "train_tiny.yaml")
DIRECT = os.path.join(REPO, "examples", "configs", "train_direct.yaml")


def write_yaml(tmp_path, **values):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def base(tmp_path, teacher, **values):
    return dict(output_dir=str(tmp_path / "out"), teacher_model=teacher, report_to="none", **values)


def test_yaml_then_overrides(tmp_path, tiny_teacher_dir):
    config = load_config(TINY, ["--teacher_model", tiny_teacher_dir, "--teacher_topk", "16", "--distill_alpha=0.25",
                                "--student_overrides", '{"hidden_size": 32, "num_heads": 2}', "--max-steps", "7"])
    assert config.teacher_topk == 16 and config.distill_alpha == 0.25 and config.max_steps == 7
    assert config.student_overrides == {"hidden_size": 32, "num_heads": 2}  # JSON override replaces the YAML map
    assert config.tokenizer == tiny_teacher_dir  # defaults to the teacher's
    assert config.optim == "muon" and config.use_muon
    from_yaml = load_config(TINY, ["--teacher_model", tiny_teacher_dir])
    assert from_yaml.student_overrides["hidden_size"] == 64 and from_yaml.kd_loss == "forward_kl"


def test_real_recipe_parses_without_loading_anything():
    assert yaml.safe_load(open(DIRECT))["bf16"] is True
    config = load_config(DIRECT, ["--bf16", "false"])  # TrainingArguments refuses bf16 on a CPU-only machine
    assert (config.teacher_model, config.student, config.max_seq_length) == (
        "meta-llama/Llama-3.2-1B-Instruct", "500M", 1024)
    assert (config.teacher_topk, config.distill_alpha, config.optim) == (512, 0.5, "muon")
    assert config.tokenizer == "meta-llama/Llama-3.2-1B-Instruct"


def test_every_distillation_field_is_documented():
    fields = {f.name: f for f in dataclasses.fields(DistillationConfig)}
    names = distillation_field_names()
    for key in ("student", "student_overrides", "teacher_source", "teacher_model", "teacher_adapter", "teacher_cache",
                "teacher_url", "teacher_api_key", "teacher_topk", "temperature", "distill_alpha", "kd_loss",
                "jsd_beta", "diversity_weight", "reverse_kl_warmup_steps", "loss_chunk_size", "train_data",
                "eval_data", "tokenizer", "max_seq_length", "teacher_dtype", "teacher_device"):
        assert key in names, key
    for name in names:
        assert len(fields[name].metadata.get("help", "")) > 20, name


@pytest.mark.parametrize("key, value", [
    ("distill_alpha", 1.5), ("distill_alpha", -0.1), ("distill_alpha_start", 2.0), ("jsd_beta", 1.01),
    ("temperature", 0.0), ("temperature_start", -1.0), ("teacher_topk", 0), ("kd_loss", "kl"),
    ("teacher_source", "magic"), ("teacher_dtype", "int8"), ("max_seq_length", 1), ("loss_chunk_size", 0),
    ("diversity_weight", -1.0), ("reverse_kl_warmup_steps", -1), ("muon_momentum", 1.0), ("optim", "musli"),
    ("student", "700M"), ("teacher_protocol", "grpc"),
])
def test_out_of_range_values_name_the_key(tmp_path, tiny_teacher_dir, key, value):
    with pytest.raises(ValueError, match=f"'{key}'"):
        load_config(write_yaml(tmp_path, **base(tmp_path, tiny_teacher_dir, **{key: value})))
    with pytest.raises(ValueError, match=f"'{key}'"):  # same check from the command line
        load_config(write_yaml(tmp_path, **base(tmp_path, tiny_teacher_dir)), [f"--{key}", str(value)])
    assert not (tmp_path / "out").exists()


def test_unknown_keys_are_rejected_with_a_suggestion(tmp_path, tiny_teacher_dir):
    with pytest.raises(ValueError, match=r"unknown config key 'teacher_top_k'.*did you mean 'teacher_topk'"):
        load_config(write_yaml(tmp_path, **base(tmp_path, tiny_teacher_dir, teacher_top_k=8)))
    with pytest.raises(ValueError, match=r"unknown config key 'alpha'"):
        load_config(write_yaml(tmp_path, **base(tmp_path, tiny_teacher_dir)), ["--alpha", "0.3"])
    with pytest.raises(ValueError, match="teacher_topk"):  # wrong type on the command line
        load_config(write_yaml(tmp_path, **base(tmp_path, tiny_teacher_dir)), ["--teacher_topk", "many"])


def test_missing_paths_are_file_not_found(tmp_path, tiny_teacher_dir):
    missing = str(tmp_path / "no-such-teacher")
    with pytest.raises(FileNotFoundError, match="no-such-teacher"):
        load_config(write_yaml(tmp_path, **base(tmp_path, missing)))
    with pytest.raises(FileNotFoundError, match="no-such-adapter"):
        load_config(write_yaml(tmp_path, **base(tmp_path, tiny_teacher_dir, teacher_adapter=str(tmp_path / "no-such-adapter"))))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError, match="teacher_cache"):
        load_config(write_yaml(tmp_path, **base(tmp_path, tiny_teacher_dir, teacher_source="cached")))


def test_cli_bad_input_writes_nothing(tmp_path, tiny_teacher_dir, capsys):
    """The command answers each mistake with one `error:` line and exit status 2, and writes nothing."""
    out = tmp_path / "out"

    def error(argv) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, err
        return lines[0]

    assert "missing" in error(["--config", TINY, "--teacher_model", str(tmp_path / "missing"), "--output_dir", str(out)])
    assert "distill_alpha" in error(["--config", TINY, "--teacher_model", tiny_teacher_dir, "--distill_alpha", "2",
                                     "--output_dir", str(out)])
    assert "teacher_topk" in error(["--config", TINY, "--teacher_model", tiny_teacher_dir, "--teacher_topk", "100000",
                                    "--output_dir", str(out), "--train_data", str(tmp_path / "unused.jsonl")])
    assert "student vocabulary (1000)" in error(  # k > vocabulary and vocabularies: found from the teacher's config
        ["--config", TINY, "--teacher_model", tiny_teacher_dir, "--output_dir", str(out),
         "--student_overrides", '{"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 4}',
         "--train_data", str(tmp_path / "unused.jsonl")])
    assert not out.exists()


def test_schedules():
    config = DistillationConfig(output_dir="unused", teacher_model="org/model", distill_alpha=0.2,
                                distill_alpha_start=1.0, alpha_schedule_steps=4, temperature=1.0,
                                temperature_start=3.0, temperature_schedule_steps=2, reverse_kl_warmup_steps=3,
                                kd_loss="jsd")
    assert [config.alpha_at(s) for s in range(6)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.2])
    assert [config.temperature_at(s) for s in range(4)] == pytest.approx([3.0, 2.0, 1.0, 1.0])
    assert [config.kd_loss_at(s) for s in range(5)] == ["reverse_kl"] * 3 + ["jsd"] * 2
    constant = DistillationConfig(output_dir="unused", teacher_model="org/model", distill_alpha=0.3)
    assert constant.alpha_at(0) == constant.alpha_at(10**6) == 0.3


@pytest.mark.parametrize("overrides, expected", [
    ([], False), (["--cuda_expandable_segments"], True), (["--cuda_expandable_segments", "false"], False),
    (["--cuda-expandable-segments=true"], True), (["--cuda_expandable_segments", "--max_steps", "3"], True),
])
def test_allocator_flag_is_read_before_the_config_is_built(overrides, expected):
    from training.trainers.distillation import _wants_expandable_segments

    assert _wants_expandable_segments(TINY, overrides) is expected


def test_openai_protocol_needs_the_vocab_size_and_reaches_the_network_teacher(tmp_path):
    from training.teachers import build_teacher_source

    network = dict(output_dir=str(tmp_path / "out"), report_to="none", teacher_source="network",
                   teacher_url="http://127.0.0.1:9", teacher_protocol="openai")
    with pytest.raises(ValueError, match="'teacher_vocab_size'"):
        load_config(write_yaml(tmp_path, **network))
    config = load_config(write_yaml(tmp_path, **network, teacher_vocab_size=468))
    teacher = build_teacher_source(config)
    assert teacher.protocol == "openai" and teacher.vocab_size == 468


def test_variant_student_takes_the_teacher_vocabulary(tmp_path, tiny_teacher_dir, tiny_tokenizer, caplog):
    """A named variant without student_overrides.vocab_size gets the teacher's vocabulary and special ids (the
    variant's Llama-3 128256 would stop the run); only the config is built, not the 350M model."""
    import logging

    from hf_retnet import VARIANTS
    from training.trainers.distillation import build_student_config, teacher_vocab_size

    config = DistillationConfig(**base(tmp_path, tiny_teacher_dir, student="350M"))
    with caplog.at_level(logging.INFO, logger="training.trainers.distillation"):
        student = build_student_config(config, tiny_tokenizer, teacher_vocab_size(config))
    assert student.vocab_size == len(tiny_tokenizer) != VARIANTS["350M"].get("vocab_size", 128256)
    assert (student.bos_token_id, student.eos_token_id, student.pad_token_id) == (
        tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    assert student.hidden_size == VARIANTS["350M"]["hidden_size"]  # the rest of the variant is kept
    assert "vocab_size 468 taken from the teacher" in caplog.text
    explicit = DistillationConfig(**base(tmp_path, tiny_teacher_dir, student="350M",
                                         student_overrides={"vocab_size": 1000}))
    assert build_student_config(explicit, tiny_tokenizer, 468).vocab_size == 1000  # kept; run() then refuses it


def test_variant_without_vocab_size_trains(tmp_path, tiny_teacher_dir):
    data = tmp_path / "train.jsonl"
    from tests.tiny_models import default_texts

    data.write_text("".join(f'{{"text": "{t}"}}\n' for t in default_texts(16)))
    out = tmp_path / "out"
    main(["--config", TINY, "--teacher_model", tiny_teacher_dir, "--output_dir", str(out), "--train_data", str(data),
          "--max_steps", "2", "--student_overrides",
          '{"hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2, "intermediate_size": 64, "chunk_size": 16}'])
    import json

    saved = json.loads((out / "config.json").read_text())
    assert saved["vocab_size"] == 468 and saved["hidden_size"] == 32

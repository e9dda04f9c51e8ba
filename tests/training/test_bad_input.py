"""Expected mistakes get one line that names the input and the fix: `error: ...` on stderr, exit status 2, no
traceback (unless `--debug` / HF_RETNET_DEBUG=1), before any model loads where it can, and no empty output folder
left behind. Each case runs the command's real `main` (one also as a subprocess)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.tiny_models import build_tiny_tokenizer, default_texts
from training.trainers.distillation import main as train_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "configs", "train_tiny.yaml")
SMALL_STUDENT = '{"hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2, "intermediate_size": 64, "chunk_size": 16}'


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad-input-data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in default_texts(16)))
    return str(path)


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if the run gets as far as building the student or the teacher."""
    import training.teachers
    import training.trainers.distillation as distillation

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the mistake was reported")

    monkeypatch.setattr(distillation, "build_student", refuse)
    monkeypatch.setattr(training.teachers, "build_teacher_source", refuse)


def train_args(teacher, data, out, *extra):
    return ["--config", TINY, "--teacher_model", teacher, "--train_data", data, "--output_dir", str(out),
            "--max_steps", "1", "--student_overrides", SMALL_STUDENT, *extra]


def one_error_line(capsys, status, *needles) -> str:
    """The command exited 2 with exactly one `error:` line holding every needle, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def save_student(folder, vocab_size=468):
    from hf_retnet import RetNetConfig, RetNetForCausalLM

    torch.manual_seed(0)
    model = RetNetForCausalLM(RetNetConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_heads=2,
                                           intermediate_size=64, chunk_size=16))
    model.save_pretrained(folder)
    return str(folder)


# ---------------------------------------------------------------------------------------------------- train


def test_tokenizer_that_is_not_the_teachers_is_refused_before_models_load(tmp_path, tiny_teacher_dir, data,
                                                                         capsys, no_models):
    other = build_tiny_tokenizer([f"entirely different words {i} zebra quartz" for i in range(200)], vocab_size=300)
    other.save_pretrained(tmp_path / "other-tokenizer")
    out = tmp_path / "out"
    status = train_main(train_args(tiny_teacher_dir, data, out, "--tokenizer", str(tmp_path / "other-tokenizer")))
    one_error_line(capsys, status, "config key 'tokenizer'", str(tmp_path / "other-tokenizer"),
                   f"is not the tokenizer of teacher_model {tiny_teacher_dir!r}", "leave `tokenizer` out")
    assert not out.exists()


def test_tokenizer_larger_than_the_teachers_vocabulary_is_refused(tmp_path, data, capsys, no_models):
    """The issue's case the other way round: a 468-token tokenizer against a teacher of 300 ids."""
    from tests.tiny_models import build_tiny_llama

    teacher = tmp_path / "small-teacher"
    build_tiny_llama(300).save_pretrained(teacher)  # no tokenizer saved: only the sizes can be compared
    build_tiny_tokenizer().save_pretrained(tmp_path / "tok")
    status = train_main(train_args(str(teacher), data, tmp_path / "out", "--tokenizer", str(tmp_path / "tok"),
                                   "--teacher_topk", "8"))
    one_error_line(capsys, status, "config key 'tokenizer'", "468 tokens but the teacher's vocabulary has 300")
    assert not (tmp_path / "out").exists()


def test_cache_built_at_another_max_seq_length_is_refused_at_start(tmp_path, tiny_teacher_dir, data, capsys):
    from training.teachers.cache.build import main as cache_main

    cache = tmp_path / "cache"
    assert cache_main(["--teacher", tiny_teacher_dir, "--data", data, "--output", str(cache), "--topk", "16",
                       "--dtype", "float32", "--max-seq-length", "64", "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    status = train_main(train_args(tiny_teacher_dir, data, out, "--teacher_source", "cached", "--teacher_cache",
                                   str(cache), "--teacher_topk", "16", "--max_seq_length", "32"))
    one_error_line(capsys, status, "config key 'max_seq_length': 32", "built with max_seq_length 64",
                   "--max_seq_length 64", "--max-seq-length 32")
    assert not out.exists()


@pytest.mark.parametrize("key", ["per_device_train_batch_size", "per_device_eval_batch_size",
                                 "gradient_accumulation_steps"])
def test_batch_size_zero_is_refused_before_anything_loads(tmp_path, tiny_teacher_dir, data, capsys, no_models, key):
    status = train_main(train_args(tiny_teacher_dir, data, tmp_path / "out", f"--{key}", "0"))
    one_error_line(capsys, status, f"config key '{key}': must be an integer >= 1, got 0")
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file(tmp_path, tiny_teacher_dir, data, capsys, no_models):
    (tmp_path / "out").write_text("notes")
    status = train_main(train_args(tiny_teacher_dir, data, tmp_path / "out"))
    one_error_line(capsys, status, f"config key 'output_dir': '{tmp_path / 'out'}' is an existing file")
    assert (tmp_path / "out").read_text() == "notes"


@pytest.mark.parametrize("case", ["missing", "garbage_state", "no_weights", "truncated_weights", "last_without_any"])
def test_bad_resume_checkpoint_is_named_before_models_load(tmp_path, tiny_teacher_dir, data, capsys, no_models, case):
    checkpoint = tmp_path / "checkpoint-3"
    if case != "missing":
        checkpoint.mkdir()
        (checkpoint / "trainer_state.json").write_text("{not json" if case == "garbage_state" else "{}")
    if case == "truncated_weights":
        save_student(checkpoint)
        data_bytes = (checkpoint / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(data_bytes[:-100])
    value = "last" if case == "last_without_any" else str(checkpoint)
    out = tmp_path / "out"
    status = train_main(train_args(tiny_teacher_dir, data, out, "--resume_from_checkpoint", value))
    needle = {
        "missing": f"checkpoint folder '{checkpoint}' does not exist",
        "garbage_state": f"{checkpoint / 'trainer_state.json'} is not valid JSON",
        "no_weights": f"'{checkpoint}' holds no model weights",
        "truncated_weights": f"{checkpoint / 'model.safetensors'} is truncated or corrupt",
        "last_without_any": f"output_dir '{out}', which has none",
    }[case]
    one_error_line(capsys, status, "config key 'resume_from_checkpoint'", needle)
    assert not out.exists()


def test_real_checkpoints_pass_the_resume_checks(tmp_path, tiny_teacher_dir, data):
    """The early checks accept what the Trainer writes: 'last' and an explicit checkpoint-N folder."""
    from training.trainers.distillation_config import load_config

    out = tmp_path / "out"
    assert train_main(train_args(tiny_teacher_dir, data, out, "--save_strategy", "steps", "--save_steps", "1")) == 0
    for value in ("last", str(out / "checkpoint-1")):
        config = load_config(TINY, train_args(tiny_teacher_dir, data, out, "--resume_from_checkpoint", value)[2:])
        assert config.resume_from_checkpoint == value
    assert train_main(train_args(tiny_teacher_dir, data, out, "--max_steps", "2", "--save_strategy", "no",
                                 "--resume_from_checkpoint", "last")) == 0


def test_truncated_student_weights_are_named(tmp_path, tiny_teacher_dir, data, capsys, no_models):
    student = save_student(tmp_path / "student")
    weights = tmp_path / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    status = train_main(train_args(tiny_teacher_dir, data, tmp_path / "out", "--student", student,
                                   "--student_overrides", "{}"))
    one_error_line(capsys, status, "config key 'student'", f"{weights} is truncated or corrupt", "re-copy or re-save")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_folder_is_a_missing_folder_not_a_repo_id(tmp_path, tiny_teacher_dir, data, capsys,
                                                                    no_models):
    missing = tmp_path / "tokenizers" / "mine"
    status = train_main(train_args(tiny_teacher_dir, data, tmp_path / "out", "--tokenizer", str(missing)))
    line = one_error_line(capsys, status, f"config key 'tokenizer': folder '{missing}' does not exist")
    assert "Repo id" not in line and "repo_name" not in line


def test_a_run_that_fails_after_starting_leaves_no_empty_output_dir(tmp_path, tiny_teacher_dir, capsys):
    """A mistake found only when the data is read (an empty training file) still leaves nothing behind."""
    (tmp_path / "empty.jsonl").write_text("")
    out = tmp_path / "out"
    status = train_main(train_args(tiny_teacher_dir, str(tmp_path / "empty.jsonl"), out))
    one_error_line(capsys, status, "empty.jsonl")
    assert not out.exists()


def test_debug_flag_and_variable_show_the_traceback(tmp_path, tiny_teacher_dir, data, monkeypatch):
    args = train_args(tiny_teacher_dir, data, tmp_path / "out", "--per_device_train_batch_size", "0")
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        train_main(args + ["--debug"])
    monkeypatch.setenv("HF_RETNET_DEBUG", "1")
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        train_main(args)


def test_the_real_command_prints_one_line(tmp_path, tiny_teacher_dir, data):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    env.pop("HF_RETNET_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "training.train", *train_args(
        tiny_teacher_dir, data, tmp_path / "out", "--per_device_train_batch_size", "0")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: config key 'per_device_train_batch_size': must be an integer >= 1, got 0")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- student


def test_student_folder_under_home_is_found(tmp_path, tiny_teacher_dir, tiny_tokenizer, monkeypatch):
    """`student: ~/runs/aligned` passed validation but reached from_variant('~/runs/aligned'): now it is the folder."""
    from training.trainers.distillation import build_student_config
    from training.trainers.distillation_config import DistillationConfig

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    save_student(tmp_path / "home" / "runs" / "aligned")
    config = DistillationConfig(output_dir=str(tmp_path / "out"), teacher_model=tiny_teacher_dir, report_to="none",
                                student="~/runs/aligned", student_overrides={"chunk_size": 8})
    assert config.student == str(tmp_path / "home" / "runs" / "aligned")
    student = build_student_config(config, tiny_tokenizer, 468)
    assert student.hidden_size == 32 and student.chunk_size == 8  # the folder's config plus the override


@pytest.mark.parametrize("overrides, needle", [
    ({"num_heads": 3}, "hidden_size=32 is not divisible by num_heads=3"),
    ({"attention_window": -1}, "attention_window=-1 must be a non-negative number"),
    ({"num_kv_heads": 3}, "num_kv_heads=3 must divide num_heads=2"),
    ({"hiden_size": 64}, "'hiden_size' is not a RetNetConfig field; did you mean 'hidden_size'?"),
])
def test_folder_student_overrides_go_through_retnet_config_checks(tmp_path, tiny_teacher_dir, overrides, needle):
    """Overrides on a folder student used to be set with setattr, skipping RetNetConfig's validation."""
    from training.trainers.distillation_config import DistillationConfig

    student = save_student(tmp_path / "student")
    with pytest.raises(ValueError, match="config key 'student_overrides'") as info:
        DistillationConfig(output_dir=str(tmp_path / "out"), teacher_model=tiny_teacher_dir, report_to="none",
                           student=student, student_overrides=overrides)
    assert needle in str(info.value)


def test_folder_student_keeps_its_special_ids(tmp_path, tiny_teacher_dir, tiny_tokenizer):
    """The tokenizer fills the ids a folder lacks; it does not rewrite the ones the student was trained with."""
    from hf_retnet import RetNetConfig
    from training.trainers.distillation import build_student_config
    from training.trainers.distillation_config import DistillationConfig

    folder = tmp_path / "student"
    save_student(folder)
    config = RetNetConfig.from_pretrained(folder)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 7, tiny_tokenizer.eos_token_id, None
    config.save_pretrained(folder)
    run = DistillationConfig(output_dir=str(tmp_path / "out"), teacher_model=tiny_teacher_dir, report_to="none",
                             student=str(folder))
    built = build_student_config(run, tiny_tokenizer, 468)
    assert (built.bos_token_id, built.pad_token_id) == (7, tiny_tokenizer.pad_token_id)


def test_a_llama_folder_as_the_student_is_named(tmp_path, tiny_teacher_dir):
    from training.trainers.distillation_config import DistillationConfig

    with pytest.raises(ValueError, match=r"holds a 'llama' model, not a RetNet .*training.align"):
        DistillationConfig(output_dir=str(tmp_path / "out"), teacher_model=tiny_teacher_dir, report_to="none",
                           student=tiny_teacher_dir)


# ---------------------------------------------------------------------------------------------------- others


def test_evaluate_window_below_the_default_stride_names_the_flags(tmp_path, capsys):
    from training.evaluation.evaluator import main as evaluate_main

    status = evaluate_main(["--model", str(tmp_path), "--window", "256"])
    one_error_line(capsys, status, "--stride 512 (its default) must be smaller than --window 256",
                   "--stride must be in [1, 255]", "--stride 128")
    status = evaluate_main(["--model", str(tmp_path), "--window", "1"])
    one_error_line(capsys, status, "--window (window=) must be >= 2")
    assert not (tmp_path / "eval").exists()


def test_evaluate_missing_model_folder_is_a_missing_folder(tmp_path, capsys):
    from training.evaluation.evaluator import main as evaluate_main

    status = evaluate_main(["--model", str(tmp_path / "runs" / "nope"), "--output", str(tmp_path / "o")])
    line = one_error_line(capsys, status, f"--model: folder '{tmp_path / 'runs' / 'nope'}' does not exist")
    assert "Repo id" not in line


def test_preprocess_output_that_is_a_file(tmp_path, tiny_teacher_dir, data, capsys):
    from training.data.preprocess import main as preprocess_main

    (tmp_path / "shards").write_text("x")
    status = preprocess_main(["--input", data, "--output", str(tmp_path / "shards"), "--tokenizer", tiny_teacher_dir])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert f"--output '{tmp_path / 'shards'}' is an existing file, not a folder" in err and err.count("\n") == 1


def test_preprocess_and_cache_builder_leave_no_empty_folder_after_a_mistake(tmp_path, tiny_teacher_dir, data,
                                                                           capsys):
    from training.data.preprocess import main as preprocess_main
    from training.teachers.cache.build import main as cache_main

    (tmp_path / "empty.jsonl").write_text("")
    status = preprocess_main(["--input", str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "shards"),
                              "--tokenizer", tiny_teacher_dir])
    assert status == 2 and "empty.jsonl: no records" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()
    status = cache_main(["--teacher", tiny_teacher_dir, "--data", data, "--output", str(tmp_path / "cache"),
                         "--topk", "100000", "--dtype", "float32", "--no-progress"])
    one_error_line(capsys, status, "--topk 100000 is larger than the teacher's vocabulary (468)")
    assert not (tmp_path / "cache").exists()


def test_finetune_output_dir_that_is_a_file(tmp_path, tiny_teacher_dir, data, capsys):
    from training.trainers.teacher_sft import main as finetune_main

    (tmp_path / "ft").write_text("x")
    status = finetune_main(["--teacher_model", tiny_teacher_dir, "--train_data", data, "--output_dir",
                            str(tmp_path / "ft"), "--report_to", "none", "--use_cpu", "true"])
    one_error_line(capsys, status, f"config key 'output_dir': '{tmp_path / 'ft'}' is an existing file")


def test_align_output_that_is_a_file_and_no_empty_folder_after_a_mistake(tmp_path, tiny_teacher_dir, data, capsys):
    from training.trainers.alignment import main as align_main

    (tmp_path / "aligned").write_text("x")
    status = align_main(["--teacher", tiny_teacher_dir, "--student_out", str(tmp_path / "aligned"), "--data", data,
                         "--max_tokens", "100"])
    one_error_line(capsys, status, f"config key 'student_out': '{tmp_path / 'aligned'}' is an existing file")
    status = align_main(["--teacher", tiny_teacher_dir, "--student_out", str(tmp_path / "new"), "--data",
                         str(tmp_path / "missing.jsonl"), "--max_tokens", "100"])
    one_error_line(capsys, status, "missing.jsonl")
    assert not (tmp_path / "new").exists()


def test_lora_target_typo_lists_the_valid_targets(tmp_path, tiny_teacher_dir, data, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from training.trainers.teacher_sft import check_lora_targets, main as finetune_main

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher's weights loaded before the typo was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    status = finetune_main(["--teacher_model", tiny_teacher_dir, "--train_data", data, "--output_dir",
                            str(tmp_path / "ft"), "--lora_target_modules", "q_proj,v_prj", "--report_to", "none",
                            "--use_cpu", "true"])
    one_error_line(capsys, status, "config key 'lora_target_modules': 'v_prj' matches no linear layer",
                   "valid targets: down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj")
    import hf_retnet

    with pytest.raises(ValueError, match="valid targets: " + ",".join(hf_retnet.LORA_TARGET_MODULES)):
        check_lora_targets("q_proj,gate", save_student(tmp_path / "student"))
    check_lora_targets("q_proj,g_proj,down_proj", str(tmp_path / "student"))  # RetNet names pass


def test_debug_flag_leaves_the_trainers_own_debug_option_alone():
    from training.utils.errors import command

    seen = []

    @command
    def record(argv):
        seen.append(argv)
        raise ValueError("bad value")

    assert record(["--debug", "underflow_overflow", "--max_steps", "1"]) == 2  # the Trainer's option: not ours
    with pytest.raises(ValueError):
        record(["run_dir", "--debug", "repo"])  # ours, taken out before the command parses its arguments
    assert seen == [["--debug", "underflow_overflow", "--max_steps", "1"], ["run_dir", "repo"]]


def test_error_wrapper_keeps_bugs_loud():
    """Only expected mistakes become one line; a bug (here a KeyError) keeps its traceback."""
    from training.utils.errors import command

    @command
    def buggy(argv):
        raise KeyError("internal")

    with pytest.raises(KeyError):
        buggy([])

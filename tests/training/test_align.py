"""Stage 1 (attention transfer) on a tiny Llama teacher: every layer's alignment error falls well below its value
at conversion, the outputs are written and load, and only the chosen retention parts change."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from training.trainers.alignment import AlignConfig, evaluate_alignment, parse_args, run
from tests.tiny_models import default_texts


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("align-data") / "text.txt"
    path.write_text("\n\n".join(default_texts(200)) + "\n", encoding="utf-8")
    return str(path)


def test_alignment_error_falls_in_every_layer(tiny_teacher_dir, text_file, tmp_path):
    out = tmp_path / "aligned"
    report = run(AlignConfig(
        teacher=tiny_teacher_dir, student_out=str(out), data=text_file, max_tokens=12_000, batch_size=8,
        max_seq_length=48, learning_rate=1e-2, eval_sequences=16, eval_steps=10, calibration_sequences=16,
    ))
    before, after = report["error_at_conversion"], report["error_after"]
    assert len(before) == len(after) == 2
    for layer, (b, a) in enumerate(zip(before, after)):
        assert a < 0.5 * b, f"layer {layer}: {b:.4f} -> {a:.4f}"
    assert {"model.safetensors", "config.json", "tokenizer.json", "align_report.json", "align_error.png"} <= set(
        os.listdir(out)
    )
    assert not os.path.exists(out / ".align-checkpoint")
    saved = json.loads((out / "align_report.json").read_text())
    assert saved["error_after"] == after and saved["tokens"] >= 12_000

    # The student reloads through the Auto class with the learned decays, and reproduces the reported error.
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert student.config.retention_decays == report["decays"]
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    ids = torch.randint(5, 400, (2, 20), generator=torch.Generator().manual_seed(0))
    errors = evaluate_alignment(student, teacher, [(ids, torch.ones_like(ids))])
    assert all(e < b for e, b in zip(errors, before))

    # Stage 1 touches retention only: embeddings, norms and MLPs are still the teacher's.
    ours = load_file(str(out / "model.safetensors"))
    theirs = teacher.state_dict()
    assert torch.equal(ours["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"])
    assert torch.equal(ours["model.layers.1.mlp.down_proj.weight"], theirs["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(ours["model.layers.0.retention_norm.weight"], theirs["model.layers.0.input_layernorm.weight"])
    assert not torch.equal(ours["model.layers.0.retention.q_proj.weight"], theirs["model.layers.0.self_attn.q_proj.weight"])


def test_only_chosen_parts_train(tiny_teacher_dir, text_file, tmp_path):
    out = tmp_path / "aligned"
    report = run(AlignConfig(
        teacher=tiny_teacher_dir, student_out=str(out), data=text_file, max_tokens=1_500, batch_size=4,
        max_seq_length=32, train=["group_norm"], gate="none", decays="retnet", eval_sequences=4,
        calibration_sequences=4,
    ))
    ours = load_file(str(out / "model.safetensors"))
    theirs = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).state_dict()
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(ours[f"model.layers.1.retention.{proj}.weight"], theirs[f"model.layers.1.self_attn.{proj}.weight"])
    default = [1 - 2.0 ** (-5 - h) for h in range(2)]
    torch.testing.assert_close(torch.tensor(report["decays"]), torch.tensor([default, default]))
    # Training the group norms alone still lowers every layer's error (here by about a quarter; 10% is required).
    for layer, (before, after) in enumerate(zip(report["error_at_conversion"], report["error_after"])):
        assert after < 0.9 * before, f"layer {layer}: {before:.4f} -> {after:.4f}"


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "align.yaml"
    path.write_text("teacher: t\nstudent_out: o\ndata: d.txt\nmax_tokens: 500\ntrain: [q_proj, decays]\n")
    config = parse_args(["--config", str(path), "--max_tokens", "700"])
    assert config.max_tokens == 700 and config.train == ["q_proj", "decays"] and config.teacher == "t"
    path.write_text("teacher: t\nstudent_out: o\ndata: d.txt\nmax_tokenz: 5\n")
    with pytest.raises(ValueError, match="unknown config key 'max_tokenz' .*did you mean 'max_tokens'"):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(train=["lm_head"]), "config key 'train'"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(gate="sigmoid"), "config key 'gate'"),
        (dict(teacher=None), "config key 'teacher'"),
        (dict(device="gpu"), "config key 'device': 'gpu' is not one of auto, cpu, cuda"),
    ]
    + ([(dict(device="cuda"), "torch sees no GPU")] if not torch.cuda.is_available() else []),
)
def test_bad_config_fails_clearly(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        AlignConfig(**{**dict(teacher="t", student_out="o", data="d"), **kwargs})


def test_example_config_parses():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config = parse_args(["--config", os.path.join(root, "examples", "configs", "align_stories260K.yaml")])
    assert config.decays == "attention" and config.gate == "constant" and "decays" in config.train


class Crash(Exception):
    pass


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_student(tiny_teacher_dir, text_file, tmp_path):
    """Killed right after its step-4 checkpoint, a run resumed with `resume` ends where the same run never stopped
    ends: same steps, tokens and weights, and the history keeps the evaluations made before the crash."""
    from transformers import TrainerCallback

    from training.trainers.alignment import CHECKPOINT_DIR

    class CrashAfterFirstSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise Crash(state.global_step)

    class CountSteps(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    common = dict(teacher=tiny_teacher_dir, data=text_file, max_tokens=1_400, batch_size=4, max_seq_length=32,
                  eval_sequences=4, eval_steps=3, save_steps=4, learning_rate=1e-2)
    whole = run(AlignConfig(student_out=str(tmp_path / "whole"), **common))
    out = tmp_path / "killed"
    with pytest.raises(Crash):
        run(AlignConfig(student_out=str(out), **common), callbacks=[CrashAfterFirstSave()])
    assert os.listdir(out / CHECKPOINT_DIR) == ["checkpoint-4"] and not (out / "model.safetensors").exists()

    # A checkpoint made with other settings is refused with the fix in the message (and left in place).
    with pytest.raises(ValueError, match="same `train`"):
        run(AlignConfig(student_out=str(out), resume=True, **{**common, "train": ["group_norm"]}))

    counter = CountSteps()
    resumed = run(AlignConfig(student_out=str(out), resume=True, **common), callbacks=[counter])
    assert counter.steps == whole["steps"] - 4  # steps 1-4 came from the checkpoint
    assert (resumed["steps"], resumed["tokens"]) == (whole["steps"], whole["tokens"]) and whole["steps"] > 4
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in whole["history"]]
    torch.testing.assert_close(torch.tensor(resumed["error_at_conversion"]), torch.tensor(whole["error_at_conversion"]))
    ours, theirs = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "whole" / "model.safetensors"))
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(torch.tensor(resumed["decays"]), torch.tensor(whole["decays"]), rtol=1e-5, atol=1e-7)
    assert not os.path.exists(out / CHECKPOINT_DIR)


# ---------------------------------------------------------------------------------------------------------------
# Hybrid students and layer subsets
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep_teacher_dir(tmp_path_factory):
    """A 4-layer tiny teacher, so half-depth students exist."""
    from tests.tiny_models import save_tiny_teacher

    return save_tiny_teacher(tmp_path_factory.mktemp("tiny-llama-4"), num_layers=4, seed=1)


def test_hybrid_with_sinks_trains_its_retention_and_keeps_the_window_teachers(tiny_teacher_dir, text_file, tmp_path):
    """attention_window / attention_sinks reach the conversion; by default q/k/v/o (the window's attention, exactly
    the teacher's) stay the teacher's, and the retention part (silent at conversion) learns: its gate opens and
    the per-layer error falls below the window-only error at conversion."""
    out = tmp_path / "aligned"
    report = run(AlignConfig(
        teacher=tiny_teacher_dir, student_out=str(out), data=text_file, max_tokens=4_000, batch_size=8,
        max_seq_length=48, learning_rate=1e-2, eval_sequences=16, eval_steps=10, calibration_sequences=16,
        attention_window=4, attention_sinks=2,
    ))
    assert report["config"]["train"] == ["g_proj", "group_norm", "decays"]
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert student.config.attention_window == 4 and student.config.attention_sinks == 2
    ours = load_file(str(out / "model.safetensors"))
    theirs = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).state_dict()
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(ours[f"model.layers.{layer}.retention.{proj}.weight"],
                               theirs[f"model.layers.{layer}.self_attn.{proj}.weight"])
        assert ours[f"model.layers.{layer}.retention.g_proj.bias"].abs().max() > 0  # the gate opened from swish(0)
    for layer, (b, a) in enumerate(zip(report["error_at_conversion"], report["error_after"])):
        assert a < b, f"layer {layer}: {b:.4f} -> {a:.4f}"


def test_hybrid_trains_q_k_v_o_when_asked(tiny_teacher_dir, text_file, tmp_path):
    out = tmp_path / "aligned"
    run(AlignConfig(
        teacher=tiny_teacher_dir, student_out=str(out), data=text_file, max_tokens=600, batch_size=4,
        max_seq_length=32, eval_sequences=4, calibration_sequences=4, attention_window=4,
        train=["q_proj", "g_proj"],
    ))
    ours = load_file(str(out / "model.safetensors"))
    theirs = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).state_dict()
    assert not torch.equal(ours["model.layers.0.retention.q_proj.weight"], theirs["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(ours["model.layers.0.retention.k_proj.weight"], theirs["model.layers.0.self_attn.k_proj.weight"])


def test_layer_errors_of_a_half_depth_student_use_its_teacher_layers(deep_teacher_dir):
    """Student layer i is measured against teacher layer teacher_layers[i]: a student of teacher layers [1, 3] has
    exactly the errors that the full-depth student (same conversion) has at layers 1 and 3."""
    from hf_retnet import retnet_from_llama
    from training.trainers.alignment import layer_errors

    teacher = AutoModelForCausalLM.from_pretrained(deep_teacher_dir).eval()
    ids = torch.randint(5, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    for kwargs in (dict(), dict(attention_window=6, attention_sinks=2)):
        full = retnet_from_llama(teacher, gate="constant", decays="retnet", **kwargs).eval()
        half = retnet_from_llama(teacher, gate="constant", decays="retnet", layers=[1, 3], **kwargs).eval()
        with torch.no_grad():
            full_err, full_norm = layer_errors(full, teacher, ids, mask)
            half_err, half_norm = layer_errors(half, teacher, ids, mask)
        torch.testing.assert_close(half_norm, full_norm[[1, 3]], atol=0, rtol=0)
        torch.testing.assert_close(half_err, full_err[[1, 3]], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(full_err[[0, 1]], full_err[[1, 3]])  # reading layers 0, 1 instead would show


def test_explicit_layers_and_keep_layers(deep_teacher_dir, text_file, tmp_path):
    from hf_retnet.convert_llama import select_layers
    from training.data.shards import PaddingCollator, build_dataset
    from transformers import AutoTokenizer

    common = dict(teacher=deep_teacher_dir, data=text_file, max_tokens=300, batch_size=4, max_seq_length=32,
                  eval_sequences=4, calibration_sequences=8, train=["group_norm"])
    report = run(AlignConfig(student_out=str(tmp_path / "explicit"), layers=["0,3"], **common))
    assert len(report["error_after"]) == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "explicit").config.teacher_layers == [0, 3]

    report = run(AlignConfig(student_out=str(tmp_path / "kept"), keep_layers=3, **common))
    kept = AutoModelForCausalLM.from_pretrained(tmp_path / "kept").config.teacher_layers
    # the same choice select_layers makes on the run's calibration batch (the first calibration_sequences items)
    tokenizer = AutoTokenizer.from_pretrained(deep_teacher_dir)
    dataset = build_dataset(text_file, tokenizer, 32, seed=0)
    calib = PaddingCollator(tokenizer.pad_token_id)([dataset[i] for i in range(8)])
    teacher = AutoModelForCausalLM.from_pretrained(deep_teacher_dir).eval()
    assert kept == select_layers(teacher, calib["input_ids"], 3, calib["attention_mask"])
    assert len(kept) == 3 and kept[0] == 0 and kept[-1] == 3 and len(report["error_after"]) == 3


def test_hybrid_and_layer_options_parse(tmp_path):
    config = parse_args(["--teacher", "t", "--student_out", "o", "--data", "d", "--layers", "0,2,5",
                         "--attention_window", "64", "--attention-sinks", "4"])
    assert config.layers == [0, 2, 5] and config.attention_window == 64 and config.attention_sinks == 4
    assert config.train == ["g_proj", "group_norm", "decays"]  # the hybrid's default
    assert parse_args(["--teacher", "t", "--student_out", "o", "--data", "d", "--layers", "1", "3"]).layers == [1, 3]
    config = parse_args(["--teacher", "t", "--student_out", "o", "--data", "d", "--keep_layers", "3"])
    assert config.keep_layers == 3 and config.layers is None and "q_proj" in config.train  # pure RetNet: all
    path = tmp_path / "align.yaml"
    path.write_text("teacher: t\nstudent_out: o\ndata: d.txt\nlayers: [0, 4]\nattention_window: 16\n"
                    "attention_sinks: 4\ngate: none\n")
    config = parse_args(["--config", str(path)])
    assert config.layers == [0, 4] and config.attention_window == 16 and config.train == ["group_norm", "decays"]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(attention_sinks=4), "needs attention_window > 0"),
        (dict(attention_window=-1), "config key 'attention_window'"),
        (dict(attention_window=64, attention_sinks=4, max_seq_length=68), "config key 'max_seq_length'"),
        (dict(layers=["0,3"], keep_layers=2), "'layers' and 'keep_layers'"),
        (dict(layers=["3,1"]), "config key 'layers'"),
        (dict(layers=["a"]), "config key 'layers'"),
        (dict(keep_layers=1), "config key 'keep_layers'"),
    ],
)
def test_bad_hybrid_and_layer_options_fail_clearly(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        AlignConfig(**{**dict(teacher="t", student_out="o", data="d"), **kwargs})

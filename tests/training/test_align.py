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
    assert report["error_after"] != report["error_at_conversion"]


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
    ],
)
def test_bad_config_fails_clearly(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        AlignConfig(**{**dict(teacher="t", student_out="o", data="d"), **kwargs})


def test_example_config_parses():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config = parse_args(["--config", os.path.join(root, "examples", "configs", "align_stories260K.yaml")])
    assert config.decays == "attention" and config.gate == "constant" and "decays" in config.train


def test_resume_continues_from_the_checkpoint(tiny_teacher_dir, text_file, tmp_path):
    """A checkpoint (as an interrupted run leaves it) is picked up: steps, tokens, history and weights continue."""
    from transformers import AutoModelForCausalLM as Auto

    from hf_retnet import retnet_from_llama
    from training.trainers.alignment import CHECKPOINT_DIR, _save_checkpoint, _trainable

    out = tmp_path / "aligned"
    student = retnet_from_llama(Auto.from_pretrained(tiny_teacher_dir), gate="constant")
    with torch.no_grad():
        student.model.layers[0].retention.q_proj.weight.mul_(0.5)  # a mark the resumed run must start from
    weights, _ = _trainable(student, ["group_norm"])
    optimizer = torch.optim.AdamW([{"params": weights}])
    state = {"step": 7, "tokens": 900, "epoch": 0, "position": 28,
             "history": [{"step": 0, "tokens": 0, "errors": [9.0, 9.0]}]}
    _save_checkpoint(str(out / CHECKPOINT_DIR), student, optimizer, state)
    report = run(AlignConfig(
        teacher=tiny_teacher_dir, student_out=str(out), data=text_file, max_tokens=1_400, batch_size=4,
        max_seq_length=32, resume=True, train=["group_norm"], eval_sequences=4,
    ))
    assert report["steps"] > 7 and report["tokens"] >= 1_400
    assert report["error_at_conversion"] == [9.0, 9.0]  # the history came from the checkpoint
    ours = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(ours["model.layers.0.retention.q_proj.weight"],
                               student.model.layers[0].retention.q_proj.weight)  # q_proj not trained: kept
    assert not os.path.exists(out / CHECKPOINT_DIR)

    # A checkpoint from another `train` list is refused with the fix in the message.
    _save_checkpoint(str(out / CHECKPOINT_DIR), student, optimizer, state)
    with pytest.raises(ValueError, match="same `train`"):
        run(AlignConfig(teacher=tiny_teacher_dir, student_out=str(out), data=text_file, max_tokens=1_400,
                        batch_size=4, max_seq_length=32, resume=True, gate="constant", eval_sequences=4))

"""The RetNet student inside TRL's own trainers, through the examples/trl scripts: SFTTrainer + LoRA, on-policy
`trl.DistillationTrainer`, and `trl.experimental.gkd.GKDTrainer`. Each runs a few CPU steps on a real local file with
a tiny student, the loss is finite and falls, and the saved student loads with AutoModelForCausalLM."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

from tests.tiny_models import build_tiny_llama, build_tiny_tokenizer, default_texts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDENT = json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "num_heads": 4, "intermediate_size": 128,
                      "chunk_size": 16})


def example(name: str):
    """Import examples/trl/<name>.py as a module (the scripts are not a package)."""
    path = os.path.join(REPO, "examples", "trl", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"trl_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_teacher(folder, vocab_extra: int = 0) -> str:
    """A tiny Llama teacher with confident (peaked) next-token distributions, so a fresh student starts far from it
    and distillation has something to learn in a few steps; `vocab_extra` makes its vocabulary differ."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer) + vocab_extra, initializer_range=0.3, seed=0)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, getattr(tokenizer, key))
        setattr(model.generation_config, key, getattr(tokenizer, key))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trl-routes")
    teacher = save_teacher(folder / "teacher")
    text = folder / "stories.txt"
    text.write_text("\n\n".join(default_texts(64)) + "\n", encoding="utf-8")
    chat = folder / "chat.jsonl"
    chat.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": t[:24]}, {"role": "assistant", "content": t[24:]}]}) + "\n"
        for t in default_texts(64)), encoding="utf-8")
    return {"teacher": teacher, "text": str(text), "chat": str(chat), "folder": folder}


def common_args(files, data, out, steps=8):
    return ["--student", "350M", "--student_overrides", STUDENT, "--train_data", data, "--output_dir", str(out),
            "--max_steps", str(steps), "--batch_size", "4", "--max_length", "64", "--logging_steps", "1"]


ROUTES = {
    "sft_text": ("sft_student_lora", "text", ["--learning_rate", "1e-2", "--lora_r", "8"]),
    "sft_chat": ("sft_student_lora", "chat", ["--learning_rate", "1e-2", "--lora_r", "8"]),
    "onpolicy": ("onpolicy_distill", "text", ["--learning_rate", "1e-2", "--max_completion_length", "12"]),
    "gkd": ("gkd_student", "text", ["--learning_rate", "1e-2", "--max_new_tokens", "12", "--lmbda", "0.5"]),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_route_trains_the_retnet_student_and_saves_a_loadable_model(files, route, tmp_path):
    from transformers import AutoModelForCausalLM

    import hf_retnet

    script, data, extra = ROUTES[route]
    out = tmp_path / "student"
    args = common_args(files, files[data], out) + extra
    if script == "sft_student_lora":
        args += ["--tokenizer", files["teacher"]]
    else:
        args += ["--teacher", files["teacher"], "--teacher_dtype", "float32"]
    trainer = example(script).main(args)

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"{route}: loss did not fall: {losses}"

    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert isinstance(loaded, hf_retnet.RetNetForCausalLM)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    trained = trained.merge_and_unload() if hasattr(trained, "merge_and_unload") else trained
    ids = torch.randint(0, loaded.config.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, trained.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    if script == "sft_student_lora":  # only the adapter was trained, and it is saved beside the merged student
        assert os.path.isfile(out / "adapter" / "adapter_config.json")


@pytest.mark.parametrize("script", ["onpolicy_distill", "gkd_student"])
def test_teacher_with_another_vocabulary_is_refused(files, script, tmp_path):
    other = save_teacher(tmp_path / "other-teacher", vocab_extra=8)
    args = common_args(files, files["text"], tmp_path / "out") + ["--teacher", other, "--tokenizer", files["teacher"]]
    module = example(script)
    with pytest.raises(ValueError, match="vocab_size .* shared vocabulary"):
        module.build_trainer(module.parse_args(args))


def test_onpolicy_route_consumes_a_teacher_adapter(files, tmp_path):
    """The TRL routes take base + adapter through the project's one teacher loader (merged once)."""
    from training.trainers.teacher_sft import main as finetune

    out = tmp_path / "ft"
    assert finetune(["--teacher_model", files["teacher"], "--train_data", files["text"], "--output_dir", str(out),
                     "--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none",
                     "--save_strategy", "no", "--teacher_dtype", "float32", "--learning_rate", "1e-2"]) == 0
    module = example("onpolicy_distill")
    args = module.parse_args(common_args(files, files["text"], tmp_path / "s", steps=1) + [
        "--teacher", files["teacher"], "--teacher_adapter", str(out / "adapter"), "--teacher_dtype", "float32"])
    trainer, _ = module.build_trainer(args)
    from training.teachers.direct import load_teacher_model

    want = load_teacher_model(files["teacher"], adapter=str(out / "adapter"), dtype="float32")
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    for (name, got), (_, ref) in zip(teacher.state_dict().items(), want.state_dict().items()):
        assert torch.equal(got, ref), name
    with pytest.raises(FileNotFoundError, match="teacher adapter folder"):
        module.build_trainer(module.parse_args(common_args(files, files["text"], tmp_path / "s") + [
            "--teacher", files["teacher"], "--teacher_adapter", str(tmp_path / "missing")]))

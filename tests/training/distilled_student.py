"""A tiny distilled student for the evaluation and publishing tests: a tiny Llama teacher, JSONL text, and a RetNet
trained from it for a few steps by `training.trainers.distillation.run` (the project's real trainer), built once per session."""

import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CONFIG = os.path.join(REPO, "examples", "configs", "train_tiny.yaml")
LM_EVAL_TASK = os.path.join(REPO, "examples", "lm_eval", "tiny_cloze.yaml")


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    return str(path)


def distilled_run(tmp_path_factory) -> dict:
    """{"teacher", "run", "train", "heldout"} paths; trains on first use in this session, then reuses."""
    from tests.tiny_models import default_texts, save_tiny_teacher

    base = tmp_path_factory.getbasetemp() / "distilled-student"
    paths = {"teacher": str(base / "teacher"), "run": str(base / "run"), "train": str(base / "train.jsonl"),
             "heldout": str(base / "heldout.jsonl")}
    if os.path.isfile(os.path.join(paths["run"], "model.safetensors")):
        return paths
    base.mkdir(parents=True, exist_ok=True)
    save_tiny_teacher(paths["teacher"], initializer_range=0.2)  # peaked teacher: KL is a real signal
    texts = default_texts(240)
    write_jsonl(paths["train"], texts[:200])
    write_jsonl(paths["heldout"], texts[200:212])
    from training.trainers.distillation_config import load_config
    from training.trainers.distillation import run

    config = load_config(TINY_CONFIG, ["--teacher_model", paths["teacher"], "--train_data", paths["train"],
                                       "--output_dir", paths["run"], "--max_steps", "6", "--report_to", "none"])
    run(config)
    return paths

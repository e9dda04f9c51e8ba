"""Stage 1 of a teacher-initialised student: attention transfer.

    python -m training.align --teacher runs/teacher --student_out runs/aligned --data train.txt --max_tokens 300000
    python -m training.align --config examples/configs/align_stories260K.yaml [--key value ...]

The Llama teacher is converted (`hf_retnet.retnet_from_llama`), then every retention layer learns to reproduce the
output of the attention layer it replaces, from the teacher's own hidden states: the teacher runs frozen, each layer
reads exactly what the teacher's attention read, so the layers train independently and errors do not compound.
The loss is each layer's relative MSE, ||retention(x) - attention(x)||^2 / ||attention(x)||^2 over real tokens,
summed over layers (so every layer counts the same whatever its output size). What trains is configurable
(`train`): retention projections, gate, per-head norm, decays; MLPs, norms and embeddings stay the teacher's.
Stage 2 is ordinary distillation: give the written folder as `student` to `python -m training.train`.

The training is `AlignmentTrainer` (a `transformers.Trainer`, alignment_trainer.py), so devices and several
processes are accelerate's: `accelerate launch -m training.align ...` runs it with DDP.

Writes `student_out/`: the aligned student (safetensors, config with the learned decays), the tokenizer,
`align_report.json` (per-layer error at conversion and after, the curve) and `align_error.png`. Resumable:
the Trainer keeps a checkpoint in `student_out/.align-checkpoint` every `save_steps`; rerun with `--resume`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import asdict

import numpy as np
import torch

from training.trainers.alignment_config import HYBRID_TRAINABLE, TRAINABLE, AlignConfig  # noqa: F401 (public names)
from training.trainers.alignment_trainer import (  # noqa: F401 (public names)
    CHECKPOINT_DIR, AlignmentTrainer, RetentionAlignment, freeze_all_but, check_resumable, evaluate_alignment, layer_errors,
)
from training.utils.checks import check_output_folder, no_empty_folder_left
from training.utils.errors import command
from training.utils.io import save_figure, staged_files


def plot_alignment(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tokens = [h["tokens"] for h in history]
    for i in range(len(history[0]["errors"])):
        ax.plot(tokens, [h["errors"][i] for h in history], marker=".", label=f"layer {i}")
    ax.set_yscale("log")
    ax.set_xlabel("alignment tokens")
    ax.set_ylabel("held-out relative error ||ret - attn||^2 / ||attn||^2")
    ax.set_title("Stage 1: retention vs the attention it replaces")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def error_history(log_history: list[dict]) -> list[dict]:
    """[{step, tokens, errors}] from the Trainer's log: one entry per evaluation."""
    history = []
    for entry in log_history:
        errors = [entry[key] for key in sorted((k for k in entry if k.startswith("eval_layer_error_")
                                                and k[len("eval_layer_error_"):].isdigit()),
                                               key=lambda k: int(k.rsplit("_", 1)[1]))]
        if errors:
            history.append({"step": entry["step"], "tokens": entry.get("num_input_tokens_seen", 0), "errors": errors})
    return history


def _mean_tokens(dataset, max_seq_length: int, sample: int = 256) -> float:
    """Real tokens per sequence: from the shard lengths, or measured on the first `sample` items."""
    if hasattr(dataset, "lengths"):
        return float(np.mean(dataset.lengths))
    items = [dataset[i]["input_ids"] for i in range(min(sample, len(dataset)))]
    return float(np.mean([min(len(ids), max_seq_length) for ids in items]))


def training_arguments(config: AlignConfig, output_dir: str, steps: int, resuming: bool):
    """The Trainer's settings for a stage-1 run: cosine schedule over `steps`, an evaluation every eval_steps."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps, per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=config.batch_size,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay, adam_beta2=0.95, max_grad_norm=1.0,
        lr_scheduler_type="cosine", warmup_steps=round(config.warmup_ratio * steps),
        eval_strategy="steps", eval_steps=config.eval_steps, eval_on_start=not resuming,
        logging_steps=config.eval_steps, save_strategy="steps", save_steps=config.save_steps, save_total_limit=1,
        seed=config.seed, data_seed=config.seed, report_to="none", remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding", use_cpu=config.device == "cpu", dataloader_pin_memory=False,
    )


def run(config: AlignConfig, callbacks=None) -> dict:
    """Convert, align, write `student_out`. Returns the report (also written as align_report.json).
    `callbacks`: extra `TrainerCallback`s for the AlignmentTrainer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from hf_retnet import RetNetForCausalLM, retnet_from_llama

    from training.converters.gguf import resolve_pretrained
    from training.data.shards import PaddingCollator, build_dataset

    set_seed(config.seed)
    teacher = resolve_pretrained(config.teacher)  # a .gguf file: its converted folder
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    llama = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval().requires_grad_(False)
    collator = PaddingCollator(tokenizer.pad_token_id)
    train_set = build_dataset(config.data, tokenizer, config.max_seq_length, seed=config.seed)
    eval_set = build_dataset(config.eval_data or config.data, tokenizer, config.max_seq_length, shuffle=False)
    eval_set = torch.utils.data.Subset(eval_set, range(min(config.eval_sequences, len(eval_set))))

    checkpoint_dir = os.path.join(config.student_out, CHECKPOINT_DIR)
    checkpoint = get_last_checkpoint(checkpoint_dir) if config.resume and os.path.isdir(checkpoint_dir) else None
    if checkpoint:
        check_resumable(checkpoint, config)
        student = RetNetForCausalLM.from_pretrained(checkpoint)  # the shape; the Trainer reloads the state itself
    else:
        calib = collator([train_set[i] for i in range(min(config.calibration_sequences, len(train_set)))])
        device = "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
        llama.to(device)  # conversion measures the teacher's attention on the calibration batch
        calib_ids, calib_mask = calib["input_ids"].to(device), calib["attention_mask"].to(device)
        layers = config.layers
        if config.keep_layers is not None:
            from hf_retnet.convert_llama import select_layers

            layers = select_layers(llama, calib_ids, config.keep_layers, calib_mask)
            print(f"keep_layers={config.keep_layers}: teacher layers {layers}")
        student = retnet_from_llama(
            llama, share_kv=config.share_kv, gate=config.gate, decays=config.decays,
            calibration_ids=calib_ids, calibration_mask=calib_mask, chunk_size=config.chunk_size, layers=layers,
            attention_window=config.attention_window, attention_sinks=config.attention_sinks,
        )
    freeze_all_but(student, config.train)
    model = RetentionAlignment(student, train_decays="decays" in config.train)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = max(1, math.ceil(config.max_tokens / (config.batch_size * world * _mean_tokens(train_set, config.max_seq_length))))
    trainer = AlignmentTrainer(
        model, llama, config, args=training_arguments(config, checkpoint_dir, steps, resuming=checkpoint is not None),
        train_dataset=train_set, eval_dataset=eval_set, data_collator=collator, processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    history = error_history(trainer.state.log_history)
    if history[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()
        history = error_history(trainer.state.log_history)
    at_conversion, after = history[0]["errors"], history[-1]["errors"]
    print("alignment error at conversion: " + " ".join(f"L{i} {e:.4f}" for i, e in enumerate(at_conversion)))
    print("alignment error after stage 1: " + " ".join(f"L{i} {e:.4f}" for i, e in enumerate(after)))
    model.write_decays()
    report = {
        "config": asdict(config),
        "tokens": int(trainer.state.num_input_tokens_seen),
        "steps": trainer.state.global_step,
        "error_at_conversion": at_conversion,
        "error_after": after,
        "decays": student.config.retention_decays,
        "history": history,
    }
    if trainer.is_world_process_zero():
        _write_outputs(config.student_out, model, tokenizer, report)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return report


def _write_outputs(folder: str, model, tokenizer, report: dict) -> None:
    """Everything goes to a staging folder first, then each file is moved in (atomic per file)."""
    with staged_files(folder) as staging:  # run() has written the learned decays into the student already
        model.student.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, "align_report.json"), "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)
        plot_alignment(report["history"], os.path.join(staging, "align_error.png"))


def build_parser():
    """`python -m training.align`'s parser: every AlignConfig field as a YAML key (`--config`) and a flag."""
    from training.utils.parser import CommandParser

    return CommandParser(AlignConfig, prog="python -m training.align", description=__doc__)


def parse_args(argv: list[str] | None = None) -> AlignConfig:
    """`--config file.yaml` (optional) then `--key value` overrides; raises ConfigError (a ValueError) on a bad key."""
    return build_parser().parse(argv)[0]


@command
def main(argv: list[str] | None = None) -> int:
    (config,) = build_parser().parse_or_exit(argv)
    check_output_folder(config.student_out, "config key 'student_out':")
    with no_empty_folder_left(config.student_out):  # a run stopped by a mistake leaves no empty folder behind
        os.makedirs(config.student_out, exist_ok=True)
        run(config)
    print(f"wrote {config.student_out}; stage 2: python -m training.train --config ... --student {config.student_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

Writes `student_out/`: the aligned student (safetensors, config with the learned decays), the tokenizer,
`align_report.json` (per-layer error at conversion and after, the curve) and `align_error.png`. Resumable:
a checkpoint folder is kept in `student_out/.align-checkpoint` every `save_steps`; rerun with `--resume`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field

import torch

from training.utils.checks import check_output_folder, no_empty_folder_left
from training.utils.errors import command
from training.utils.io import save_figure, staged_files, staged_folder

TRAINABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "group_norm", "decays")
# What a hybrid student (attention_window > 0) trains unless `train` says otherwise. Its q/k/v/o are also its window
# attention's, which at conversion is exactly the teacher's attention over the window (+ sinks): with them frozen,
# every token whose context fits in the first W + S tokens stays exactly the teacher's, and stage 1 only adds the
# retention part (gate, per-head norm, decays) on top. Training them trades that exactness for a better fit of the
# far past: measured on stories260K (W=16, S=4, 150k tokens, held-out nats/token; teacher 1.623, converted 1.726),
# this default reaches 1.714 (1.713 at 300k tokens and lr 1e-2: capacity-bound, since retention must use the
# teacher's softmax q/k as linear features), q/k/v/o trained too 1.686, while the first W + S predictions move from
# the teacher's 1.906 to 1.890. List q/k/v/o in `train` to take that trade (or adapt them end to end in stage 2).
HYBRID_TRAINABLE = ("g_proj", "group_norm", "decays")
CHECKPOINT_DIR = ".align-checkpoint"


@dataclass
class AlignConfig:
    """Attention transfer settings (every field is also a `--key value` flag and a YAML key)."""

    teacher: str = field(default=None, metadata={"help": "LlamaForCausalLM folder, Hub id or Llama .gguf file to convert and align to."})
    student_out: str = field(default=None, metadata={"help": "Folder to write the aligned student into."})
    data: str = field(
        default=None,
        metadata={"help": "Alignment text: a text (one record per paragraph) / JSONL / Parquet file or a shard folder."},
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "Held-out text for the reported per-layer errors (default: the first items of data)."}
    )
    max_tokens: int = field(default=300_000, metadata={"help": "Real (unpadded) teacher tokens to align on."})
    max_seq_length: int = field(default=256, metadata={"help": "Tokens per sequence (longer records are cut)."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate (cosine decay over max_tokens)."})
    decay_learning_rate: float = field(default=3e-2, metadata={"help": "AdamW learning rate of the log-decays."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of max_tokens with a linear warm-up."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the trained matrices."})
    train: list[str] | None = field(
        default=None,
        metadata={"help": f"What trains, any of {TRAINABLE} (decays: the per-head gammas). Default: all of them for a "
                          f"pure RetNet; {list(HYBRID_TRAINABLE)} for a hybrid (attention_window > 0), whose q/k/v/o "
                          "are also its window attention's, exactly the teacher's at conversion: list them to train "
                          "them anyway."},
    )
    share_kv: bool = field(default=True, metadata={"help": "Keep the teacher's grouped k/v heads (shared states)."})
    gate: str = field(default="constant", metadata={"help": "Output gate at conversion: none, constant or random."})
    decays: str = field(default="attention", metadata={"help": "Initial decays: 'attention' (from the teacher) or 'retnet'."})
    calibration_sequences: int = field(default=64, metadata={"help": "Sequences measured for decays and norm scales."})
    eval_sequences: int = field(default=64, metadata={"help": "Held-out sequences the per-layer errors are measured on."})
    eval_steps: int = field(default=25, metadata={"help": "Measure the held-out per-layer error every this many steps."})
    save_steps: int = field(default=100, metadata={"help": "Write a resumable checkpoint every this many steps."})
    resume: bool = field(default=False, metadata={"help": "Continue from student_out/.align-checkpoint when present."})
    chunk_size: int = field(default=64, metadata={"help": "Chunk size of the student's chunkwise retention."})
    attention_window: int = field(
        default=0,
        metadata={"help": "W > 0 converts to the hybrid student: softmax attention over the last W tokens (the "
                          "teacher's own q/k/v/o) plus retention over the older ones; 0: pure RetNet. The retention "
                          "part starts silent and learns only from tokens more than W (+ attention_sinks) back, so "
                          "max_seq_length must exceed W + S, and the longer the sequences the more it sees."},
    )
    attention_sinks: int = field(
        default=0,
        metadata={"help": "S > 0 (with attention_window > 0): each document's first S tokens stay in the window "
                          "softmax of every later token and never enter the retention state (StreamingLLM's attention "
                          "sinks; 4 is the usual choice)."},
    )
    layers: list[str] | None = field(
        default=None,
        metadata={"help": "Teacher layer indices to keep, in increasing order, for a shallower student: "
                          "comma-separated on the command line (--layers 0,3,5), a list in YAML. Default: all. "
                          "Excludes keep_layers."},
    )
    keep_layers: int | None = field(
        default=None,
        metadata={"help": "Keep this many teacher layers, chosen on the calibration batch by "
                          "hf_retnet.convert_llama.select_layers (the first, the last and the middle blocks that "
                          "change their input most). Excludes layers."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of data order and new weights."})
    device: str = field(default="cpu", metadata={"help": "Device, e.g. 'cuda'."})

    def __post_init__(self):
        for key in ("teacher", "student_out", "data"):
            if not getattr(self, key):
                raise ValueError(f"config key {key!r}: required (see python -m training.align --help)")
        for key in ("attention_window", "attention_sinks"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"config key {key!r}: must be a whole number >= 0, got {value!r}")
        if self.attention_sinks and not self.attention_window:
            raise ValueError("config key 'attention_sinks': needs attention_window > 0 (sinks extend the window)")
        if self.attention_window and self.max_seq_length <= self.attention_window + self.attention_sinks:
            raise ValueError(
                f"config key 'max_seq_length': {self.max_seq_length} tokens never reach past the window "
                f"(attention_window + attention_sinks = {self.attention_window + self.attention_sinks}), so the "
                "retention part would see no token to learn from; use longer sequences"
            )
        self.layers = _parse_layers(self.layers)
        if self.layers is not None and self.keep_layers is not None:
            raise ValueError("config keys 'layers' and 'keep_layers': give one of them (explicit indices, or a count "
                             "chosen by select_layers), not both")
        if self.keep_layers is not None and (isinstance(self.keep_layers, bool) or self.keep_layers < 2):
            raise ValueError(f"config key 'keep_layers': must be >= 2 (the first and last layers), got {self.keep_layers!r}")
        if self.train is None:
            self.train = list(HYBRID_TRAINABLE if self.attention_window else TRAINABLE)
        bad = [part for part in self.train if part not in TRAINABLE]
        if bad or not self.train:
            raise ValueError(f"config key 'train': {bad or 'empty'}; choose from {TRAINABLE}")
        for key in ("max_tokens", "max_seq_length", "batch_size", "eval_steps", "save_steps", "calibration_sequences",
                    "eval_sequences"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r}: must be >= 1, got {getattr(self, key)}")
        if self.learning_rate <= 0 or self.decay_learning_rate < 0:
            raise ValueError("config keys 'learning_rate' (> 0) and 'decay_learning_rate' (>= 0) out of range")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"config key 'warmup_ratio': must be in [0, 1), got {self.warmup_ratio}")
        if self.gate not in ("none", "constant", "random"):
            raise ValueError(f"config key 'gate': {self.gate!r} is not one of none, constant, random")
        if self.decays not in ("attention", "retnet"):
            raise ValueError(f"config key 'decays': {self.decays!r} is not one of attention, retnet")
        if "g_proj" in self.train and self.gate == "none":
            self.train = [part for part in self.train if part != "g_proj"]  # nothing to train


def _parse_layers(layers) -> list[int] | None:
    """Teacher layer indices from the command line ("0,3,5" or "0 3 5") or YAML ([0, 3, 5] or "0,3,5")."""
    if layers is None:
        return None
    items = layers.split(",") if isinstance(layers, str) else layers
    values = []
    for item in items:
        parts = item.split(",") if isinstance(item, str) else [item]
        for part in parts:
            if isinstance(part, str) and not part.strip():
                continue
            try:
                if isinstance(part, (bool, float)):
                    raise ValueError
                values.append(int(part))
            except (TypeError, ValueError):
                raise ValueError(f"config key 'layers': {layers!r} is not a list of teacher layer indices "
                                 "(e.g. 0,3,5)") from None
    if not values or any(i < 0 for i in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"config key 'layers': {layers!r} must be distinct indices >= 0 in increasing order")
    return values


# ---------------------------------------------------------------------------------------------------------------


class AttentionTaps:
    """Forward hooks on every teacher attention layer: its input (the normed hidden states) and its output."""

    def __init__(self, llama):
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [
            layer.self_attn.register_forward_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(llama.model.layers)
        ]

    def _hook(self, i):
        def hook(module, args, kwargs, output):
            self.inputs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.outputs[i] = output[0] if isinstance(output, tuple) else output

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def retention_inputs(student, mask: torch.Tensor):
    """cos, sin, mask, time for a retention layer, exactly as RetNetModel.forward builds them (no cache)."""
    time = mask.cumsum(-1).float()
    cos, sin = student.model.rotary_emb((time - 1).clamp(min=0))
    return cos, sin, mask, time


def layer_errors(student, llama, input_ids, mask):
    """Per layer: (sum of squared errors over real tokens, sum of squared teacher outputs) -> two [L] tensors.
    Runs the teacher (no grad); the student retention layers run with grad if grad is enabled. Student layer i is
    compared with (and reads the input of) the teacher layer it was copied from, `student.config.teacher_layers[i]`
    (layer i when the config does not say), so a shallower student is measured against the right layers."""
    sources = getattr(student.config, "teacher_layers", None) or list(range(len(student.model.layers)))
    taps = AttentionTaps(llama)
    try:
        with torch.no_grad():
            llama.model(input_ids=input_ids, attention_mask=mask)
    finally:
        taps.remove()
    cos, sin, mask, time = retention_inputs(student, mask)
    keep = mask.bool()
    errors, norms = [], []
    for layer, source in zip(student.model.layers, sources):
        out, _ = layer.retention(taps.inputs[source].detach(), cos, sin, mask, time, None, "chunkwise")
        target = taps.outputs[source].detach().float()
        errors.append((out.float() - target)[keep].pow(2).sum())
        norms.append(target[keep].pow(2).sum())
    return torch.stack(errors), torch.stack(norms)


@torch.no_grad()
def evaluate_alignment(student, llama, batches) -> list[float]:
    """Relative error ||retention - attention||^2 / ||attention||^2 per layer over `batches`."""
    err = norm = 0
    for ids, mask in batches:
        e, n = layer_errors(student, llama, ids, mask)
        err, norm = err + e, norm + n
    return (err / norm).tolist()


def _batches(dataset, collator, batch_size: int, device):
    for start in range(0, len(dataset) - batch_size + 1, batch_size):
        batch = collator([dataset[i] for i in range(start, start + batch_size)])
        yield batch["input_ids"].to(device), batch["attention_mask"].to(device)


def _trainable(student, parts):
    """Parameters to optimise: (matrices and norms, log-decays). Everything else is frozen."""
    for p in student.parameters():
        p.requires_grad_(False)
    weights, decays = [], []
    for layer in student.model.layers:
        ret = layer.retention
        for part in parts:
            if part == "decays":
                ret.log_decay.requires_grad_(True)
                decays.append(ret.log_decay)
            elif getattr(ret, part, None) is not None:
                for p in getattr(ret, part).parameters():
                    p.requires_grad_(True)
                    weights.append(p)
    return weights, decays


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


def _write_decays(student) -> None:
    """The learned gammas go into the config, which is what a checkpoint carries (the buffer is not saved)."""
    student.config.retention_decays = [layer.retention.log_decay.detach().exp().tolist() for layer in student.model.layers]


def _save_checkpoint(folder, student, optimizer, state) -> None:
    _write_decays(student)
    with staged_folder(folder) as staging:
        student.save_pretrained(staging, safe_serialization=True)
        torch.save(optimizer.state_dict(), os.path.join(staging, "optimizer.pt"))
        with open(os.path.join(staging, "align_state.json"), "w", encoding="utf-8") as handle:
            json.dump(state, handle)


def run(config: AlignConfig) -> dict:
    """Convert, align, write `student_out`. Returns the report (also written as align_report.json)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from hf_retnet import RetNetForCausalLM, retnet_from_llama

    from training.data.shards import PaddingCollator, build_dataset

    set_seed(config.seed)
    device = torch.device(config.device)
    from training.converters.gguf import resolve_pretrained

    teacher = resolve_pretrained(config.teacher)  # a .gguf file: its converted folder
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    llama = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).to(device).eval()
    for p in llama.parameters():
        p.requires_grad_(False)
    collator = PaddingCollator(tokenizer.pad_token_id)
    train_set = build_dataset(config.data, tokenizer, config.max_seq_length, seed=config.seed)
    eval_set = build_dataset(config.eval_data or config.data, tokenizer, config.max_seq_length, shuffle=False)
    eval_count = min(config.eval_sequences, len(eval_set))
    eval_batches = list(_batches(torch.utils.data.Subset(eval_set, range(eval_count)), collator,
                                 min(config.batch_size, eval_count), device))
    calib = collator([train_set[i] for i in range(min(config.calibration_sequences, len(train_set)))])

    checkpoint = os.path.join(config.student_out, CHECKPOINT_DIR)
    resuming = config.resume and os.path.isdir(checkpoint)
    if resuming:
        student = RetNetForCausalLM.from_pretrained(checkpoint).to(device)
        with open(os.path.join(checkpoint, "align_state.json"), encoding="utf-8") as handle:
            state = json.load(handle)
    else:
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
        ).to(device)
        state = {"step": 0, "tokens": 0, "epoch": 0, "position": 0, "history": []}
    weights, decays = _trainable(student, config.train)
    groups = [{"params": weights, "lr": config.learning_rate, "weight_decay": config.weight_decay}]
    if decays:
        groups.append({"params": decays, "lr": config.decay_learning_rate, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    if resuming:
        try:
            optimizer.load_state_dict(torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location=device))
        except ValueError as err:
            raise ValueError(
                f"{checkpoint}: its optimizer state does not fit this run's trained parts ({err}); resume with the "
                "same `train` and `gate` settings, or delete the checkpoint folder to start over"
            ) from None
    peak = [g["lr"] for g in optimizer.param_groups]
    max_log_decay = math.log(1 - 1e-5)

    def lr_factor(tokens: int) -> float:
        progress = tokens / config.max_tokens
        if progress < config.warmup_ratio:
            return max(progress / config.warmup_ratio, 0.01)
        rest = (progress - config.warmup_ratio) / (1 - config.warmup_ratio)
        return 0.5 * (1 + math.cos(math.pi * min(rest, 1.0)))

    if not state["history"]:
        state["history"].append({"step": 0, "tokens": 0, "errors": evaluate_alignment(student, llama, eval_batches)})
    at_conversion = state["history"][0]["errors"]
    print("alignment error at conversion: " + " ".join(f"L{i} {e:.4f}" for i, e in enumerate(at_conversion)))
    bar = tqdm(total=config.max_tokens, initial=state["tokens"], unit="tok", desc="align", dynamic_ncols=True)
    student.train()
    while state["tokens"] < config.max_tokens:
        train_set.set_epoch(state["epoch"])
        if state["position"] + config.batch_size > len(train_set):
            state["epoch"], state["position"] = state["epoch"] + 1, 0
            continue
        batch = collator([train_set[i] for i in range(state["position"], state["position"] + config.batch_size)])
        state["position"] += config.batch_size
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        for group, lr in zip(optimizer.param_groups, peak):
            group["lr"] = lr * lr_factor(state["tokens"])
        errors, norms = layer_errors(student, llama, ids, mask)
        loss = (errors / norms.clamp(min=1e-12)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights + decays, 1.0)
        optimizer.step()
        with torch.no_grad():
            for log_decay in decays:
                log_decay.clamp_(max=max_log_decay)  # gamma < 1: the state must forget
        real = int(mask.sum())
        state["tokens"] += real
        state["step"] += 1
        bar.update(real)
        bar.set_postfix(loss=f"{loss.item() / len(norms):.4f}")
        if state["step"] % config.eval_steps == 0 or state["tokens"] >= config.max_tokens:
            student.eval()
            errs = evaluate_alignment(student, llama, eval_batches)
            student.train()
            state["history"].append({"step": state["step"], "tokens": state["tokens"], "errors": errs})
        if state["step"] % config.save_steps == 0 and state["tokens"] < config.max_tokens:
            _save_checkpoint(checkpoint, student, optimizer, state)
    bar.close()
    for log_decay in decays:
        log_decay.requires_grad_(False)
    _write_decays(student)
    after = state["history"][-1]["errors"]
    print("alignment error after stage 1: " + " ".join(f"L{i} {e:.4f}" for i, e in enumerate(after)))
    report = {
        "config": asdict(config),
        "tokens": state["tokens"],
        "steps": state["step"],
        "error_at_conversion": at_conversion,
        "error_after": after,
        "decays": student.config.retention_decays,
        "history": state["history"],
    }
    _write_outputs(config.student_out, student, tokenizer, report)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return report


def _write_outputs(folder: str, student, tokenizer, report: dict) -> None:
    """Everything goes to a staging folder first, then each file is moved in (atomic per file)."""
    with staged_files(folder) as staging:
        student.save_pretrained(staging, safe_serialization=True)
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

"""`AlignmentTrainer`: stage 1 as a `transformers.Trainer`, each retention layer trained to reproduce the attention
layer it replaces (the loss: `RetentionAlignment`); `AlignConfig` (alignment_config.py) holds its settings."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict

import torch
from transformers import Trainer

from training.trainers.alignment_config import AlignConfig

CHECKPOINT_DIR = ".align-checkpoint"
ALIGN_CONFIG_NAME = "align_config.json"


# ---------------------------------------------------------------------------------------------------------------
# The loss: each retention layer against the attention layer it replaces, on the teacher's own inputs
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


@torch.no_grad()
def teacher_attention(llama, input_ids, mask, layers: list[int]):
    """The teacher's attention inputs and outputs at `layers`: two lists of [B, T, hidden] tensors."""
    taps = AttentionTaps(llama)
    try:
        llama.model(input_ids=input_ids, attention_mask=mask)
    finally:
        taps.remove()
    return [taps.inputs[i] for i in layers], [taps.outputs[i] for i in layers]


def retention_inputs(student, mask: torch.Tensor):
    """cos, sin, mask, time for a retention layer, exactly as RetNetModel.forward builds them (no cache)."""
    time = mask.cumsum(-1).float()
    cos, sin = student.model.rotary_emb((time - 1).clamp(min=0))
    return cos, sin, mask, time


class RetentionAlignment(torch.nn.Module):
    """What stage 1 trains: the student's retention layers, each fed its teacher layer's attention input.

    forward(attention inputs, attention outputs, mask) -> per layer (sum of squared errors over real tokens, sum of
    squared teacher outputs): two [L] tensors. The teacher stays outside (its taps are inputs), so this module is
    all that DDP wraps and a checkpoint holds. With `train_decays`, the log-decays are one [L, H_kv] parameter used
    in place of the layers' (non-trainable, unsaved) buffers; `write_decays` puts them back into buffers and config.
    """

    MAX_LOG_DECAY = math.log(1 - 1e-5)  # gamma < 1: the state must forget

    def __init__(self, student, train_decays: bool = False):
        super().__init__()
        self.student = student
        self.log_decays = None
        if train_decays:
            self.log_decays = torch.nn.Parameter(torch.stack([l.retention.log_decay.detach().float().clone()
                                                              for l in student.model.layers]))  # [L, H_kv]

    @property
    def teacher_layers(self) -> list[int]:
        """Student layer i replaces teacher layer teacher_layers[i] (layer i when the config does not say)."""
        return getattr(self.student.config, "teacher_layers", None) or list(range(len(self.student.model.layers)))

    def forward(self, attention_inputs, attention_outputs, attention_mask):
        cos, sin, mask, time = retention_inputs(self.student, attention_mask)
        keep = mask.bool()
        errors, norms = [], []
        for i, (layer, x, target) in enumerate(zip(self.student.model.layers, attention_inputs, attention_outputs)):
            args = (x.detach(), cos, sin, mask, time, None, "chunkwise")
            if self.log_decays is None:
                out, _ = layer.retention(*args)
            else:
                decay = {"log_decay": self.log_decays[i].clamp(max=self.MAX_LOG_DECAY)}
                out, _ = torch.func.functional_call(layer.retention, decay, args)
            target = target.detach().float()
            errors.append((out.float() - target)[keep].pow(2).sum())
            norms.append(target[keep].pow(2).sum())
        return torch.stack(errors), torch.stack(norms)

    @torch.no_grad()
    def write_decays(self) -> None:
        """The learned gammas into the layers' buffers and the config (what a saved folder carries)."""
        if self.log_decays is not None:
            for layer, log_decay in zip(self.student.model.layers, self.log_decays.clamp(max=self.MAX_LOG_DECAY)):
                layer.retention.log_decay.copy_(log_decay)
        self.student.config.retention_decays = [layer.retention.log_decay.exp().tolist()
                                                for layer in self.student.model.layers]

    @torch.no_grad()
    def read_decays(self) -> None:
        """The layers' buffers into the trained parameter (after loading a checkpoint)."""
        if self.log_decays is not None:
            self.log_decays.copy_(torch.stack([layer.retention.log_decay.float() for layer in self.student.model.layers]))


def layer_errors(model, llama, input_ids, mask):
    """Per layer of `model` (a student or its RetentionAlignment): (sum of squared errors over real tokens, sum of
    squared teacher outputs) -> two [L] tensors, each student layer against the teacher layer it was copied from."""
    model = model if isinstance(model, RetentionAlignment) else RetentionAlignment(model)
    inputs, outputs = teacher_attention(llama, input_ids, mask, model.teacher_layers)
    return model(inputs, outputs, mask)


@torch.no_grad()
def evaluate_alignment(model, llama, batches) -> list[float]:
    """Relative error ||retention - attention||^2 / ||attention||^2 per layer over `batches` of (ids, mask)."""
    err = norm = 0
    for ids, mask in batches:
        e, n = layer_errors(model, llama, ids, mask)
        err, norm = err + e, norm + n
    return (err / norm).tolist()


def freeze_all_but(student, parts) -> None:
    """Freeze everything but the retention `parts` (the decays train through RetentionAlignment.log_decays)."""
    for p in student.parameters():
        p.requires_grad_(False)
    for layer in student.model.layers:
        for part in parts:
            module = getattr(layer.retention, part, None) if part != "decays" else None
            if module is not None:
                module.requires_grad_(True)


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------


class AlignmentTrainer(Trainer):
    """`transformers.Trainer` whose loss is the per-layer alignment error.

    The model is a `RetentionAlignment`; the frozen teacher is held here and run in `compute_loss`. The Trainer and
    accelerate give the rest: devices, DDP (`accelerate launch -m training.align`), the schedule, logging, resumable
    checkpoints. `evaluate` measures the per-layer error on `eval_dataset` (logged as `eval_layer_error_<i>`); a
    checkpoint is the student folder itself (learned decays in its config) plus the Trainer's state.
    """

    def __init__(self, model: RetentionAlignment, teacher, align_config: AlignConfig, **kwargs):
        super().__init__(model=model, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.align_config = align_config

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Sum over layers of ||retention(x) - attention(x)||^2 / ||attention(x)||^2 on the real tokens."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        taps = teacher_attention(self.teacher, ids, mask, self.accelerator.unwrap_model(model).teacher_layers)
        errors, norms = model(*taps, mask)
        loss = (errors / norms.clamp(min=1e-12)).sum()
        return (loss, {"errors": errors, "norms": norms}) if return_outputs else loss

    def create_optimizer(self, model=None):
        """AdamW (betas 0.9 / 0.95) over the trained retention parts, with its own learning rate for the decays."""
        if self.optimizer is None:
            model = self.accelerator.unwrap_model(self.model if model is None else model)
            decays = [model.log_decays] if model.log_decays is not None else []
            weights = [p for p in model.student.parameters() if p.requires_grad]
            groups = [{"params": weights, "weight_decay": self.args.weight_decay}]
            if decays:
                groups.append({"params": decays, "lr": self.align_config.decay_learning_rate, "weight_decay": 0.0})
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate,
                                               betas=(self.args.adam_beta1, self.args.adam_beta2))
        return self.optimizer

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Per-layer relative error on the held-out sequences (every rank measures all of them: they are few)."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        size = self.args.per_device_eval_batch_size
        batches = (self.data_collator([dataset[i] for i in range(start, min(start + size, len(dataset)))])
                   for start in range(0, len(dataset), size))
        device = self.args.device
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        errors = evaluate_alignment(model, self.teacher, ((b["input_ids"].to(device), b["attention_mask"].to(device))
                                                          for b in batches))
        model.train()
        metrics = {f"{metric_key_prefix}_layer_error_{i}": e for i, e in enumerate(errors)}
        metrics[f"{metric_key_prefix}_layer_error_mean"] = sum(errors) / len(errors)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """A checkpoint is the student folder (not the module's state dict: the student may tie its embeddings)."""
        if self.args.should_save:
            save_student(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir,
                         self.processing_class, self.align_config)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_student_state(self.accelerator.unwrap_model(self.model if model is None else model), resume_from_checkpoint)


def save_student(model: RetentionAlignment, folder: str, tokenizer, config: AlignConfig) -> None:
    """The student (learned decays in its config), its tokenizer and the settings that shaped it."""
    model.write_decays()
    os.makedirs(folder, exist_ok=True)
    model.student.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, ALIGN_CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(asdict(config), handle, indent=1)


def load_student_state(model: RetentionAlignment, folder: str) -> None:
    from hf_retnet import RetNetForCausalLM

    saved = RetNetForCausalLM.from_pretrained(folder)
    model.student.load_state_dict(saved.state_dict())
    with torch.no_grad():
        for ours, theirs in zip(model.student.model.layers, saved.model.layers):
            ours.retention.log_decay.copy_(theirs.retention.log_decay)
    model.read_decays()


# Settings a resumed run must share with the checkpoint it continues: they decide the student's shape and what trains.
RESUME_KEYS = ("train", "gate", "share_kv", "decays", "attention_window", "attention_sinks", "layers", "keep_layers")


def check_resumable(checkpoint: str, config: AlignConfig) -> None:
    path = os.path.join(checkpoint, ALIGN_CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{checkpoint}: not a stage-1 checkpoint (no {ALIGN_CONFIG_NAME}); delete "
                         f"{os.path.dirname(checkpoint)} to start over")
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    differ = [key for key in RESUME_KEYS if saved.get(key) != getattr(config, key)]
    if differ:
        raise ValueError(
            f"{checkpoint}: made with other settings ({', '.join(f'{k}={saved.get(k)!r}' for k in differ)}); resume "
            "with the same `train`, `gate` and shape settings, or delete the checkpoint folder to start over"
        )

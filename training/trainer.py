"""`DistillationTrainer`: a `transformers.Trainer` whose loss is alpha * CE + (1 - alpha) * KD against a teacher.

Only a few hooks are overridden: `compute_loss` (student hidden states -> `training.losses.distillation_loss`),
`get_batch_samples` (exact token counts for gradient accumulation / multi-process, and one-batch-ahead teacher
prefetch), `create_optimizer` (optim=muon) and `log` (adds the distillation metrics to the Trainer's own logs).
"""

from __future__ import annotations

import inspect
import time
from collections import deque

import torch
from transformers import Trainer

from .callbacks import SaddleEscapeCallback, attach_callbacks, default_callbacks, report_step_loss
from .config import DistillationConfig
from .optim import build_muon_optimizer
from .teachers import build_teacher_source

_LOGGED = ("ce", "kd", "diversity")


def _student_vocab_size(model) -> int:
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no output embeddings (lm_head); the student must be a causal LM with "
            "get_output_embeddings(), such as hf_retnet.RetNetForCausalLM"
        )
    return int(head.weight.shape[0])


def check_teacher_student(teacher_vocab: int, student_vocab: int, k: int) -> None:
    """Clear errors for what would otherwise fail deep inside the loss (or silently compare the wrong tokens)."""
    if teacher_vocab != student_vocab:
        raise ValueError(
            f"teacher vocabulary ({teacher_vocab} tokens) and student vocabulary ({student_vocab}) differ; "
            "distillation compares next-token distributions id by id, so both must use the teacher's tokenizer: "
            f"build the student with vocab_size={teacher_vocab} (config key student_overrides) or pick a teacher "
            "with the student's tokenizer"
        )
    if not 1 <= k <= teacher_vocab:
        raise ValueError(f"config key 'teacher_topk': {k} must be in [1, vocabulary size {teacher_vocab}]")


class DistillationTrainer(Trainer):
    """Trainer for a causal-LM student against a `TeacherSource`.

    Args:
        model: the student (e.g. `hf_retnet.RetNetForCausalLM`); must expose `get_output_embeddings()`.
        args: a `DistillationConfig`.
        teacher: any `TeacherSource`; built from `args` with `build_teacher_source` when None.
        Other keyword arguments go to `transformers.Trainer` (train_dataset, data_collator, callbacks, ...).
    """

    # compute_loss divides token sums by the step's global token count itself.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args: DistillationConfig | None = None, teacher=None, callbacks=None, **kwargs):
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a DistillationConfig, got {type(args).__name__}")
        if model is None:
            raise ValueError("DistillationTrainer needs the student model (model=...)")
        student_vocab = _student_vocab_size(model)
        if teacher is None:
            check_teacher_student(student_vocab, student_vocab, args.teacher_topk)  # k before a big teacher loads
            teacher = build_teacher_source(args, device=args.device)
        if not hasattr(teacher, "topk") or not hasattr(teacher, "vocab_size"):
            raise TypeError(f"teacher {type(teacher).__name__} is not a TeacherSource (needs topk() and vocab_size)")
        check_teacher_student(int(teacher.vocab_size), student_vocab, args.teacher_topk)
        if getattr(teacher, "drops_entries", False) and (args.kd_loss != "forward_kl" or args.reverse_kl_warmup_steps):
            raise ValueError(
                f"config key 'kd_loss': {args.kd_loss} (or a reverse-KL warm-up) from a cache whose encoding "
                f"{teacher.encoding.name!r} dropped top-k entries below a mass threshold is not exact (measured "
                "7-14% loss error); use kd_loss: forward_kl, or rebuild the cache with --encoding naive or "
                "--encoding compact:mass=1.0"
            )
        if args.full_vocab_kd and not getattr(teacher, "return_full_logits", False):
            raise ValueError("config key 'full_vocab_kd': the teacher source does not return full logits")
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        # Placed before the reporters so that what they add to the logs reaches wandb / tensorboard.
        ours = default_callbacks() if args.default_callbacks else []  # NaN guard, memory, throughput
        if args.saddle_escape:
            ours.append(SaddleEscapeCallback(args.saddle_escape_config))
        attach_callbacks(self, *ours)
        self.teacher = teacher
        self._can_prefetch = callable(getattr(teacher, "prefetch", None))
        self._upcoming: deque = deque()  # (batch, optimizer step it belongs to), in the order compute_loss sees them
        self._lookahead = None  # (epoch_iterator, next batch) pulled one batch ahead for prefetch
        self._window = {"train": torch.zeros(6, dtype=torch.float64), "eval": torch.zeros(4, dtype=torch.float64)}
        self._window_start_step = 0
        self._keep_last_logit = None

    # ---- batches: exact token counts and one-batch-ahead prefetch ----

    @staticmethod
    def trained_positions(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, T] -> [B, T-1] bool: position t is trained when token t+1 has a label and both tokens are real."""
        keep = labels[:, 1:] != -100
        if attention_mask is not None:
            keep = keep & attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        return keep

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches and their trained-token count, summed over processes (so that each process's
        loss = its token sum / global count, and averaging gradients over processes gives the exact token mean)."""
        batches = []
        continued = self._lookahead is not None and self._lookahead[0] is epoch_iterator
        if continued:
            batches.append(self._lookahead[1])  # its prefetch went out during the previous step
        self._lookahead = None
        while len(batches) < num_batches:
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if self._can_prefetch and batches:
            step = self.state.global_step
            if not continued:  # a fresh iterator: nothing is in flight for the first batch yet
                self._prefetch(batches[0], step)
            self._upcoming = deque((b, step) for b in batches[1:])
            try:
                ahead = next(epoch_iterator)
                self._lookahead = (epoch_iterator, ahead)
                self._upcoming.append((ahead, step + 1))
            except StopIteration:
                pass

        count = None
        if batches and "labels" in batches[0]:
            count = sum(
                self.trained_positions(b["labels"], b.get("attention_mask")).sum() for b in batches
            ).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count.reshape(1)).sum()
        return batches, count

    def _prefetch(self, batch, step: int) -> None:
        self.teacher.prefetch(
            batch["input_ids"], batch.get("attention_mask"), self.args.teacher_topk, self.args.temperature_at(step)
        )

    # ---- loss ----

    def _student_hidden(self, model, input_ids, attention_mask) -> torch.Tensor:
        """[B, T, H] final hidden states, taken from the base model while calling the (possibly DDP-wrapped) full
        model, so distributed wrappers see a normal forward; the LM head runs on one position only."""
        inner = self.accelerator.unwrap_model(model)
        base = inner.base_model
        if self._keep_last_logit is None:
            self._keep_last_logit = "logits_to_keep" in inspect.signature(inner.forward).parameters
        captured = []

        def grab(module, args, output):
            captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

        handle = base.register_forward_hook(grab)
        try:
            extra = {"logits_to_keep": 1} if self._keep_last_logit else {}
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        finally:
            handle.remove()
        return captured[-1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from .losses import distillation_loss

        if "labels" not in inputs:
            raise ValueError("distillation batches need 'labels' (-100 where no loss is taken); use PaddingCollator")
        args = self.args
        input_ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
        batch_size, seq_len = input_ids.shape
        training = model.training
        step = self.state.global_step
        alpha, temperature, kind = args.alpha_at(step), args.temperature_at(step), args.kd_loss_at(step)

        start = time.perf_counter()
        teacher = self.teacher.topk(input_ids, mask, args.teacher_topk, temperature)  # [B, T, k]
        waited = time.perf_counter() - start
        teacher.validate(batch_size, seq_len, args.teacher_topk)
        if training and self._can_prefetch and self._upcoming:
            self._prefetch(*self._upcoming.popleft())  # the teacher works on the next batch while the student runs

        hidden = self._student_hidden(model, input_ids, mask)  # [B, T, H]
        keep = self.trained_positions(labels, mask)  # [B, T-1]; row t predicts token t+1
        full = None
        if args.full_vocab_kd and teacher.full_logits is not None:
            full = teacher.full_logits[:, :-1][keep]  # [N, V]
        out = distillation_loss(
            hidden[:, :-1][keep],  # [N, H]
            self.accelerator.unwrap_model(model).get_output_embeddings(),
            labels[:, 1:][keep],  # [N]
            teacher.token_ids[:, :-1][keep].to(hidden.device),  # [N, k]
            teacher.logprobs[:, :-1][keep].to(hidden.device),  # [N, k]
            full,
            alpha=alpha,
            temperature=temperature,
            kind=kind,
            jsd_beta=args.jsd_beta,
            diversity_weight=args.diversity_weight,
            chunk_size=args.loss_chunk_size,
            num_items=num_items_in_batch if training else None,
        )
        loss = out.loss
        if training:
            metrics = [out.ce, out.kd, out.diversity, teacher.seconds, waited, 1.0]
            self._window["train"] += torch.tensor([float(m) for m in metrics], dtype=torch.float64)
            if args.average_tokens_across_devices and args.world_size > 1 and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; undo it for the global mean
            report_step_loss(self, loss.detach())  # the NaN guard watches the loss the model forward never saw
        else:
            self._window["eval"] += torch.tensor([float(out.ce), float(out.kd), float(out.diversity), 1.0],
                                                 dtype=torch.float64)
        if return_outputs:
            return loss, {"loss": loss}
        return loss

    # ---- logging ----

    def _gathered(self, key: str) -> torch.Tensor:
        window = self._window[key]
        self._window[key] = torch.zeros_like(window)
        if self.args.world_size > 1:
            window = self.accelerator.gather(window.to(self.args.device).reshape(1, -1)).sum(0).cpu()
        return window

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add loss/ce, loss/kd, loss/diversity, alpha, temperature and teacher seconds, averaged over the logging
        window (token means, as the Trainer's `loss`), to training logs; eval_ce / eval_kd to evaluation logs."""
        if "loss" in logs and self._window["train"][5] > 0:
            ce, kd, div, seconds, waited, batches = self._gathered("train").tolist()
            steps = max(1, self.state.global_step - self._window_start_step)
            per_step = steps * (1 if self.args.average_tokens_across_devices else self.args.world_size)
            logs["loss/ce"] = ce / per_step
            logs["loss/kd"] = kd / per_step
            logs["loss/diversity"] = div / per_step
            logs["teacher_seconds"] = seconds / batches
            logs["teacher_wait_seconds"] = waited / batches
            self._window_start_step = self.state.global_step
        if "loss" in logs:  # the values the window's last optimizer step trained with
            last = max(0, self.state.global_step - 1)
            logs["alpha"] = self.args.alpha_at(last)
            logs["temperature"] = self.args.temperature_at(last)
        prefix = next((k[: -len("_loss")] for k in logs if k.endswith("_loss") and k != "train_loss"), None)
        if prefix is not None and self._window["eval"][3] > 0:
            ce, kd, div, batches = self._gathered("eval").tolist()
            logs[f"{prefix}_ce"], logs[f"{prefix}_kd"], logs[f"{prefix}_diversity"] = (
                ce / batches, kd / batches, div / batches
            )
        super().log(logs, start_time)

    # ---- optimizer ----

    def create_optimizer(self, model=None):
        if not self.args.use_muon:
            return super().create_optimizer(model)
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            self.optimizer = build_muon_optimizer(
                opt_model,
                muon_lr=self.args.muon_learning_rate,
                adamw_lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                momentum=self.args.muon_momentum,
                adjust_lr_fn=self.args.muon_adjust_lr_fn,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
                decay_parameter_names=set(self.get_decay_parameter_names(opt_model)),
            )
        return self.optimizer

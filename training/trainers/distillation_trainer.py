"""`DistillationTrainer`: a `transformers.Trainer` whose loss is alpha * CE + (1 - alpha) * KD against a teacher.

Only a few hooks are overridden: `compute_loss` (student hidden states -> `training.trainers.losses.distillation_loss`),
`get_batch_samples` (exact token counts for gradient accumulation / multi-process, and one-batch-ahead teacher
prefetch), `training_step` (no optimizer update for a step without a trained token), `create_optimizer`
(optim=muon) and `log` (adds the distillation metrics to the Trainer's own logs).

Metrics are sums kept in small fp64 windows and turned into means only when logged: training terms are averaged
over the optimizer steps the window saw (counted, not inferred from global_step, so a resumed run logs the same
values as an uninterrupted one), evaluation terms are token means over the whole evaluation set.
"""

from __future__ import annotations

import inspect
import math
import time
from collections import deque

import torch
from transformers import Trainer

from training.data.shards import document_starts
from training.trainers.callbacks import SaddleEscapeCallback, attach_callbacks, default_callbacks, report_step_loss
from training.trainers.distillation_config import DistillationConfig
from training.trainers.optim import build_muon_optimizer
from training.teachers import TeacherSource, build_teacher_source

# Window slots. train: sums over the micro-batches since the last log; eval: token sums over one evaluation.
_TRAIN = ("ce", "kd", "diversity", "teacher_seconds", "teacher_wait", "teacher_batches", "steps", "empty_batches")
_EVAL = ("ce", "kd", "diversity", "kl", "top1", "tokens")


def causal_lm_of(model):
    """The causal LM inside `model`: a peft `PeftModel` wraps it (`get_base_model()`, with the adapter layers
    injected in place), anything else is returned as it is."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _student_vocab_size(model) -> int:
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "lora_A"):
        raise ValueError(
            "the student's lm_head carries a LoRA adapter; the distillation loss multiplies hidden states by the "
            "lm_head weight directly and would ignore it. Leave lm_head out of LoraConfig.target_modules "
            "(hf_retnet.LORA_TARGET_MODULES does)"
        )
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
        if not isinstance(teacher, TeacherSource):
            raise TypeError(
                f"teacher {type(teacher).__name__} is not a TeacherSource: subclass training.teachers.TeacherSource "
                "and give it vocab_size and topk(input_ids, attention_mask, k, temperature=1.0, position_ids=None)"
            )
        check_teacher_student(int(teacher.vocab_size), student_vocab, args.teacher_topk)
        if teacher.drops_entries and (args.kd_loss != "forward_kl" or args.reverse_kl_warmup_steps):
            encoding = f" {teacher.encoding.name!r}" if teacher.encoding is not None else ""
            raise ValueError(
                f"config key 'kd_loss': {args.kd_loss} (or a reverse-KL warm-up) from a cache whose encoding"
                f"{encoding} dropped top-k entries below a mass threshold is not exact (measured "
                "7-14% loss error); use kd_loss: forward_kl, or rebuild the cache with --encoding naive or "
                "--encoding compact:mass=1.0"
            )
        if args.full_vocab_kd and not teacher.return_full_logits:
            raise ValueError("config key 'full_vocab_kd': the teacher source does not return full logits")
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        # Placed before the reporters so that what they add to the logs reaches wandb / tensorboard.
        ours = default_callbacks() if args.default_callbacks else []  # NaN guard, memory, throughput
        if args.saddle_escape:
            ours.append(SaddleEscapeCallback(args.saddle_escape_config))
        attach_callbacks(self, *ours)
        self.teacher = teacher
        self._can_prefetch = teacher.can_prefetch  # only then are batches pulled one step ahead
        self._upcoming: deque = deque()  # (batch, optimizer step it belongs to), in the order compute_loss sees them
        self._lookahead = None  # (epoch_iterator, next batch) pulled one batch ahead for prefetch
        self._window = {"train": torch.zeros(len(_TRAIN), dtype=torch.float64),
                        "eval": torch.zeros(len(_EVAL), dtype=torch.float64)}
        self._counted_step = None  # the optimizer step whose first micro-batch the train window has counted
        self._step_has_tokens = True  # False when the whole step (all micro-batches, all processes) has no token
        self.skipped_empty_batches = 0  # micro-batches without a trained token (this process), whole run
        self.skipped_empty_steps = 0  # optimizer steps without a trained token anywhere: no update applied
        self._skip_counts_restored = False
        self._keep_last_logit = None
        self._eval_prefix = None  # metric_key_prefix of the evaluation running now

    # ---- batches: exact token counts and one-batch-ahead prefetch ----

    @staticmethod
    def trained_positions(labels: torch.Tensor, attention_mask: torch.Tensor | None,
                          position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] -> [B, T-1] bool: position t is trained when token t+1 has a label and both tokens are real, and
        (packed rows, `position_ids`) token t+1 does not start a document: nothing before it is its context."""
        keep = labels[:, 1:] != -100
        if attention_mask is not None:
            keep = keep & attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        if position_ids is not None:
            keep = keep & ~document_starts(position_ids, attention_mask)[:, 1:]
        return keep

    @classmethod
    def _trained(cls, batch) -> torch.Tensor:
        return cls.trained_positions(batch["labels"], batch.get("attention_mask"), batch.get("position_ids"))

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
            count = sum(self._trained(b).sum() for b in batches).to(device)
            total = count
            if self.args.world_size > 1:
                total = self.accelerator.gather(count.reshape(1)).sum()
            if self.args.average_tokens_across_devices:
                count = total
            self._step_has_tokens = bool(total > 0)
            if not self._step_has_tokens:
                self.skipped_empty_steps += 1
        return batches, count

    def _prefetch(self, batch, step: int) -> None:
        if "labels" in batch and not self._trained(batch).any():
            return  # compute_loss never asks the teacher about a batch without a trained token
        extra = self._teacher_positions(self.teacher.prefetch, batch.get("position_ids"))
        self.teacher.prefetch(
            batch["input_ids"], batch.get("attention_mask"), self.args.teacher_topk, self.args.temperature_at(step),
            **extra,
        )

    @staticmethod
    def _teacher_positions(method, position_ids) -> dict:
        """{"position_ids": ...} for a packed batch (none for an unpacked one, so any TeacherSource serves it);
        a source whose `topk` / `prefetch` cannot take them would let documents see each other: refused."""
        if position_ids is None:
            return {}
        if "position_ids" not in inspect.signature(method).parameters:
            owner = type(getattr(method, "__self__", method)).__name__
            raise TypeError(
                f"the teacher source {owner}.{method.__name__}() takes no position_ids, so it cannot read the "
                "documents of a packed batch apart; give it a `position_ids=None` keyword (see TeacherSource.topk) "
                "or train on unpacked shards"
            )
        return {"position_ids": position_ids}

    # ---- loss ----

    def _student_hidden(self, model, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """[B, T, H] final hidden states, taken from the backbone while calling the (possibly DDP- or
        peft-wrapped) full model, so wrappers see a normal forward; the LM head runs on one position only.
        `position_ids` (packed rows) restart the student's state and positions at each document."""
        causal_lm = causal_lm_of(self.accelerator.unwrap_model(model))
        base = causal_lm.base_model  # the backbone (RetNetModel); a peft wrapper's base_model is its LoRA tuner
        if self._keep_last_logit is None:
            self._keep_last_logit = "logits_to_keep" in inspect.signature(causal_lm.forward).parameters
        captured = []

        def grab(module, args, output):
            captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

        handle = base.register_forward_hook(grab)
        try:
            extra = {"logits_to_keep": 1} if self._keep_last_logit else {}
            if position_ids is not None:
                extra["position_ids"] = position_ids
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(
                f"the student's backbone {type(base).__name__} was not called during the forward of "
                f"{type(model).__name__}; DistillationTrainer reads the final hidden states from "
                "`<causal LM>.base_model`, so the model must run its backbone through __call__"
            )
        return captured[-1]

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step; when the whole optimizer step has no trained token (every micro-batch on every
        process), its zero gradients are dropped, so the optimizer leaves weights and moments untouched (torch
        optimizers skip parameters without a gradient: no update, no weight decay). The scheduler still advances."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self._step_has_tokens:
            for param in model.parameters():
                param.grad = None
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from training.trainers.losses import distillation_loss

        if "labels" not in inputs:
            raise ValueError("distillation batches need 'labels' (-100 where no loss is taken); use PaddingCollator")
        args = self.args
        input_ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
        position_ids = inputs.get("position_ids")  # packed rows: documents restart where these do
        batch_size, seq_len = input_ids.shape
        training = model.training
        step = self.state.global_step
        alpha, temperature, kind = args.alpha_at(step), args.temperature_at(step), args.kd_loss_at(step)
        keep = self.trained_positions(labels, mask, position_ids)  # [B, T-1]; row t predicts token t+1
        lm_head = self.accelerator.unwrap_model(model).get_output_embeddings()
        if training and self._counted_step != step:  # the first micro-batch of this optimizer step
            self._counted_step = step
            if self._step_has_tokens:
                self._add("train", steps=1.0)

        if not bool(keep.any()):  # nothing to learn here: zero loss, teacher not asked
            if training:
                self.skipped_empty_batches += 1
                self._add("train", empty_batches=1.0)
                if self._can_prefetch and self._upcoming:
                    self._prefetch(*self._upcoming.popleft())
            hidden = self._student_hidden(model, input_ids, mask, position_ids)  # [B, T, H]
            # The student still runs forward and backward (zero gradients reach every parameter, as distributed
            # wrappers expect); no rows, CE only, so nothing is divided by a zero token count.
            out = distillation_loss(hidden[:, :0].reshape(0, hidden.shape[-1]), lm_head,
                                    labels.new_zeros(0), None, None, alpha=1.0, temperature=1.0,
                                    kind="forward_kl", num_items=1)
            return (out.loss, {"loss": out.loss}) if return_outputs else out.loss

        start = time.perf_counter()
        extra = self._teacher_positions(self.teacher.topk, position_ids)
        teacher = self.teacher.topk(input_ids, mask, args.teacher_topk, temperature, **extra)  # [B, T, k]
        waited = time.perf_counter() - start
        teacher.validate(batch_size, seq_len, args.teacher_topk)
        if training and self._can_prefetch and self._upcoming:
            self._prefetch(*self._upcoming.popleft())  # the teacher works on the next batch while the student runs

        hidden = self._student_hidden(model, input_ids, mask, position_ids)  # [B, T, H]
        full = None
        if args.full_vocab_kd and teacher.full_logits is not None:
            full = teacher.full_logits[:, :-1][keep]  # [N, V]
        rows = hidden[:, :-1][keep]  # [N, H]
        target = labels[:, 1:][keep]  # [N]
        top_ids = teacher.token_ids[:, :-1][keep].to(hidden.device)  # [N, k]
        top_logprobs = teacher.logprobs[:, :-1][keep].to(hidden.device)  # [N, k]
        out = distillation_loss(
            rows, lm_head, target, top_ids, top_logprobs, full,
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
            self._add("train", ce=out.ce, kd=out.kd, diversity=out.diversity, teacher_seconds=teacher.seconds,
                      teacher_wait=waited, teacher_batches=1.0)
            if args.average_tokens_across_devices and args.world_size > 1 and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; undo it for the global mean
            report_step_loss(self, loss.detach())  # the NaN guard watches the loss the model forward never saw
        else:
            self._add_eval_metrics(out, rows, lm_head, target, top_ids, top_logprobs, full, temperature, kind)
        if return_outputs:
            return loss, {"loss": loss}
        return loss

    @torch.no_grad()
    def _add_eval_metrics(self, out, rows, lm_head, target, top_ids, top_logprobs, full, temperature, kind):
        """Token sums of CE, KD, diversity, KL(teacher || student) and top-1 agreement for this eval batch.

        KL is the forward KL on the buckets the loss uses (the teacher's top-k + tail, or the full vocabulary
        in full-vocab mode) at the run's temperature, without the T^2 factor of the KD term; top-1 agreement
        compares the student's argmax over its whole vocabulary with the teacher's most likely token."""
        from training.trainers.losses import distillation_loss

        n = float(target.shape[0])
        if kind == "forward_kl":
            kl = out.kd / temperature**2
        else:
            kl = distillation_loss(rows, lm_head, target, top_ids, top_logprobs, full, alpha=0.0,
                                   temperature=temperature, kind="forward_kl",
                                   chunk_size=self.args.loss_chunk_size).kd / temperature**2
        if full is not None:
            teacher_top1 = full.argmax(-1)
        else:
            teacher_top1 = top_ids.gather(1, top_logprobs.argmax(-1, keepdim=True)).squeeze(1)
        chunk = self.args.loss_chunk_size
        student_top1 = torch.cat([lm_head(rows[i:i + chunk]).argmax(-1) for i in range(0, rows.shape[0], chunk)])
        agree = (student_top1 == teacher_top1.to(student_top1.device)).sum()
        self._add("eval", ce=out.ce * n, kd=out.kd * n, diversity=out.diversity * n, kl=kl * n, top1=agree,
                  tokens=n)

    def _add(self, key: str, **values) -> None:
        names = _TRAIN if key == "train" else _EVAL
        window = self._window[key]
        for name, value in values.items():
            window[names.index(name)] += float(value)

    # ---- logging ----

    def _gathered(self, key: str) -> dict[str, float]:
        window = self._window[key]
        self._window[key] = torch.zeros_like(window)
        if self.args.world_size > 1:
            window = self.accelerator.gather(window.to(self.args.device).reshape(1, -1)).sum(0).cpu()
        return dict(zip(_TRAIN if key == "train" else _EVAL, window.tolist()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs get loss/ce, loss/kd, loss/diversity (means over the window's optimizer steps that had a
        trained token, each step a token mean as the Trainer's `loss`), alpha, temperature, teacher seconds and
        the run's counts of skipped empty micro-batches / steps. Evaluation logs get token means over the whole
        evaluation set: <prefix>_loss (replacing the Trainer's mean of batch means, so that it equals
        alpha * ce + (1 - alpha) * kd + diversity_weight * diversity), _ce, _kd, _diversity, _ppl = exp(ce),
        _kl = KL(teacher || student) and _top1 = the fraction of tokens whose student argmax is the teacher's
        top-1."""
        if "loss" in logs:
            w = self._gathered("train")
            if w["steps"] > 0:
                # Each process adds its own token mean per step; with average_tokens_across_devices each adds its
                # share of the global mean, so the processes' sum is one mean per step.
                steps = w["steps"] / self.args.world_size if self.args.average_tokens_across_devices else w["steps"]
                logs["loss/ce"] = w["ce"] / steps
                logs["loss/kd"] = w["kd"] / steps
                logs["loss/diversity"] = w["diversity"] / steps
            if w["teacher_batches"] > 0:
                logs["teacher_seconds"] = w["teacher_seconds"] / w["teacher_batches"]
                logs["teacher_wait_seconds"] = w["teacher_wait"] / w["teacher_batches"]
            if not self._skip_counts_restored:  # a resumed run continues the counts of its checkpoint's logs
                self._skip_counts_restored = True
                earlier = [h for h in self.state.log_history if "skipped_empty_batches" in h]
                if earlier:
                    self.skipped_empty_batches += int(earlier[-1]["skipped_empty_batches"])
                    self.skipped_empty_steps += int(earlier[-1].get("skipped_empty_steps", 0))
            logs["skipped_empty_batches"] = float(self.skipped_empty_batches)
            logs["skipped_empty_steps"] = float(self.skipped_empty_steps)
            # the values the window's last optimizer step trained with
            last = max(0, self.state.global_step - 1)
            logs["alpha"] = self.args.alpha_at(last)
            logs["temperature"] = self.args.temperature_at(last)
        prefix = next((k[: -len("_loss")] for k in logs if k.endswith("_loss") and k != "train_loss"), None)
        if self.args.world_size > 1:
            # Every process logs its evaluation's metrics, so every process gathers, also one whose share of the
            # evaluation set had no trained token (one that skipped the gather would leave the others waiting).
            collect = prefix is not None and prefix == self._eval_prefix
        else:
            collect = prefix is not None and self._window["eval"][-1] > 0
        w = self._gathered("eval") if collect else {"tokens": 0.0}
        if w["tokens"] > 0:
            n = w["tokens"]
            ce, kd, div = w["ce"] / n, w["kd"] / n, w["diversity"] / n
            alpha = self.args.alpha_at(self.state.global_step)  # what compute_loss used for this evaluation
            logs[f"{prefix}_loss"] = alpha * ce + (1.0 - alpha) * kd + self.args.diversity_weight * div
            logs[f"{prefix}_ce"], logs[f"{prefix}_kd"], logs[f"{prefix}_diversity"] = ce, kd, div
            logs[f"{prefix}_ppl"] = math.exp(ce) if ce < 700 else float("inf")
            logs[f"{prefix}_kl"] = w["kl"] / n
            logs[f"{prefix}_top1"] = w["top1"] / n
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The Trainer's evaluation; `log` knows its metrics by their prefix (see there)."""
        outer, self._eval_prefix = self._eval_prefix, metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._eval_prefix = outer

    # ---- data ----

    def _get_train_sampler(self, train_dataset=None):
        """`train_sampling_strategy: group_by_length` with the lengths a shard dataset already holds (the base
        class would read every item to measure them). train.py keeps such a dataset in one order for this."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths.tolist())
        return super()._get_train_sampler(train_dataset)

    # ---- optimizer ----

    def create_optimizer(self, model=None):
        if not self.args.use_muon:  # transformers 5.2 calls create_optimizer() without the model
            return super().create_optimizer() if model is None else super().create_optimizer(model)
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

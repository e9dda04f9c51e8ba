"""What a training step reports besides its loss: memory, throughput, and the plumbing our callbacks share.

Callbacks see the Trainer only through `(args, state, control, model, optimizer, ...)`: they are not handed the
step's loss, batch or gradient norm. `StepTap` reads those from the model with forward hooks (or from explicit
reports by a Trainer subclass), so the callbacks here work with any `transformers.Trainer`.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

logger = logging.getLogger(__name__)

GIB = float(1 << 30)
# Log entries that are not training-step logs (evaluation, prediction, the end-of-train summary).
_NOT_TRAIN_PREFIXES = ("eval_", "test_", "predict_")


def is_train_log(logs: dict) -> bool:
    """True for the periodic training logs (not eval/predict metrics, not the end-of-train summary, which is the
    log with `total_flos`; periodic logs may carry `train_runtime` too, with include_num_input_tokens_seen)."""
    return not any(k.startswith(_NOT_TRAIN_PREFIXES) for k in logs) and "total_flos" not in logs


def add_to_log(state, logs: dict, metrics: dict) -> None:
    """Add `metrics` to the log being dispatched: reporters after us (WandB, TensorBoard) see `logs`, and
    `trainer_state.json` holds `state.log_history`, which the Trainer copied before calling `on_log`."""
    logs.update(metrics)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(metrics)


class StepTap:
    """Per-optimizer-step training signals read off the model: the loss and the number of tokens.

    Loss: a forward hook takes `output.loss` of every training-mode forward of the model. With gradient
    accumulation the step loss is the sum of the micro-batch losses when the Trainer passed `num_items_in_batch`
    (each is already that micro-batch's share), else their mean. A Trainer that computes its loss outside the
    model (e.g. a distillation loss on hidden states) calls `report_loss(loss)` with the value it backpropagates
    (its share of the step, as `Trainer.training_step` returns it); reports then take precedence over the hook.

    Tokens: the model's forward pre-hook counts `attention_mask.sum()` (or `input_ids.numel()`); when the model's
    own forward is not called (the trainer calls `model.model(...)`), the input-embedding pre-hook counts ids.
    """

    def __init__(self, loss: bool = True, tokens: bool = False):
        self.want_loss, self.want_tokens = loss, tokens
        self._handles: list = []
        self._model_id: int | None = None
        self.tokens_model = 0  # counted by the model pre-hook since the last take_tokens()
        self.tokens_embed = 0  # counted by the input-embedding pre-hook
        self._token_tensors: list[torch.Tensor] = []
        self._missing = 0  # steps without any loss
        self.begin_step()

    # ---- lifecycle ----
    def attach(self, model) -> None:
        if model is None or self._model_id == id(model):
            return
        self.detach()
        self._model_id = id(model)
        if self.want_loss:
            self._handles.append(model.register_forward_hook(self._on_forward, with_kwargs=True))
        if self.want_tokens:
            self._handles.append(model.register_forward_pre_hook(self._on_model_input, with_kwargs=True))
            embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            if embed is not None:
                self._handles.append(embed.register_forward_pre_hook(self._on_embed_input))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._model_id = [], None

    def begin_step(self) -> None:
        self._hook_losses: list[torch.Tensor] = []
        self._hook_sum = False
        self._reported: list[torch.Tensor] = []

    # ---- loss ----
    def report_loss(self, loss) -> None:
        self._reported.append(torch.as_tensor(loss).detach().float().reshape(()))

    def _on_forward(self, module, args, kwargs, output) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._hook_losses.append(loss.detach().float().reshape(()))
            self._hook_sum = self._hook_sum or kwargs.get("num_items_in_batch") is not None

    def step_loss(self, owner: str = "") -> float | None:
        """This step's loss (one device sync), or None when neither the model nor the trainer reported one
        (warned once, after a few steps, naming `owner`)."""
        values = self._reported or self._hook_losses
        if not values:
            self._missing += 1
            if self._missing == 3 and owner:
                logger.warning(
                    f"{owner} sees no training loss: the model's forward returns no `.loss` (no labels?) and the "
                    "trainer does not call training.trainers.callbacks.report_step_loss(trainer, loss); it cannot use the loss"
                )
            return None
        device = values[0].device
        stacked = torch.stack([v.to(device) for v in values])
        total = stacked.sum() if (self._reported or self._hook_sum) else stacked.mean()
        return float(total)

    # ---- tokens ----
    def _on_model_input(self, module, args, kwargs) -> None:
        if not module.training:
            return
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids", args[0] if args else None)
        if isinstance(mask, torch.Tensor):
            self._token_tensors.append(mask.detach().sum())
        elif isinstance(ids, torch.Tensor):
            self.tokens_model += ids.numel()

    def _on_embed_input(self, module, args) -> None:
        if module.training and args and isinstance(args[0], torch.Tensor):
            self.tokens_embed += args[0].numel()

    def take_tokens(self) -> int:
        """Tokens seen since the last call (model count when the model's forward ran, else embedding count)."""
        if self._token_tensors:
            self.tokens_model += int(sum(t.to("cpu") for t in self._token_tensors))
        count = self.tokens_model or self.tokens_embed
        self.tokens_model = self.tokens_embed = 0
        self._token_tensors = []
        return count


def grads_of(model) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def distributed_any(flag: bool, device) -> bool:
    """`flag` OR-ed over processes, so every process takes the same decision (skip, boost) for a step."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)
    return flag


def distributed_mean(value: float | None, device) -> float | None:
    """`value` averaged over processes (NaN if any process has none or a non-finite one), so that decisions taken
    from it (LR boosts) are identical on every process and the replicas stay in sync."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([math.nan if value is None else float(value)], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t.item()) / torch.distributed.get_world_size()


class SelfRestoringState(ExportableState):
    """`ExportableState` that also restores itself on resume.

    The Trainer saves `state()` into `trainer_state.json` at every checkpoint, but only restores it when
    `restore_callback_states_from_checkpoint=True` (off by default), and then as a new instance appended after the
    reporters. So in `on_train_begin` we reload our own entry from the resumed `state.stateful_callbacks` when it
    was written at the step we resume from. Subclasses define `_export()` / `_import(dict)` (JSON values only)."""

    _seen_step = 0

    def state(self) -> dict:
        return {"args": self._init_args(), "attributes": {"exported": {"step": self._seen_step, **self._export()}}}

    @property
    def exported(self) -> dict:
        return {"step": self._seen_step, **self._export()}

    @exported.setter
    def exported(self, value: dict) -> None:  # the Trainer's own restore path sets attributes by name
        value = dict(value)
        self._seen_step = int(value.pop("step", 0))
        self._import(value)

    def restore_from(self, state) -> bool:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        exported = (saved or {}).get("attributes", {}).get("exported")
        if not exported or state.global_step == 0 or exported.get("step") != state.global_step:
            return False
        self.exported = exported
        return True

    def _init_args(self) -> dict:
        return {}

    def _export(self) -> dict:
        return {}

    def _import(self, value: dict) -> None:
        pass


class StepLossCallback(TrainerCallback, SelfRestoringState):
    """Base of the callbacks that judge every optimizer step by its loss (NaN guard, saddle escape): wires a
    `StepTap` into the Trainer's hooks and restores the subclass's state on resume. Subclasses set `self._tap`."""

    _tap: StepTap

    def report_loss(self, loss) -> None:
        """For trainers that compute the loss outside the model's forward (see `StepTap.report_loss`)."""
        self._tap.report_loss(loss)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.restore_from(state)
        self._tap.attach(model)

    def on_step_begin(self, args, state, control, **kwargs):
        self._tap.begin_step()

    def on_train_end(self, args, state, control, **kwargs):
        self._tap.detach()


class MemoryCallback(TrainerCallback):
    """Logs `memory/peak_allocated_gib` and `memory/peak_reserved_gib` (CUDA, peak since the previous log, this
    process's device) and `memory/host_rss_gib` (always). Peaks are reset after each log so a spike is attributed
    to the logging interval where it happened."""

    def __init__(self):
        import psutil

        self._process = psutil.Process(os.getpid())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not is_train_log(logs):
            return
        metrics = {"memory/host_rss_gib": self._process.memory_info().rss / GIB}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            metrics["memory/peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
            metrics["memory/peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
            torch.cuda.reset_peak_memory_stats()
        add_to_log(state, logs, metrics)


class ThroughputCallback(TrainerCallback):
    """Logs, per logging interval: `throughput/tokens_per_second` (tokens over training time, where training
    time = step compute + data waiting, excluding evaluation and checkpoint saving), `throughput/data_seconds`
    (mean per step: from the end of the previous step's work -- its logging, saving, evaluation -- to the next
    `on_step_begin`, which is when the Trainer fetches the batches) and `throughput/step_seconds` (mean per step:
    forward, backward, optimizer).

    Tokens come from `state.num_input_tokens_seen` when the Trainer counts them (`include_num_input_tokens_seen`,
    all processes), else from the model's inputs (`StepTap`: this process, attention-mask tokens when the model's
    forward gets a mask)."""

    def __init__(self):
        self._tap = StepTap(loss=False, tokens=True)
        self._reset_interval()
        self._mark: float | None = None
        self._step_begin: float | None = None
        self._tokens_seen_at_log = 0

    def _reset_interval(self) -> None:
        self._data_s = self._step_s = 0.0
        self._steps = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._tap.attach(model)
        self._tap.take_tokens()
        self._reset_interval()
        self._tokens_seen_at_log = state.num_input_tokens_seen
        self._mark = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._mark is not None:
            self._data_s += now - self._mark
        self._step_begin = now

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._step_begin is not None:
            self._step_s += now - self._step_begin
            self._steps += 1
        self._mark = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and is_train_log(logs) and self._steps > 0:
            hooked = self._tap.take_tokens()
            counted = state.num_input_tokens_seen - self._tokens_seen_at_log
            tokens = counted if counted > 0 else hooked
            seconds = self._data_s + self._step_s
            add_to_log(state, logs, {
                "throughput/tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
                "throughput/data_seconds": self._data_s / self._steps,
                "throughput/step_seconds": self._step_s / self._steps,
            })
            self._reset_interval()
            self._tokens_seen_at_log = state.num_input_tokens_seen
        self._mark = time.perf_counter()  # time spent logging is not data time

    def on_save(self, args, state, control, **kwargs):
        self._mark = time.perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):
        self._mark = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self._tap.detach()


def _parse_alloc_conf(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"allocator setting {item!r} is not 'key:value' (in {text!r})")
        out[key.strip()] = value.strip()
    return out


def configure_cuda_allocator(expandable_segments: bool = True, **options) -> str:
    """Set the CUDA caching allocator's configuration through `PYTORCH_CUDA_ALLOC_CONF` (and torch >= 2.9's
    device-generic `PYTORCH_ALLOC_CONF`), keeping settings already there; returns the resulting string.

    `expandable_segments:True` lets the allocator grow segments instead of allocating new fixed blocks, which
    removes most fragmentation from changing sequence lengths. Torch reads the variable once, when CUDA
    initialises: call this first thing in the process. If CUDA is already initialised it warns and changes only
    the environment (for child processes). Extra options are passed as `key=value`
    (e.g. `max_split_size_mb=512`, `garbage_collection_threshold=0.8`)."""
    conf: dict[str, str] = {}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        conf.update(_parse_alloc_conf(os.environ.get(name, "")))
    conf["expandable_segments"] = "True" if expandable_segments else "False"
    for key, value in options.items():
        conf[key] = str(value)
    text = ",".join(f"{k}:{v}" for k, v in conf.items())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        warnings.warn(
            f"configure_cuda_allocator({text!r}): CUDA is already initialised in this process, so the allocator "
            "keeps its current settings; call configure_cuda_allocator() before anything touches CUDA (before "
            "building TrainingArguments or moving a model to the GPU), or export PYTORCH_CUDA_ALLOC_CONF in the shell",
            RuntimeWarning,
            stacklevel=2,
        )
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = text
    if hasattr(torch._C, "_accelerator_setAllocatorSettings"):  # torch >= 2.9 reads PYTORCH_ALLOC_CONF first
        os.environ["PYTORCH_ALLOC_CONF"] = text
    return text


def finite(value) -> bool:
    return value is not None and math.isfinite(value)

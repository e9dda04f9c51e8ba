"""Telemetry: memory and throughput in the logs, the CUDA allocator setting, and WandB / TensorBoard read back."""

from __future__ import annotations

import copy
import math
import os
import struct
import time

import numpy as np
import psutil
import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from training.trainers.callbacks import (
    MemoryCallback,
    NonFiniteGuardCallback,
    SaddleEscapeCallback,
    ThroughputCallback,
    attach_callbacks,
    configure_cuda_allocator,
)
from tests.tiny_models import build_tiny_llama

VOCAB, SEQ = 256, 16
SADDLE_FAST = dict(window=4, min_steps=4, min_relative_improvement=0.05, grad_norm_threshold=None, boost_steps=2,
                   judge_steps=2, cooldown_steps=2, boost_factor=3.0)


class Padded(torch.utils.data.Dataset):
    """Right-padded rows of random lengths; `delay` seconds of "loading" per item."""

    def __init__(self, n=64, delay=0.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.lengths = torch.randint(4, SEQ + 1, (n,), generator=g)
        self.delay = delay
        self.fetched: list[int] = []  # indices in the order the DataLoader asked for them

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        self.fetched.append(int(i))
        if self.delay:
            time.sleep(self.delay)
        mask = (torch.arange(SEQ) < self.lengths[i]).long()
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": self.ids[i].masked_fill(mask == 0, -100)}


def tiny_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-6,
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


# ---------------- throughput and memory ----------------

class HiddenStateTrainer(Trainer):
    """Computes the loss from `model.model(...)` + the LM head, as the DistillationTrainer does: the model's own
    forward never runs, so tokens are counted at the input embeddings."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hidden = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1])  # [B, T-1, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), inputs["labels"][:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("counting", ["attention_mask", "embeddings", "trainer"])
def test_throughput_counts_tokens_and_data_wait(tmp_path, counting):
    data = Padded(delay=0.01)
    cls = HiddenStateTrainer if counting == "embeddings" else Trainer
    extra = {"include_num_input_tokens_seen": "non_padding"} if counting == "trainer" else {}
    trainer = cls(model=build_tiny_llama(VOCAB, hidden_size=32, seed=0),
                  args=tiny_args(tmp_path, logging_steps=3, **extra), train_dataset=data,
                  callbacks=[ThroughputCallback()])
    trainer.train()

    rates, data_s, step_s = (history(trainer, f"throughput/{k}")
                             for k in ("tokens_per_second", "data_seconds", "step_seconds"))
    assert len(rates) == 2  # steps 3 and 6; not in the end-of-train summary
    # 4 items x 10 ms of loading per step, all of it before on_step_begin.
    assert min(data_s) >= 0.035 and min(step_s) > 0
    seen = [int(round(r * (d + s) * 3)) for r, d, s in zip(rates, data_s, step_s)]  # tokens per interval
    assert len(data.fetched) >= 24  # accelerate's loader reads one batch ahead
    mask_tokens = [int(data.lengths[data.fetched[k:k + 12]].sum()) for k in (0, 12)]  # 3 steps x 4 rows each
    if counting == "embeddings":
        assert seen == [3 * 4 * SEQ] * 2  # padded ids: no mask reaches the embedding layer
    else:
        assert seen == mask_tokens


class AllocateAfterFirstLog(TrainerCallback):
    """Touches a block of known size after the first log, and reads RSS itself right after each MemoryCallback
    log (it runs after it in the same on_log)."""

    BLOCK = 128 << 20

    def __init__(self):
        self.block, self.seen = None, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "memory/host_rss_gib" in logs:
            self.seen.append(psutil.Process().memory_info().rss / 2**30)
            if self.block is None:
                self.block = np.ones(self.BLOCK // 8)  # written, so every page is resident


def test_memory_logs_host_rss(tmp_path):
    probe = AllocateAfterFirstLog()
    trainer = Trainer(model=build_tiny_llama(VOCAB, hidden_size=32, seed=0), args=tiny_args(tmp_path, max_steps=2),
                      train_dataset=Padded(), callbacks=[MemoryCallback(), probe])
    trainer.train()
    rss = history(trainer, "memory/host_rss_gib")
    assert len(rss) == 2
    for logged, measured in zip(rss, probe.seen):  # the value of this moment, in GiB (not MiB, not bytes)
        assert logged == pytest.approx(measured, abs=8 / 1024)
    # the 128 MiB block shows up between the two logs, within 16 MiB of allocator noise
    assert rss[1] - rss[0] == pytest.approx(AllocateAfterFirstLog.BLOCK / 2**30, abs=16 / 1024)
    if not torch.cuda.is_available():
        assert not history(trainer, "memory/peak_allocated_gib")  # nothing to report, nothing made up


# ---------------- the CUDA allocator ----------------

def test_configure_cuda_allocator_merges_settings(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128,expandable_segments:False")
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    text = configure_cuda_allocator(garbage_collection_threshold=0.8)
    assert text == "max_split_size_mb:128,expandable_segments:True,garbage_collection_threshold:0.8"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == text
    assert os.environ.get("PYTORCH_ALLOC_CONF", text) == text  # torch >= 2.9 reads this one first
    off = configure_cuda_allocator(expandable_segments=False)
    assert off.startswith("max_split_size_mb:128,expandable_segments:False")


def test_configure_cuda_allocator_rejects_malformed_settings(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments")
    with pytest.raises(ValueError, match="'expandable_segments' is not 'key:value'"):
        configure_cuda_allocator()


def test_configure_cuda_allocator_warns_once_cuda_is_initialised(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    if not torch.cuda.is_available():  # no GPU here: stand in for "CUDA is up" (the branch under test)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    else:
        torch.zeros(1, device="cuda")
    with pytest.warns(RuntimeWarning, match="CUDA is already initialised"):
        configure_cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


# ---------------- WandB / TensorBoard via report_to ----------------

class KDStandInTrainer(Trainer):
    """Stand-in for the DistillationTrainer (the lead can swap in the real one): loss = 0.5 CE + 0.5 KL(teacher ||
    student) against a frozen copy of the initial model, logging `loss/ce` and `loss/kd` the way it does."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self._sums = {"loss/ce": 0.0, "loss/kd": 0.0}
        self._n = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        with torch.no_grad():
            teacher_logp = F.log_softmax(self.teacher(input_ids=inputs["input_ids"]).logits.float(), -1)
        student_logp = F.log_softmax(out.logits.float(), -1)
        kd = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean") / SEQ
        self._sums["loss/ce"] += float(out.loss.detach())
        self._sums["loss/kd"] += float(kd.detach())
        self._n += 1
        return 0.5 * out.loss + 0.5 * kd

    def log(self, logs, start_time=None):
        if "loss" in logs and self._n:
            logs.update({k: v / self._n for k, v in self._sums.items()})
            self._sums, self._n = dict.fromkeys(self._sums, 0.0), 0
        super().log(logs, start_time)


def read_wandb_history(run_file) -> list[dict]:
    """History rows of an offline `.wandb` file: a LevelDB-style log (32 KiB blocks of [crc32c u32, length u16,
    type u8] + data; FULL=1, FIRST=2, MIDDLE=3, LAST=4) after a 7-byte ':W&B' header, one protobuf `Record`
    per logical record."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's trailer: too short for a header
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def telemetry_trainer(tmp_path, report_to):
    callbacks = [SaddleEscapeCallback(SADDLE_FAST), NonFiniteGuardCallback(), MemoryCallback(), ThroughputCallback()]
    trainer = KDStandInTrainer(model=build_tiny_llama(VOCAB, hidden_size=32, seed=0),
                               args=tiny_args(tmp_path, max_steps=8, report_to=report_to),
                               train_dataset=Padded())
    attach_callbacks(trainer, *callbacks)
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    reporter = {"wandb": "WandbCallback", "tensorboard": "TensorBoardCallback"}[report_to[0]]
    assert names.index(reporter) > max(names.index(type(cb).__name__) for cb in callbacks)  # ours run first
    return trainer


EXPECTED = ["loss/kd", "loss/ce", "saddle/detected", "saddle/intervention", "saddle/factor", "saddle/escaped",
            "nonfinite/skipped_steps", "memory/host_rss_gib", "throughput/tokens_per_second",
            "throughput/data_seconds"]


def test_wandb_offline_run_history_holds_our_metrics(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "hf-retnet-tests")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = telemetry_trainer(tmp_path, ["wandb"])
    trainer.train()
    wandb.finish()
    wandb.teardown()  # flushes the offline transaction log

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = [r for r in read_wandb_history(run_file) if "train/loss" in r]
    assert len(rows) == 8
    for key in EXPECTED:  # the WandB integration prefixes training keys with "train/"
        assert all(f"train/{key}" in r for r in rows), key
    assert max(r["train/saddle/detected"] for r in rows) >= 1  # the plateau was detected and logged
    assert max(r["train/saddle/factor"] for r in rows) == 3.0
    # The same numbers the Trainer kept in its own log history.
    assert [r["train/loss/kd"] for r in rows] == pytest.approx(history(trainer, "loss/kd"))
    assert [r["train/saddle/detected"] for r in rows] == history(trainer, "saddle/detected")
    assert all(math.isfinite(r["train/loss/ce"]) for r in rows)


def test_tensorboard_gets_the_same_metrics(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer = telemetry_trainer(tmp_path, ["tensorboard"])
    trainer.train()
    for cb in trainer.callback_handler.callbacks:  # close the event file
        if getattr(cb, "tb_writer", None) is not None:
            cb.tb_writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"train/{k}" for k in EXPECTED} <= tags
    assert [e.value for e in acc.Scalars("train/saddle/factor")] == history(trainer, "saddle/factor")


def test_a_loss_watcher_that_sees_no_loss_says_so(tmp_path, caplog):
    """HiddenStateTrainer computes its loss outside the model and does not report it: the saddle callback cannot
    work, and says how to fix it instead of silently never firing."""
    saddle = SaddleEscapeCallback(SADDLE_FAST)
    trainer = HiddenStateTrainer(model=build_tiny_llama(VOCAB, hidden_size=32, seed=0),
                                 args=tiny_args(tmp_path, max_steps=4), train_dataset=Padded(), callbacks=[saddle])
    with caplog.at_level("WARNING", logger="training.trainers.callbacks.telemetry"):
        trainer.train()
    assert "SaddleEscapeCallback sees no training loss" in caplog.text and "report_step_loss" in caplog.text
    assert saddle.detector.detections == 0 and len(saddle.detector.losses) == 0

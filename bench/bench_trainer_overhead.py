"""Cost of the distillation machinery: a direct-mode DistillationTrainer step against the bare minimum any
distillation step pays (teacher forward + student CE step), timed side by side in one run.

Both runs are `transformers.Trainer` loops over the same batches, with the same student init, optimizer (AdamW)
and teacher:
  baseline  plain Trainer; compute_loss = teacher forward (no grad, logits discarded) + the student's own CE loss
  distill   DistillationTrainer, direct teacher, sparse top-k KD + CE (alpha 0.5), default telemetry callbacks
Step time = time between consecutive optimizer steps (data, forward, backward, optimizer, logging): wall time on
a GPU (synchronised), this process's CPU time on a CPU (one torch thread; other tenants of a shared machine do not
count). The first `--warmup` steps are dropped. Rounds alternate baseline / distill so machine noise hits both alike; the median per
run is reported. Goal (issue 4): distill / baseline <= 1.10.

    python bench/bench_trainer_overhead.py --quick     # tiny shapes, CPU, well under 2 minutes
    python bench/bench_trainer_overhead.py             # Llama-3.2-1B-shaped teacher layers at V = 128256 on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

SIZES = {
    # vocab, teacher (hidden, layers), student (hidden, layers, heads), seq, batch, k
    "quick": dict(vocab=4096, teacher=(384, 4), student=(256, 3, 4), seq=128, batch=4, k=64),
    "full": dict(vocab=128256, teacher=(2048, 16), student=(1280, 15, 10), seq=1024, batch=4, k=512),
}


class StepClock(TrainerCallback):
    """Time between consecutive optimizer steps: wall time (the GPU synchronised first) and this process's CPU
    time (on a shared CPU machine the CPU time is what the step costs; wall time also counts other tenants)."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def _now(self) -> tuple[float, float]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.wall, self.cpu, self._last = [], [], self._now()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        self.wall.append(now[0] - self._last[0])
        self.cpu.append(now[1] - self._last[1])
        self._last = now


class TeacherForwardCETrainer(Trainer):
    """The floor: the teacher's forward still runs every step, the student only trains on CE."""

    def __init__(self, teacher, **kwargs):
        super().__init__(**kwargs)
        self.teacher = teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.teacher.logits(inputs["input_ids"], inputs["attention_mask"])  # [B, T, V], discarded
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def build(size: dict, device: str, workdir: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_retnet import RetNetConfig
    from training.teachers import DirectTeacher

    hidden, layers = size["teacher"]
    heads = max(4, hidden // 64)  # Llama-3.2-1B: 2048 wide, 32 heads of 64, 8 KV heads, FFN 4x
    torch.manual_seed(1)
    teacher_model = LlamaForCausalLM(LlamaConfig(
        vocab_size=size["vocab"], hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4), intermediate_size=4 * hidden, tie_word_embeddings=True,
        max_position_embeddings=4096,
    ))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    teacher = DirectTeacher(teacher_model.to(dtype), device=device)
    s_hidden, s_layers, s_heads = size["student"]
    student_config = RetNetConfig(vocab_size=size["vocab"], hidden_size=s_hidden, num_hidden_layers=s_layers,
                                  num_heads=s_heads, intermediate_size=2 * s_hidden)
    g = torch.Generator().manual_seed(0)
    items = [{"input_ids": ids, "labels": ids.clone()}
             for ids in torch.randint(0, size["vocab"], (size["batch"] * 64, size["seq"]), generator=g)]
    teacher_dir = os.path.join(workdir, "teacher-id")  # a path only for the config's validation
    os.makedirs(teacher_dir, exist_ok=True)
    return teacher, student_config, items, teacher_dir


def one_run(kind: str, teacher, student_config, items, teacher_dir, size, steps, device, workdir):
    from hf_retnet import RetNetForCausalLM
    from training.trainers.distillation_config import DistillationConfig
    from training.data.shards import PaddingCollator
    from training.trainers.distillation_trainer import DistillationTrainer

    torch.manual_seed(0)
    student = RetNetForCausalLM(student_config)
    config = DistillationConfig(
        output_dir=os.path.join(workdir, kind), teacher_model=teacher_dir, student="350M",
        teacher_topk=size["k"], distill_alpha=0.5, per_device_train_batch_size=size["batch"], max_steps=steps,
        learning_rate=1e-4, optim="adamw_torch", logging_steps=max(1, steps // 4), save_strategy="no",
        report_to="none", use_cpu=device == "cpu", bf16=device == "cuda", dataloader_num_workers=0,
        disable_tqdm=True, seed=0, loss_chunk_size=1024,
    )
    clock = StepClock()
    common = dict(model=student, args=config, train_dataset=items, data_collator=PaddingCollator(0),
                  callbacks=[clock])
    if kind == "distill":
        trainer = DistillationTrainer(teacher=teacher, **common)
    else:
        trainer = TeacherForwardCETrainer(teacher=teacher, **common)
    trainer.train()
    return clock


def breakdown(teacher, student_config, items, size, device, repeats: int = 5) -> dict[str, float]:
    """Median seconds of the pieces, outside the Trainer: where the difference between the two runs comes from."""
    from hf_retnet import RetNetForCausalLM
    from training.data.shards import PaddingCollator
    from training.trainers.losses import distillation_loss

    torch.manual_seed(0)
    student = RetNetForCausalLM(student_config).to(device)
    batch = {k: v.to(device) for k, v in PaddingCollator(0)(items[: size["batch"]]).items()}
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    clock = time.perf_counter if device == "cuda" else time.process_time

    def timed(fn):
        out = []
        for _ in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            start = clock()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            out.append(clock() - start)
        return statistics.median(out[1:])

    def ce_step():
        student(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        student.zero_grad(set_to_none=True)

    teacher_out = teacher.topk(ids, mask, size["k"])

    def kd_step():
        hidden = student.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1].flatten(0, 1)
        out = distillation_loss(hidden, student.lm_head, labels[:, 1:].flatten(), teacher_out.token_ids[:, :-1]
                                .flatten(0, 1), teacher_out.logprobs[:, :-1].flatten(0, 1), None, alpha=0.5,
                                temperature=1.0, kind="forward_kl")
        out.loss.backward()
        student.zero_grad(set_to_none=True)

    return {
        "teacher logits": timed(lambda: teacher.logits(ids, mask)),
        "teacher top-k (logits + log_softmax + topk)": timed(lambda: teacher.topk(ids, mask, size["k"])),
        "student CE step (forward + CE + backward)": timed(ce_step),
        "student KD step (hidden + distillation_loss + backward)": timed(kd_step),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU, under ~2 minutes")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped from each run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating baseline/distill rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)

    size = SIZES["quick" if args.quick or args.device == "cpu" else "full"]
    steps = args.steps or (6 if args.quick else 30)
    if args.device == "cpu":
        torch.set_num_threads(1)  # one thread: CPU time is then the step's work, without spin-waiting
    clock_kind = "cpu" if args.device == "cpu" else "wall"
    times = {(kind, clock): [] for kind in ("baseline", "distill") for clock in ("wall", "cpu")}
    with tempfile.TemporaryDirectory() as workdir:
        teacher, student_config, items, teacher_dir = build(size, args.device, workdir)
        for _ in range(args.rounds):
            for kind in ("baseline", "distill"):
                clock = one_run(kind, teacher, student_config, items, teacher_dir, size, steps, args.device,
                                workdir)
                times[kind, "wall"].extend(clock.wall[args.warmup:])
                times[kind, "cpu"].extend(clock.cpu[args.warmup:])
    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"device={args.device} vocab={size['vocab']} seq={size['seq']} batch={size['batch']} k={size['k']} "
          f"teacher={size['teacher']} student={size['student']} steps/run={steps} rounds={args.rounds}")
    for kind, what in (("baseline", "teacher forward + student CE step"), ("distill", "DistillationTrainer, direct")):
        print(f"{kind:8s} ({what:34s}): median wall {med[kind, 'wall'] * 1e3:8.1f} ms/step, "
              f"cpu {med[kind, 'cpu'] * 1e3:8.1f} ms/step, over {len(times[kind, 'wall'])} steps")
    with tempfile.TemporaryDirectory() as workdir:
        teacher, student_config, items, _ = build(size, args.device, workdir)
        parts = breakdown(teacher, student_config, items, size, args.device)
    print(f"breakdown ({'wall' if args.device == 'cuda' else 'cpu'} time, median of 5, outside the Trainer):")
    for name, seconds in parts.items():
        print(f"  {name:56s} {seconds * 1e3:8.1f} ms")
    ratios = {clock: med["distill", clock] / med["baseline", clock] for clock in ("wall", "cpu")}
    print(f"ratio distill / baseline: wall {ratios['wall']:.3f}x, cpu {ratios['cpu']:.3f}x")
    print(f"ratio ({clock_kind} time) = {ratios[clock_kind]:.3f}x  (goal <= 1.10x)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"size": size, "device": args.device, "median_seconds": {f"{k}/{c}": v for (k, c), v in
                                                                               med.items()}, "ratios": ratios},
                      handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

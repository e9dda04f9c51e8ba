"""Teacher-initialised vs random-init RetNet students on a real teacher, at one token budget.

    # the demo teacher as a Llama folder (python -m training.convert_llama2c ... --output runs/teacher260K)
    python bench/bench_teacher_init.py prepare --teacher runs/teacher260K --text tinystories_4000.txt --work runs/ti
    python bench/bench_teacher_init.py run --work runs/ti --arm random_init     # the two arms can run side by side
    python bench/bench_teacher_init.py run --work runs/ti --arm teacher_init
    python bench/bench_teacher_init.py report --work runs/ti                    # table + teacher_init.png

Held-out text: the last 10% of the paragraphs, each BOS-prefixed and whole (never trained on). Training text: the
rest, packed into 256-token windows. Both arms distil with DistillationTrainer (Muon + AdamW, top-64 forward KL,
alpha 0.5, batch 16 x 256) for the same total budget; the teacher-initialised arm spends part of it on stage 1
(`training.align`), and its curve starts at those tokens. The held-out loss is measured token-weighted on every
held-out paragraph at the end, and on the first 100 paragraphs during training (the curve).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ = 16, 256
ARMS = ("random_init", "teacher_init")


def _paragraphs(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [p.strip() for p in handle.read().split("\n\n") if p.strip()]


def _write_text(path: str, paragraphs: list[str]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write("\n\n".join(paragraphs) + "\n")
    os.replace(path + ".tmp", path)


def prepare(args) -> None:
    """Split the text, give the teacher's tokenizer a pad token, pack the training text."""
    from transformers import AutoTokenizer

    os.makedirs(args.work, exist_ok=True)
    paragraphs = _paragraphs(args.text)
    cut = len(paragraphs) - len(paragraphs) // 10
    _write_text(os.path.join(args.work, "train.txt"), paragraphs[:cut])
    _write_text(os.path.join(args.work, "eval.txt"), paragraphs[cut:])
    _write_text(os.path.join(args.work, "eval_small.txt"), paragraphs[cut : cut + 100])
    teacher = os.path.join(args.work, "teacher")
    if not os.path.isdir(teacher):
        import shutil

        shutil.copytree(args.teacher, teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    if tokenizer.pad_token is None:  # padding positions are masked; any id will do
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(teacher)
    packed = os.path.join(args.work, "train_packed")
    if not os.path.isdir(packed):
        subprocess.run([sys.executable, "-m", "training.preprocess", "--input", os.path.join(args.work, "train.txt"),
                        "--output", packed, "--tokenizer", teacher, "--max_seq_length", str(SEQ), "--pack"],
                       check=True, cwd=ROOT)
    print(f"prepared {args.work}: {cut} training and {len(paragraphs) - cut} held-out paragraphs")


def distill_overrides(args, student: str, output_dir: str, steps: int) -> list[str]:
    w = args.work
    values = {
        "student": student, "teacher_source": "direct", "teacher_model": os.path.join(w, "teacher"),
        "teacher_dtype": "float32", "teacher_topk": 64, "distill_alpha": args.alpha, "kd_loss": "forward_kl",
        "train_data": os.path.join(w, "train_packed"), "eval_data": os.path.join(w, "eval_small.txt"),
        "max_seq_length": SEQ, "optim": "muon", "muon_learning_rate": args.muon_lr, "learning_rate": args.lr,
        "lr_scheduler_type": "cosine", "warmup_steps": max(1, steps // 20), "per_device_train_batch_size": BATCH,
        "per_device_eval_batch_size": 25, "max_steps": steps, "eval_strategy": "steps", "eval_steps": args.eval_steps,
        "use_cpu": "true", "dataloader_num_workers": 0, "output_dir": output_dir, "logging_steps": 10,
        "save_strategy": "no", "report_to": "none", "seed": 0, "eval_on_start": "true",
    }
    if student == "random":
        values["student"] = "350M"
        values["student_overrides"] = json.dumps(args.random_student)
    return [x for key, value in values.items() for x in (f"--{key}", str(value))]


@torch.no_grad()
def heldout_loss(model, tokenizer, paragraphs: list[str], batch: int = 25) -> float:
    """Token-weighted mean next-token loss over whole BOS-prefixed paragraphs."""
    model.eval()
    total, count = 0.0, 0
    encoded = [tokenizer(p)["input_ids"] for p in paragraphs]
    for start in range(0, len(encoded), batch):
        chunk = encoded[start : start + batch]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(chunk):
            ids[i, : len(e)], mask[i, : len(e)] = torch.tensor(e), 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        count += int((labels != -100).sum())
    return total / count


def heldout_curve_callback(paragraphs, tokenizer, points: list, offset_tokens: int):
    """At every evaluation, the held-out loss as defined above (BOS-prefixed whole paragraphs, no EOS), appended
    to `points` as {"tokens", "heldout"}; the Trainer's own eval_ce also scores an EOS the teacher never predicts."""
    from transformers import TrainerCallback

    class HeldoutCurve(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kwargs):
            was_training = model.training
            points.append({"tokens": offset_tokens + state.global_step * BATCH * SEQ,
                           "heldout": heldout_loss(model, tokenizer, paragraphs)})
            model.train(was_training)

    return HeldoutCurve()


def run_arm(args) -> None:
    from training.trainers.distillation_config import load_config
    from training.trainers.distillation import run

    w = args.work
    arm_dir = os.path.join(w, args.tag or args.arm)
    os.makedirs(arm_dir, exist_ok=True)
    budget = args.budget_tokens
    align_tokens = 0
    student = "random"
    if args.arm == "teacher_init" and args.aligned:  # reuse a stage-1 result; its tokens still count
        with open(os.path.join(args.aligned, "align_report.json"), encoding="utf-8") as handle:
            align_tokens, student = json.load(handle)["tokens"], args.aligned
    elif args.arm == "teacher_init":
        from training.trainers.alignment import AlignConfig
        from training.trainers.alignment import run as align

        aligned = os.path.join(arm_dir, "aligned")
        os.makedirs(aligned, exist_ok=True)
        report = align(AlignConfig(
            teacher=os.path.join(w, "teacher"), student_out=aligned, data=os.path.join(w, "train.txt"),
            eval_data=os.path.join(w, "eval_small.txt"), max_tokens=args.align_tokens, eval_sequences=32,
            eval_steps=20, save_steps=10**9,
        ))
        align_tokens, student = report["tokens"], aligned
    steps = max(1, (budget - align_tokens) // (BATCH * SEQ))
    config = load_config(None, distill_overrides(args, student, os.path.join(arm_dir, "distill"), steps))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(w, "teacher"))
    points: list[dict] = []
    small = _paragraphs(os.path.join(w, "eval_small.txt"))
    trainer = run(config, callbacks=[heldout_curve_callback(small, tokenizer, points, align_tokens)])
    evals = [h for h in trainer.state.log_history if "eval_ce" in h]
    curve = [{**p, "eval_ce": h["eval_ce"], "eval_kd": h.get("eval_kd")} for p, h in zip(points, evals)]
    final = heldout_loss(trainer.model, tokenizer, _paragraphs(os.path.join(w, "eval.txt")))
    result = {"arm": args.arm, "tag": args.tag or args.arm, "align_tokens": align_tokens, "distill_steps": steps, "alpha": args.alpha,
              "total_tokens": align_tokens + steps * BATCH * SEQ, "heldout_loss": final, "curve": curve}
    with open(os.path.join(arm_dir, "result.json.tmp"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    os.replace(os.path.join(arm_dir, "result.json.tmp"), os.path.join(arm_dir, "result.json"))
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))


ABLATIONS = {  # stage 1 only: what limits how close a retention layer gets to its attention layer
    "reference": {},
    "fixed_decays": {"train": ["q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "group_norm"]},
    "retnet_decays": {"decays": "retnet"},
    "no_gate": {"gate": "none"},
    "state_per_query_head": {"share_kv": False},
}


def ablate(args) -> None:
    """Stage 1 variants at one token budget: per-layer alignment error and the aligned student's held-out loss."""
    from transformers import AutoTokenizer

    from hf_retnet import RetNetForCausalLM
    from training.trainers.alignment import AlignConfig
    from training.trainers.alignment import run as align

    w = args.work
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(w, "teacher"))
    small = _paragraphs(os.path.join(w, "eval_small.txt"))
    results = {}
    for name in args.variants:
        out = os.path.join(w, "ablation", name)
        os.makedirs(out, exist_ok=True)
        report = align(AlignConfig(
            teacher=os.path.join(w, "teacher"), student_out=out, data=os.path.join(w, "train.txt"),
            eval_data=os.path.join(w, "eval_small.txt"), max_tokens=args.align_tokens, eval_sequences=32,
            eval_steps=10**9, save_steps=10**9, **ABLATIONS[name],
        ))
        student = RetNetForCausalLM.from_pretrained(out)
        results[name] = {"tokens": report["tokens"], "error_at_conversion": report["error_at_conversion"],
                         "error_after": report["error_after"], "heldout_loss_small": heldout_loss(student, tokenizer, small)}
        print(name, json.dumps(results[name]))
    path = os.path.join(w, "ablation", "results.json")
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    os.replace(path + ".tmp", path)
    print("| stage-1 variant | per-layer error after | mean | held-out loss, stage 1 only (100 paragraphs) |")
    print("| --- | --- | --- | --- |")
    for name, r in results.items():
        errs = r["error_after"]
        print(f"| {name} | {' '.join(f'{e:.3f}' for e in errs)} | {sum(errs) / len(errs):.3f} | "
              f"{r['heldout_loss_small']:.3f} |")


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    w = args.work
    teacher_dir = os.path.join(w, "teacher")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    t_loss = heldout_loss(teacher, tokenizer, _paragraphs(os.path.join(w, "eval.txt")))
    t_small = heldout_loss(teacher, tokenizer, _paragraphs(os.path.join(w, "eval_small.txt")))
    rows = [("teacher", 0, t_loss)]
    aligned = os.path.join(w, "teacher_init", "aligned")
    if os.path.isfile(os.path.join(aligned, "align_report.json")):  # stage 1 alone, before any distillation
        from hf_retnet import RetNetForCausalLM

        with open(os.path.join(aligned, "align_report.json"), encoding="utf-8") as handle:
            align_tokens = json.load(handle)["tokens"]
        stage1 = RetNetForCausalLM.from_pretrained(aligned)
        rows.append(("teacher_init, stage 1 only", align_tokens,
                     heldout_loss(stage1, tokenizer, _paragraphs(os.path.join(w, "eval.txt")))))
    fig, ax = plt.subplots(figsize=(7, 4))
    results = {}
    for tag in sorted(os.listdir(w)):
        path = os.path.join(w, tag, "result.json")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as handle:
            r = results[tag] = json.load(handle)
        label = f"{tag} (alpha {r['alpha']})"
        rows.append((label, r["total_tokens"], r["heldout_loss"]))
        points = [p for p in r["curve"] if "heldout" in p]  # the Trainer's eval_ce is another metric: not mixed in
        if points:
            ax.plot([p["tokens"] / 1e6 for p in points], [p["heldout"] for p in points], marker=".", label=label)
    ax.axhline(t_small, color="k", ls="--", lw=1, label="teacher")
    ax.set_xlabel("tokens (stage 1 + stage 2), millions")
    ax.set_ylabel("held-out loss, nats/token (100 paragraphs)")
    ax.set_ylim(bottom=min(1.5, t_small - 0.1), top=4.0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("RetNet students of stories260K")
    fig.tight_layout()
    png = os.path.join(w, "teacher_init.png")
    fig.savefig(png, dpi=120)
    print(f"| student | tokens | held-out loss (all held-out paragraphs) | ppl vs teacher |")
    print("| --- | --- | --- | --- |")
    for name, tokens, loss in rows:
        print(f"| {name} | {tokens / 1e6:.2f}M | {loss:.3f} | {torch.tensor(loss - t_loss).exp().item():.2f}x |")
    if "heldout" in (results.get("random_init", {}).get("curve") or [{}])[-1]:
        target = results["random_init"]["curve"][-1]["heldout"]  # same 100 paragraphs as the curves
        for tag, r in results.items():
            points = [p for p in r["curve"] if "heldout" in p]
            if tag.startswith("teacher_init") and points:
                reach = next((p["tokens"] for p in points if p["heldout"] <= target), None)
                print(f"{tag} first at or below random_init's final curve loss ({target:.3f}) after "
                      f"{'never' if reach is None else f'{reach / 1e6:.2f}M tokens'}")
    print(f"curves (held-out loss on the first 100 held-out paragraphs; teacher {t_small:.3f}):")
    for tag, r in results.items():
        print(f"  {tag}: " + ", ".join(f"{p['tokens'] / 1e6:.2f}M {p.get('heldout', float('nan')):.3f}" for p in r["curve"]))
    print(f"plot: {png}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--teacher", required=True, help="LlamaForCausalLM folder with its tokenizer")
    p.add_argument("--text", required=True, help="text file, one story per paragraph")
    p.add_argument("--work", required=True)
    r = sub.add_parser("run")
    r.add_argument("--work", required=True)
    r.add_argument("--arm", choices=ARMS, required=True)
    r.add_argument("--budget_tokens", type=int, default=600 * BATCH * SEQ)
    r.add_argument("--align_tokens", type=int, default=200_000)
    r.add_argument("--tag", default=None, help="folder name of this run under --work (default: the arm)")
    r.add_argument("--aligned", default=None, help="teacher_init: an existing training.align output to start from")
    r.add_argument("--alpha", type=float, default=0.5)
    r.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (embeddings, head, norms, 1-D)")
    r.add_argument("--muon_lr", type=float, default=0.02)
    r.add_argument("--eval_steps", type=int, default=50)
    r.add_argument("--random_student", type=json.loads, default={
        "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 5, "num_heads": 4, "intermediate_size": 172,
        "chunk_size": 64,
    })
    a = sub.add_parser("ablate")
    a.add_argument("--work", required=True)
    a.add_argument("--align_tokens", type=int, default=100_000)
    a.add_argument("--variants", nargs="+", choices=sorted(ABLATIONS), default=list(ABLATIONS))
    s = sub.add_parser("report")
    s.add_argument("--work", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    {"prepare": prepare, "run": run_arm, "ablate": ablate, "report": report}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

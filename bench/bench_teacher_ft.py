"""Does teacher correction help the student? The same distillation budget with the base teacher and with the
LoRA-finetuned teacher, side by side in one run, on the demo's real teacher and text.

    python bench/bench_teacher_ft.py                      # the measurement (CPU, one thread, tens of minutes)
    python bench/bench_teacher_ft.py --quick              # a smoke run of the same steps (a few minutes)

1. Convert the demo teacher (Karpathy's llama2.c `stories260K`, examples/demo/) with `training.convert_llama2c`.
2. Split examples/demo/tinystories_4000.txt by paragraph: held-out = the last 10%, train = the rest.
3. `training.finetune_teacher` on the train part (TRL SFTTrainer + LoRA), held-out loss before/after.
4. Distil a fresh RetNet student twice with `training.train` (direct teacher, same init, same batches, same steps):
   teacher = base, and teacher = base + adapter (merged once on load).
5. Report the held-out next-token loss (nats/token, each paragraph BOS + text + EOS as the trainer tokenizes it) of
   both teachers and both students; written to <out>/bench_teacher_ft.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

DEMO = os.path.join(ROOT, "examples", "demo")


def write_paragraphs(path: str, texts: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n\n".join(texts) + "\n")
    return path


def held_out_loss(model, tokenizer, texts: list[str], max_length: int, with_eos: bool = True) -> float:
    """Token-mean next-token loss over `texts`, each encoded as the trainer encodes a text record (BOS + text + EOS);
    `with_eos=False` drops the final EOS (llama2.c trained its stories without one, so the base teacher never
    learned to predict it: that token alone is part of what a finetune on EOS-terminated records fixes)."""
    from training.data.preprocess import encode_record

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i, text in enumerate(texts):
            ids, _ = encode_record(("text", text), tokenizer, f"held-out {i}")
            if not with_eos and ids[-1] == tokenizer.eos_token_id:
                ids = ids[:-1]
            ids = torch.tensor([ids[:max_length]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total / count


def distil(args, teacher: str, adapter: str | None, train_file: str, out: str):
    from training.trainers.distillation_config import DistillationConfig
    from training.trainers.distillation import run

    config = DistillationConfig(
        student="350M",
        student_overrides={"vocab_size": 512, "hidden_size": args.student_hidden, "num_hidden_layers": args.student_layers,
                           "num_heads": 4, "intermediate_size": 2 * args.student_hidden, "chunk_size": 64},
        teacher_source="direct", teacher_model=teacher, teacher_adapter=adapter, teacher_dtype="float32",
        teacher_topk=args.topk, distill_alpha=args.alpha, kd_loss="forward_kl", train_data=train_file,
        max_seq_length=args.seq, max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20), optim="adamw_torch",
        seed=0, use_cpu=True, save_strategy="no", report_to="none", logging_steps=max(1, args.steps // 10),
        output_dir=out, dataloader_num_workers=0,
    )
    return run(config).model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_teacher_ft"))
    p.add_argument("--quick", action="store_true", help="tiny budgets: check the pipeline, numbers mean little")
    p.add_argument("--steps", type=int, default=200, help="student optimizer steps (same for both teachers)")
    p.add_argument("--batch", type=int, default=8, help="student sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (student and teacher finetune)")
    p.add_argument("--lr", type=float, default=3e-3, help="student learning rate (AdamW, cosine)")
    p.add_argument("--alpha", type=float, default=0.5, help="CE weight of the student loss (the rest is KD)")
    p.add_argument("--topk", type=int, default=64, help="teacher top-k for the sparse KD")
    p.add_argument("--student_hidden", type=int, default=128)
    p.add_argument("--student_layers", type=int, default=4)
    p.add_argument("--teacher_steps", type=int, default=300, help="LoRA finetune steps of the teacher")
    p.add_argument("--teacher_lr", type=float, default=1e-3)
    p.add_argument("--lora_r", type=int, default=16)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.teacher_steps, args.batch, args.seq = 10, 10, 4, 128
    torch.set_num_threads(1)  # a shared CPU: one thread, both arms alike

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.converters.llama2c import convert_llama2c
    from training.trainers.teacher_sft import TeacherFinetuneConfig, load_records
    from training.trainers.teacher_sft import run as finetune
    from training.teachers.direct import load_teacher_model

    os.makedirs(args.out, exist_ok=True)
    teacher = str(convert_llama2c(os.path.join(DEMO, "stories260K.bin"), os.path.join(DEMO, "tok512.bin"),
                                  os.path.join(args.out, "teacher"), overwrite=True))
    texts = [obj["text"] for _, obj in load_records(os.path.join(DEMO, "tinystories_4000.txt"))]
    held = max(1, len(texts) // 10)
    train_texts, held_texts = texts[:-held], texts[-held:]
    train_file = write_paragraphs(os.path.join(args.out, "train.txt"), train_texts)
    held_file = write_paragraphs(os.path.join(args.out, "held_out.txt"), held_texts)
    print(f"data: {len(train_texts)} train paragraphs, {len(held_texts)} held-out (the last 10%)")

    start = time.perf_counter()
    ft = finetune(TeacherFinetuneConfig(
        teacher_model=teacher, teacher_dtype="float32", train_data=train_file, eval_data=held_file,
        output_dir=os.path.join(args.out, "teacher-ft"), max_steps=args.teacher_steps, max_length=args.seq,
        per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=args.teacher_lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, args.teacher_steps // 20), lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r, lora_dropout=0.0, seed=0, use_cpu=True, save_strategy="no", report_to="none",
        logging_steps=max(1, args.teacher_steps // 10), dataloader_num_workers=0,
    ))
    teacher_seconds = time.perf_counter() - start

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    base_teacher = load_teacher_model(teacher, dtype="float32")
    tuned_teacher = load_teacher_model(teacher, adapter=ft["adapter"], dtype="float32")
    result = {
        "budget": {"student_steps": args.steps, "batch": args.batch, "seq": args.seq, "alpha": args.alpha,
                   "topk": args.topk, "lr": args.lr, "student_hidden": args.student_hidden,
                   "student_layers": args.student_layers, "teacher_steps": args.teacher_steps,
                   "teacher_lr": args.teacher_lr, "lora_r": args.lora_r},
        "held_out_paragraphs": len(held_texts),
        "teacher_base_loss": held_out_loss(base_teacher, tokenizer, held_texts, args.seq),
        "teacher_finetuned_loss": held_out_loss(tuned_teacher, tokenizer, held_texts, args.seq),
        "teacher_base_loss_no_eos": held_out_loss(base_teacher, tokenizer, held_texts, args.seq, with_eos=False),
        "teacher_finetuned_loss_no_eos": held_out_loss(tuned_teacher, tokenizer, held_texts, args.seq, with_eos=False),
        "teacher_ft_trainer_eval": {"before": ft["eval_loss_before"], "after": ft["eval_loss_after"]},
        "teacher_ft_seconds": round(teacher_seconds, 1),
    }
    for name, adapter in (("base", None), ("finetuned", ft["adapter"])):
        start = time.perf_counter()
        student = distil(args, teacher, adapter, train_file, os.path.join(args.out, f"student-{name}"))
        result[f"student_{name}_teacher_loss"] = held_out_loss(student, tokenizer, held_texts, args.seq)
        result[f"student_{name}_teacher_loss_no_eos"] = held_out_loss(student, tokenizer, held_texts, args.seq,
                                                                      with_eos=False)
        result[f"student_{name}_seconds"] = round(time.perf_counter() - start, 1)
        del student
    result["student_loss_delta"] = result["student_finetuned_teacher_loss"] - result["student_base_teacher_loss"]

    path = os.path.join(args.out, "bench_teacher_ft.json")
    with open(f"{path}.tmp", "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    os.replace(f"{path}.tmp", path)
    print("\nheld-out loss, nats/token (perplexity)        base teacher    finetuned teacher")
    for who in ("teacher", "student"):
        a = result["teacher_base_loss" if who == "teacher" else "student_base_teacher_loss"]
        b = result["teacher_finetuned_loss" if who == "teacher" else "student_finetuned_teacher_loss"]
        print(f"  {who:<42} {a:.4f} ({math.exp(a):6.2f})   {b:.4f} ({math.exp(b):6.2f})")
    print(f"  without the final EOS: teacher {result['teacher_base_loss_no_eos']:.4f} -> "
          f"{result['teacher_finetuned_loss_no_eos']:.4f}, student {result['student_base_teacher_loss_no_eos']:.4f} "
          f"-> {result['student_finetuned_teacher_loss_no_eos']:.4f}")
    print(f"student: finetuned - base = {result['student_loss_delta']:+.4f} nats/token after {args.steps} steps x "
          f"{args.batch} x {args.seq} tokens; written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Route 2: on-policy distillation of a RetNet student with TRL's `trl.DistillationTrainer`.

    python examples/trl/onpolicy_distill.py --student 350M --teacher meta-llama/Llama-3.2-1B-Instruct \
        --teacher_adapter runs/teacher-ft/adapter --train_data data/train.jsonl --output_dir runs/student-opd

The student generates a completion for each prompt (a text's opening words, or a chat up to its last assistant
turn), and is trained on those tokens to match the teacher's full next-token distribution under the generalized
JSD (`--beta`: 0 = forward KL, 1 = reverse KL). Teacher and student must share the vocabulary. The teacher is the
base + adapter merged once by the project's loader. This is TRL's trainer, not `training.DistillationTrainer`
(offline teacher sources, top-k, caches, a network teacher): see docs/trl.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trl_example_utils as common  # noqa: E402


def build_trainer(args):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    tokenizer = common.load_tokenizer(args.tokenizer or args.teacher, padding_side="left")  # generation pads left
    student = common.build_student(args.student, tokenizer, args.student_overrides)
    teacher = common.load_teacher(args.teacher, args.teacher_adapter, args.teacher_dtype)
    prompts = common.as_prompts(common.read_records(args.train_data), args.prompt_words)
    config = DistillationConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, max_completion_length=args.max_completion_length, beta=args.beta,
        temperature=args.temperature, logging_steps=args.logging_steps, seed=args.seed, save_strategy="no",
        report_to="none", **common.device_defaults(),
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                  train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)
    return trainer, tokenizer


def parse_args(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    common.add_teacher_options(p)
    p.add_argument("--beta", type=float, default=0.5, help="generalized JSD interpolation (0 forward KL, 1 reverse KL)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling and loss temperature")
    p.add_argument("--max_completion_length", type=int, default=64, help="tokens the student generates per prompt")
    p.add_argument("--prompt_words", type=int, default=8, help="text records: the opening words used as the prompt")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    trainer, tokenizer = build_trainer(args)
    trainer.train()
    common.save_student(trainer.model, tokenizer, args.output_dir)
    return trainer


if __name__ == "__main__":
    main()

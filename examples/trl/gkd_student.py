"""Route 3: Generalized Knowledge Distillation of a RetNet student with `trl.experimental.gkd.GKDTrainer`.

    python examples/trl/gkd_student.py --student 350M --teacher meta-llama/Llama-3.2-1B-Instruct \
        --train_data data/train.jsonl --output_dir runs/student-gkd --lmbda 0.5

GKD mixes the two data sources of the paper: with probability `--lmbda` a batch is replaced by the student's own
completions (on-policy), otherwise the dataset's completions are used; either way the loss is the generalized JSD
(`--beta`) between student and teacher on the completion tokens. GKD's collator renders chats, so a text record
becomes user = its opening words, assistant = the rest. Teacher and student must share the vocabulary.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trl_example_utils as common  # noqa: E402


def build_trainer(args):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = common.load_tokenizer(args.tokenizer or args.teacher, padding_side="left")
    if not tokenizer.chat_template:
        raise ValueError(f"GKD renders chats, but the tokenizer of {args.tokenizer or args.teacher!r} has no chat "
                         "template; use an instruct tokenizer or set one (tokenizer.chat_template)")
    student = common.build_student(args.student, tokenizer, args.student_overrides)
    teacher = common.load_teacher(args.teacher, args.teacher_adapter, args.teacher_dtype)
    messages = common.as_messages(common.read_records(args.train_data), args.prompt_words)
    config = GKDConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
        lmbda=args.lmbda, beta=args.beta, temperature=args.temperature, logging_steps=args.logging_steps,
        seed=args.seed, save_strategy="no", report_to="none", **common.device_defaults(),
    )
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                         train_dataset=Dataset.from_dict({"messages": messages}), processing_class=tokenizer)
    return trainer, tokenizer


def parse_args(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    common.add_teacher_options(p)
    p.add_argument("--lmbda", type=float, default=0.5, help="probability of training on the student's own completions")
    p.add_argument("--beta", type=float, default=0.5, help="generalized JSD interpolation (0 forward KL, 1 reverse KL)")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature of on-policy completions")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens the student generates per prompt")
    p.add_argument("--prompt_words", type=int, default=8, help="text records: the opening words used as the user turn")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    trainer, tokenizer = build_trainer(args)
    trainer.train()
    common.save_student(trainer.model, tokenizer, args.output_dir)
    return trainer


if __name__ == "__main__":
    main()

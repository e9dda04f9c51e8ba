"""Route 1: supervised finetuning of a RetNet student with a LoRA adapter, in TRL's own `SFTTrainer`.

    python examples/trl/sft_student_lora.py --student runs/student --tokenizer runs/student \
        --train_data data/train.jsonl --output_dir runs/student-sft --max_steps 200

No teacher: plain next-token loss on the records (text: every token; chat: assistant turns only), with LoRA on
`hf_retnet.LORA_TARGET_MODULES` (the retention projections and the SwiGLU FFN). The adapter is saved to
`<output_dir>/adapter` and the merged student to `<output_dir>` (safetensors).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trl_example_utils as common  # noqa: E402


def build_trainer(args):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from hf_retnet import LORA_TARGET_MODULES

    if not args.tokenizer and not os.path.isdir(args.student):
        raise ValueError(f"--tokenizer is required when --student is a variant name ({args.student!r}), not a folder")
    tokenizer = common.load_tokenizer(args.tokenizer or args.student)
    student = common.build_student(args.student, tokenizer, args.student_overrides)
    records = common.read_records(args.train_data)
    if all(kind == "text" for kind, _ in records):
        dataset = Dataset.from_dict({"text": [payload for _, payload in records]})
    else:  # chat (or mixed): conversational rows, loss on assistant turns
        dataset = Dataset.from_dict({"messages": common.as_messages(records, args.prompt_words)})
    config = SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, max_length=args.max_length, logging_steps=args.logging_steps,
        seed=args.seed, save_strategy="no", report_to="none",
        assistant_only_loss="messages" in dataset.column_names, **common.device_defaults(),
    )
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                      target_modules=LORA_TARGET_MODULES, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=student, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora)
    return trainer, tokenizer


def parse_args(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--prompt_words", type=int, default=8, help="chat rows only: unused for text")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    trainer, tokenizer = build_trainer(args)
    trainer.train()
    common.save_student(trainer.model, tokenizer, args.output_dir)
    return trainer


if __name__ == "__main__":
    main()

"""Run by `torch.distributed.run --nproc_per_node 2` from test_eval_logging_ranks.py: one evaluation with two gloo
processes where only process 0's share of the evaluation set has a trained token. Each process writes its metrics
to <output_dir>/metrics-<process>.json (two processes printing to one pipe interleave their lines)."""

import json
import os
import sys

import torch

from hf_retnet import RetNetConfig, RetNetForCausalLM
from training.data.shards import PaddingCollator
from training.teachers.direct import DirectTeacher
from training.trainers.distillation_config import DistillationConfig
from training.trainers.distillation_trainer import DistillationTrainer


def main(teacher_dir: str, output_dir: str) -> None:
    config = DistillationConfig(output_dir=output_dir, teacher_model=teacher_dir, student="350M", teacher_topk=8,
                                per_device_eval_batch_size=1, report_to="none", use_cpu=True, save_strategy="no",
                                ddp_timeout=60)
    teacher = DirectTeacher(teacher_dir)
    torch.manual_seed(0)
    student = RetNetForCausalLM(RetNetConfig(vocab_size=teacher.vocab_size, hidden_size=32, num_hidden_layers=1,
                                             num_heads=2, intermediate_size=64))
    ids = list(range(5, 17))
    eval_items = [{"input_ids": ids, "labels": ids},  # process 0's share: trained tokens
                  {"input_ids": ids, "labels": [-100] * len(ids)}]  # process 1's: none
    trainer = DistillationTrainer(model=student, args=config, teacher=teacher, train_dataset=eval_items,
                                  eval_dataset=eval_items, data_collator=PaddingCollator(0))
    metrics = trainer.evaluate()
    with open(os.path.join(output_dir, f"metrics-{config.process_index}.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""What the three TRL example scripts share: a RetNet student, a teacher (base + optional adapter, merged once through
the project's one teacher loader), and the student's data file turned into the columns each TRL trainer reads.

The scripts are run from the repository root (`python examples/trl/<script>.py ...`); they put it on `sys.path`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every route takes; each script adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--student", default="350M",
                   help="RetNet variant ('350M', '500M') or a folder with a RetNet checkpoint")
    p.add_argument("--student_overrides", default=None,
                   help='JSON mapping applied to a variant\'s config, e.g. \'{"hidden_size": 64, "num_hidden_layers": 2}\'')
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the teacher's)")
    p.add_argument("--train_data", required=True, help="the student's data: a text / JSONL / Parquet file")
    p.add_argument("--output_dir", required=True, help="where the trained student (safetensors) is saved")
    p.add_argument("--max_steps", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--max_length", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logging_steps", type=int, default=10)
    return p


def add_teacher_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher Hub id or folder (same vocabulary as the student)")
    p.add_argument("--teacher_adapter", default=None,
                   help="peft adapter folder (e.g. from training.finetune_teacher) merged into the teacher on load")
    p.add_argument("--teacher_dtype", default="auto", help="auto, float32, bfloat16 or float16")


def device_defaults() -> dict:
    """TRL configs default to bf16 + gradient checkpointing (GPU habits); on CPU both only cost time."""
    import dataclasses

    import torch
    from transformers import TrainingArguments

    gpu = torch.cuda.is_available()
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers >= 5.x: activation_checkpointing (gradient_checkpointing is its deprecated alias)
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {"bf16": bool(gpu and torch.cuda.is_bf16_supported()), checkpointing: gpu}


def load_tokenizer(name: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def build_student(spec: str, tokenizer, overrides: dict | str | None = None):
    """A RetNet checkpoint folder, or a fresh variant sized to the tokenizer's vocabulary."""
    import hf_retnet  # noqa: F401  (registers the Auto classes)
    from hf_retnet import RetNetConfig, RetNetForCausalLM
    from transformers import AutoModelForCausalLM

    if os.path.isdir(os.path.expanduser(spec)):
        return AutoModelForCausalLM.from_pretrained(os.path.expanduser(spec), use_safetensors=True)
    overrides = json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {})
    overrides.setdefault("vocab_size", len(tokenizer))
    config = RetNetConfig.from_variant(
        spec, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **overrides,
    )
    return RetNetForCausalLM(config)


def load_teacher(name: str, adapter: str | None = None, dtype: str = "auto"):
    """Base + adapter merged once, through the same loader as the project's direct / cached / network teachers."""
    from training.teachers.direct import load_teacher_model

    return load_teacher_model(name, adapter=adapter, dtype=dtype)


def read_records(path: str) -> list[tuple[str, object]]:
    """(kind, payload) of every record of the file, normalized as the student's own reader does it:
    ("text", str) or ("chat", messages)."""
    from training.data.records import read_normalized

    return [record for _, record in read_normalized(path)]


def split_text(text: str, prompt_words: int) -> tuple[str, str]:
    """A story's first words as the prompt, the rest as its continuation."""
    words = text.split(" ")
    return " ".join(words[:prompt_words]), " ".join(words[prompt_words:])


def as_prompts(records, prompt_words: int) -> list:
    """Prompt column for on-policy distillation: the opening words of a text, or a chat up to its last assistant turn."""
    prompts = []
    for kind, payload in records:
        if kind == "text":
            prompts.append(split_text(payload, prompt_words)[0])
        else:
            last = max(i for i, m in enumerate(payload) if m["role"] == "assistant")
            prompts.append(payload[:last])
    return prompts


def as_messages(records, prompt_words: int) -> list[list[dict]]:
    """Messages column for GKD (its collator renders chats): a text becomes user = opening words,
    assistant = the rest of the story."""
    out = []
    for kind, payload in records:
        if kind == "text":
            prompt, rest = split_text(payload, prompt_words)
            out.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": rest}])
        else:
            out.append(payload)
    return out


def save_student(model, tokenizer, output_dir: str) -> None:
    """Write the student (merged if it carries a LoRA adapter) as safetensors + tokenizer, loadable with
    `AutoModelForCausalLM.from_pretrained(output_dir)` after `import hf_retnet` (or with trust_remote_code)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.save_pretrained(os.path.join(output_dir, "adapter"), safe_serialization=True)
        model = model.merge_and_unload()
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)

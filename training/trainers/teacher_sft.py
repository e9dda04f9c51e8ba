"""Adapt the teacher to the distillation data first ("teacher correction"), with TRL's SFTTrainer and a LoRA adapter.

    python -m training.finetune_teacher --config examples/configs/teacher_ft.yaml [--key value ...]
    accelerate launch -m training.finetune_teacher --config examples/configs/teacher_ft.yaml

Why: a teacher that was never trained on the student's data teaches the student its own idea of that data; a short
LoRA finetune on the same records (NVIDIA Minitron's "teacher correction") gives a teacher whose distributions fit
them, and the student converges faster. The records are tokenized exactly as the student's trainer tokenizes them
(`training.data.records.encode_record`: text = BOS + text + EOS with every token trained; chat = the chat template with
loss on assistant turns only), so the teacher is corrected on the very sequences it will later score.

The run evaluates the held-out split before and after training (printed and written to
`<output_dir>/teacher_ft.json`), saves the adapter to `<output_dir>/adapter` (with `teacher_base.json`, the
fingerprint of the base it belongs to) and, with `save_merged: true`, the merged model to `<output_dir>/merged`
(safetensors). Every teacher consumer takes `teacher_model` + `teacher_adapter` and merges once on load
(`training.teachers.direct.load_teacher_model`), or the merged folder as a plain teacher.

QLoRA (4-bit base) is used when bitsandbytes and a CUDA GPU are there (`quantization: auto`); elsewhere plain LoRA.
SFTConfig's GPU defaults (bf16, gradient checkpointing) only apply where a GPU is, so the CPU path runs as is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
from dataclasses import dataclass, field

try:
    from trl import SFTConfig
except ImportError as err:  # pragma: no cover - trl ships with the dev and trl extras
    raise ImportError("teacher finetuning needs TRL: pip install 'hf-retnet[trl]' (or pip install 'trl>=1.16')") from err

from training.utils.checks import check_output_folder
from training.utils.errors import command
from training.utils.io import atomic_write_json, staged_folder
from training.utils.paths import looks_like_local_path
from training.converters.gguf import is_gguf_path

QUANTIZATION = ("auto", "4bit", "none")
RESULT_FILE = "teacher_ft.json"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _qlora_available() -> bool:
    return _cuda() and importlib.util.find_spec("bitsandbytes") is not None


@dataclass
class TeacherFinetuneConfig(SFTConfig):
    """TRL's `SFTConfig` (every `TrainingArguments` / SFT field) plus the teacher, data and LoRA fields below."""

    # Redeclared SFT/Trainer fields whose TRL defaults assume a GPU (or a full finetune).
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision; default: on where a CUDA GPU supports it, off on CPU."},
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Gradient checkpointing; default: on with a CUDA GPU, off on CPU."}
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate of the LoRA weights."})

    # ---- teacher ----
    teacher_model: str | None = field(
        default=None, metadata={"help": "Base teacher: Hub id or folder (safetensors) with its tokenizer, or a Llama "
                                          ".gguf file (converted once: training.convert_gguf)."}
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={"help": "Dtype of the base weights (auto, float32, bfloat16, float16); with QLoRA the compute dtype."},
    )

    # ---- data ----
    train_data: str | None = field(
        default=None,
        metadata={"help": "The student's training data: a shard folder from training.preprocess, or a JSONL / Parquet "
                  "/ text file (text records, or chat records trained on assistant turns only), tokenized as "
                  "training.train tokenizes it."},
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "Held-out data, same forms; default: the last `eval_fraction` of train_data."}
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Without eval_data: this fraction (0 < f < 1) of the records, taken from the end, is held out."},
    )

    # ---- LoRA ----
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (>= 1)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "Modules given LoRA: 'all-linear' (every linear layer but the output head) or a "
                  "comma-separated list of module names, e.g. 'q_proj,v_proj'."},
    )
    quantization: str = field(
        default="auto",
        metadata={"help": f"One of {QUANTIZATION}: 'auto' = QLoRA (4-bit NF4 base) when bitsandbytes and a CUDA GPU "
                  "are there, else plain LoRA; '4bit' requires them; 'none' = plain LoRA."},
    )
    save_merged: bool = field(
        default=False,
        metadata={"help": "Also write base + adapter merged into `<output_dir>/merged` (safetensors, full precision)."},
    )

    def __post_init__(self):
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"config key '{key}': {why}")

        if not self.teacher_model:
            raise bad("teacher_model", "required (a Hub id or a folder with the base teacher)")
        if is_gguf_path(self.teacher_model):  # converted once when run() loads it
            if not os.path.isfile(os.path.expanduser(self.teacher_model)):
                raise FileNotFoundError(f"config key 'teacher_model': GGUF file {self.teacher_model!r} does not exist")
        elif looks_like_local_path(self.teacher_model) and not os.path.isdir(os.path.expanduser(self.teacher_model)):
            raise FileNotFoundError(f"config key 'teacher_model': folder {self.teacher_model!r} does not exist")
        if not self.train_data:
            raise bad("train_data", "required (the data the student will be distilled on)")
        check_output_folder(self.output_dir, "config key 'output_dir':")
        for key in ("train_data", "eval_data"):
            value = getattr(self, key)
            if value and looks_like_local_path(value) and not os.path.exists(os.path.expanduser(value)):
                raise FileNotFoundError(f"config key '{key}': {value!r} does not exist")
        if not 0.0 < self.eval_fraction < 1.0:
            raise bad("eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")
        if self.lora_r < 1:
            raise bad("lora_r", f"must be >= 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.quantization not in QUANTIZATION:
            raise bad("quantization", f"{self.quantization!r} is not one of {QUANTIZATION}")
        if self.quantization == "4bit" and not _qlora_available():
            raise bad("quantization", "'4bit' (QLoRA) needs a CUDA GPU and `pip install bitsandbytes`; use 'auto' or "
                      "'none' for plain LoRA")
        if self.teacher_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise bad("teacher_dtype", f"{self.teacher_dtype!r} is not one of auto, float32, bfloat16, float16")
        gpu = _cuda()
        if self.bf16 is None:
            import torch

            self.bf16 = bool(gpu and torch.cuda.is_bf16_supported()) and not self.fp16
        if self.gradient_checkpointing is None and getattr(self, "activation_checkpointing", None) is None:
            # transformers >= 5.x names it activation_checkpointing (gradient_checkpointing is a deprecated alias)
            names = {f.name for f in dataclasses.fields(self)}
            setattr(self, "activation_checkpointing" if "activation_checkpointing" in names else
                    "gradient_checkpointing", gpu)
        super().__post_init__()

    @property
    def use_qlora(self) -> bool:
        return self.quantization == "4bit" or (self.quantization == "auto" and _qlora_available())

    def lora_config(self):
        from peft import LoraConfig

        targets = self.lora_target_modules
        if targets != "all-linear":
            targets = [name.strip() for name in targets.split(",") if name.strip()]
        return LoraConfig(
            r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, target_modules=targets,
            bias="none", task_type="CAUSAL_LM",
        )


def linear_module_names(model_name_or_path: str) -> tuple[str, list[str]] | None:
    """(model_type, full names of the linear layers) of the model at `model_name_or_path`, read from its config (the
    model is built on the meta device: no weights load); None when the config cannot be read that way."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import hf_retnet  # noqa: F401  (registers the RetNet with the Auto classes)

    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - the real load reports it; this check only runs where it can
        return None
    return config.model_type, [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def check_lora_targets(targets: str, model_name_or_path: str, key: str = "lora_target_modules") -> None:
    """Every comma-separated name in `targets` must name linear layers of the model (as peft matches them: the
    module's name or its last parts), checked before any weights load; the error lists the valid names (for a
    RetNet, `hf_retnet.LORA_TARGET_MODULES`)."""
    if targets == "all-linear":
        return
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    if not wanted:
        raise ValueError(f"config key '{key}': empty; give 'all-linear' or comma-separated module names")
    found = linear_module_names(model_name_or_path)
    if found is None:
        return
    model_type, names = found
    unknown = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        if model_type == "hf_retnet":
            from hf_retnet import LORA_TARGET_MODULES

            valid = list(LORA_TARGET_MODULES)
        else:
            valid = sorted({n.rsplit(".", 1)[-1] for n in names} - {"lm_head"})
        raise ValueError(
            f"config key '{key}': {', '.join(repr(t) for t in unknown)} matches no linear layer of "
            f"{model_name_or_path!r}; valid targets: {','.join(valid)} (or 'all-linear')"
        )


def load_records(spec: str) -> list:
    """(where, record) pairs of a local file or folder of files (or a datasets id), in file order: the student's
    reader (`training.data.records.read_records`)."""
    from training.data.records import read_records

    return read_records(spec)


def tokenize_records(records: list, tokenizer, max_length: int | None):
    """A `datasets.Dataset` of {input_ids, labels}, each record encoded as training.train encodes it."""
    from datasets import Dataset

    from training.data.records import encode_record, normalize_record

    rows = {"input_ids": [], "labels": []}
    for where, obj in records:
        record = normalize_record(obj, where)
        if record is None:  # an empty text; the student's reader gives it no tokens to learn either
            continue
        ids, labels = encode_record(record, tokenizer, where)
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        if sum(label != -100 for label in labels[1:]) == 0:
            continue  # nothing left to predict after truncation
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
    if not rows["input_ids"]:
        raise ValueError("no trainable records (all empty, or no assistant tokens within max_length)")
    return Dataset.from_dict(rows)


def load_examples(spec: str, tokenizer, max_length: int | None):
    """{input_ids, labels} rows of `spec`: a shard folder from `training.preprocess` (memory-mapped, checked against
    the tokenizer) or a text / JSONL / Parquet file or folder of records (encoded as the student's reader does)."""
    spec = os.path.expanduser(spec)
    from training.data.format import MANIFEST_NAME

    if os.path.isfile(os.path.join(spec, MANIFEST_NAME)):
        import datasets

        from training.data.shards import PretokenizedShardDataset

        shards = PretokenizedShardDataset(spec, max_length, shuffle=False, tokenizer=tokenizer)
        paths = [os.path.join(spec, entry["file"]) for entry in shards.manifest["shards"]]
        full = datasets.load_dataset("parquet", data_files=paths, split="train")
        return full.select_columns(["input_ids", "labels"])  # SFTTrainer truncates to max_length
    return tokenize_records(load_records(spec), tokenizer, max_length)


def train_eval_datasets(config: TeacherFinetuneConfig, tokenizer):
    """(train, held-out) rows: eval_data if given, else the last `eval_fraction` of train_data (in file order)."""
    train = load_examples(config.train_data, tokenizer, config.max_length)
    if config.eval_data:
        return train, load_examples(config.eval_data, tokenizer, config.max_length)
    held = max(1, int(round(len(train) * config.eval_fraction)))
    if held >= len(train):
        raise ValueError(
            f"config key 'train_data': {len(train)} record(s) cannot be split into train and held-out parts; "
            "add records or pass eval_data"
        )
    return train.select(range(len(train) - held)), train.select(range(len(train) - held, len(train)))


def _dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def save_merged(base_model: str, adapter_dir: str, tokenizer, out_dir: str, dtype: str = "auto") -> None:
    """base + adapter merged through the teachers' own loader (so consumers of the merged folder see the very weights
    `teacher_model` + `teacher_adapter` gives them), saved as safetensors with the tokenizer."""
    from training.teachers.direct import load_teacher_model

    merged = load_teacher_model(base_model, adapter=adapter_dir, dtype=dtype)

    with staged_folder(out_dir) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)


def run(config: TeacherFinetuneConfig) -> dict:
    """Finetune, evaluate before/after, save. Returns the result written to `<output_dir>/teacher_ft.json`."""
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from training.converters.gguf import resolve_pretrained
    from training.teachers.adapter import write_adapter_base

    base = resolve_pretrained(config.teacher_model)  # a .gguf file: its converted folder (cached)
    check_lora_targets(config.lora_target_modules, base)  # a typo fails here, not inside peft
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_dataset, eval_dataset = train_eval_datasets(config, tokenizer)

    init_kwargs = dict(config.model_init_kwargs or {})
    init_kwargs.setdefault("dtype", _dtype(config.teacher_dtype))
    quantization_config = None
    if config.use_qlora:
        import torch
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if config.bf16 else torch.float16
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
    config.model_init_kwargs = init_kwargs
    trainer = SFTTrainer(
        model=base,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=config.lora_config(),
        quantization_config=quantization_config,
    )
    # A fresh LoRA adapter is zero (B = 0), so this is the base teacher's held-out loss.
    before = trainer.evaluate(metric_key_prefix="eval")["eval_loss"]
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    after = trainer.evaluate(metric_key_prefix="eval")["eval_loss"]

    adapter_dir = os.path.join(config.output_dir, "adapter")
    result = {
        "base_model": config.teacher_model,
        "adapter": os.path.abspath(adapter_dir),
        "merged": os.path.abspath(os.path.join(config.output_dir, "merged")) if config.save_merged else None,
        "qlora": config.use_qlora,
        "train_records": len(train_dataset),
        "eval_records": len(eval_dataset),
        "eval_loss_before": float(before),
        "eval_loss_after": float(after),
        "eval_perplexity_before": math.exp(min(before, 50.0)),
        "eval_perplexity_after": math.exp(min(after, 50.0)),
        "global_step": trainer.state.global_step,
    }

    if trainer.is_world_process_zero():
        with staged_folder(adapter_dir) as staging:
            trainer.model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            write_adapter_base(staging, base)
        if config.save_merged:
            save_merged(base, adapter_dir, tokenizer, result["merged"], dtype=config.teacher_dtype)
        atomic_write_json(os.path.join(config.output_dir, RESULT_FILE), result)
        print(
            f"teacher held-out loss: before {before:.4f} -> after {after:.4f} "
            f"({len(eval_dataset)} held-out records); adapter: {adapter_dir}"
            + (f"; merged: {result['merged']}" if config.save_merged else "")
        )
    trainer.accelerator.wait_for_everyone()
    return result


def build_parser():
    """`python -m training.finetune_teacher`'s parser: every TeacherFinetuneConfig / SFTConfig field as a key and flag."""
    from training.utils.parser import CommandParser

    return CommandParser(TeacherFinetuneConfig, prog="python -m training.finetune_teacher", description=__doc__)


@command
def main(argv: list[str] | None = None) -> int:
    (config,) = build_parser().parse_or_exit(argv)
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())

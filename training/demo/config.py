"""`DemoConfig`: what `python -m training.demo` runs, read from YAML (`examples/configs/demo.yaml`) plus
`--key value` overrides. Every field is documented once, in its `help`; unknown keys fail naming the key."""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field

STUDENT_INITS = ("teacher", "random")
DEFAULT_CONFIG = "examples/configs/demo.yaml"


@dataclass
class StudentRecipe:
    """One student of the comparison. All students see the same data order and the same token budget."""

    name: str = field(metadata={"help": "Short name: the folder under <output_dir>/students and the table row."})
    init: str = field(
        default="random",
        metadata={"help": "'teacher': RetNetForCausalLM.from_llama + stage-1 attention transfer (training.align), "
                  "then distillation; 'random': a fresh RetNet of `student`/`student_overrides`."},
    )
    train: dict = field(
        default_factory=dict,
        metadata={"help": "DistillationConfig keys for this student on top of the shared `train` (e.g. "
                  "distill_alpha: 1.0 for CE only)."},
    )
    align: dict = field(
        default_factory=dict,
        metadata={"help": "init=teacher: training.align.AlignConfig keys (max_tokens, learning_rate, gate, ...); "
                  "its tokens count in the student's budget."},
    )
    eval: dict = field(
        default_factory=dict,
        metadata={"help": "training.evaluate options for this student on top of the shared `eval` (e.g. sections: "
                  "[heldout, latency], latency_lengths: [256, 8192])."},
    )
    description: str = field(default="", metadata={"help": "One line for the report's table."})


@dataclass
class DemoConfig:
    """The whole demo: teacher, data split, cache, students, evaluation and report."""

    output_dir: str = field(default="runs/demo", metadata={"help": "Everything the demo writes goes here."})
    teacher: str = field(
        default="examples/demo/stories260K.bin",
        metadata={"help": "The teacher: a llama2.c checkpoint (.bin, converted with training.convert_llama2c), a "
                  "Llama folder, or a Hub id such as meta-llama/Llama-3.2-1B-Instruct (loaded with from_pretrained)."},
    )
    teacher_tokenizer: str | None = field(
        default="examples/demo/tok512.bin",
        metadata={"help": "llama2.c tokenizer.bin for a .bin teacher; ignored for folders and Hub ids."},
    )
    stories: str = field(
        default="examples/demo/tinystories_4000.txt",
        metadata={"help": "The text: a file of blank-line separated paragraphs, a JSONL file with a 'text' field, or "
                  "a datasets id ('owner/name' or 'owner/name:split', column 'text')."},
    )
    synthesize: dict = field(
        default_factory=dict,
        metadata={"merge": True, "help": "When set, the teacher writes the data itself (training.synthesize keys: n, batch_size, "
                  "max_answer_tokens, seed, ...): chat records whose assistant turns are trained and scored; `stories` "
                  "is then unused and the last `heldout_stories` conversations are held out."},
    )
    chat_requests: int = field(
        default=0,
        metadata={"help": "Chat data: answer this many held-out requests with the teacher and the best student "
                  "(greedy, through the chat template) side by side in the report."},
    )
    stories_limit: int | None = field(
        default=None, metadata={"help": "Use only the first N records of `stories` (for large datasets)."}
    )
    heldout_stories: int = field(
        default=400, metadata={"help": "The last N records are held out: never trained on, used for evaluation."}
    )
    max_seq_length: int = field(
        default=512, metadata={"help": "Tokens per sequence for shards, cache and training (longer records are cut)."}
    )
    pack: bool = field(
        default=False,
        metadata={"help": "Concatenate the training records and cut them into max_seq_length blocks (no padding; "
                  "each record still starts with BOS). Evaluation scores every held-out record on its own."},
    )
    append_eos: bool = field(
        default=True,
        metadata={"help": "End every record with EOS, in training and evaluation. False for teachers that never "
                  "saw EOS (llama2.c models are trained on BOS-separated text)."},
    )
    teacher_topk: int = field(default=64, metadata={"help": "Top-k of the teacher's distribution in the cache."})
    cache_encoding: str = field(
        default="compact", metadata={"help": "Cache encoding: 'naive' or 'compact[...]' (docs/cache_format.md)."}
    )
    finetune_teacher: bool = field(
        default=False,
        metadata={"help": "Run training.finetune_teacher (LoRA) on the training split first; its adapter is kept "
                  "only if the teacher's held-out loss falls."},
    )
    finetune: dict = field(
        default_factory=dict, metadata={"merge": True, "help": "training.finetune_teacher config keys (max_steps, lora_r, ...)."}
    )
    student: str = field(
        default="350M", metadata={"help": "Random-init students: a RetNet variant name or folder (see training.train)."}
    )
    student_overrides: dict | None = field(
        default=None,
        metadata={"help": "Random-init students: RetNet config keys on top of `student`; vocab_size defaults to the "
                  "teacher's."},
    )
    train: dict = field(
        default_factory=dict,
        metadata={"merge": True, "help": "DistillationConfig keys shared by every student (max_steps, per_device_train_batch_size, "
                  "learning_rate, optim, ...); the demo sets the teacher, data, cache and output folders."},
    )
    students: list = field(
        default_factory=list, metadata={"help": "The students to train and compare: a list of StudentRecipe mappings."}
    )
    curve_stories: int = field(
        default=100, metadata={"help": "Held-out stories scored during training for the loss-against-tokens plot."}
    )
    curve_every: int = field(default=50, metadata={"help": "Score them every N optimizer steps."})
    eval_stories: int | None = field(
        default=None, metadata={"help": "Score only the first N held-out records (None: all of them)."}
    )
    eval: dict = field(
        default_factory=dict, metadata={"merge": True, "help": "Extra training.evaluate options (passed as --key value)."}
    )
    prompts: list = field(
        default_factory=lambda: ["Once upon a time", "One day, a little dog", "Tom and Sue went to the park."],
        metadata={"help": "Prompts the teacher and the best student both continue in the report."},
    )
    sample_tokens: int = field(default=80, metadata={"help": "New tokens per generated story in the report."})
    threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads (default: all cores). Ignored on a GPU."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the data split, data order and new weights."})

    def __post_init__(self):
        def bad(key, why):
            return ValueError(f"demo config key '{key}': {why}")

        if not self.teacher:
            raise bad("teacher", "empty; give a llama2.c .bin, a Llama folder or a Hub id")
        if self.heldout_stories < 1:
            raise bad("heldout_stories", f"must be >= 1, got {self.heldout_stories}")
        if self.max_seq_length < 2:
            raise bad("max_seq_length", f"must be >= 2, got {self.max_seq_length}")
        if self.teacher_topk < 1:
            raise bad("teacher_topk", f"must be >= 1, got {self.teacher_topk}")
        for key in ("finetune", "train", "eval", "synthesize"):
            if not isinstance(getattr(self, key), dict):
                raise bad(key, f"must be a mapping, got {type(getattr(self, key)).__name__}")
        if not self.students:
            raise bad("students", "empty; list at least one student recipe")
        recipes, names = [], set()
        for i, s in enumerate(self.students):
            if isinstance(s, StudentRecipe):
                recipes.append(s)
                continue
            if not isinstance(s, dict):
                raise bad(f"students[{i}]", f"must be a mapping, got {type(s).__name__}")
            _reject_unknown(s, {f.name for f in dataclasses.fields(StudentRecipe)}, f"students[{i}]")
            if "name" not in s:
                raise bad(f"students[{i}]", "needs a 'name'")
            recipes.append(StudentRecipe(**s))
        for r in recipes:
            if r.init not in STUDENT_INITS:
                raise bad(f"students.{r.name}.init", f"{r.init!r} is not one of {STUDENT_INITS}")
            if r.name in names or not r.name or "/" in r.name:
                raise bad("students", f"names must be unique folder names, got {r.name!r} twice or malformed")
            names.add(r.name)
        self.students = recipes

    @property
    def chat(self) -> bool:
        """The data are conversations the teacher wrote (`synthesize`), not stories."""
        return bool(self.synthesize)

    @property
    def teacher_is_llama2c(self) -> bool:
        return self.teacher.endswith(".bin") and os.path.isfile(self.teacher)


def build_parser():
    """`python -m training.demo`'s parser: every DemoConfig field as a YAML key (`--config`) and a flag."""
    from training.utils.parser import CommandParser

    recipe = "\n".join(f"  {f.name}: {f.metadata.get('help', '')}" for f in dataclasses.fields(StudentRecipe))
    return CommandParser(
        DemoConfig, prog="python -m training.demo",
        description="Distil a pretrained Llama into RetNet students and write <output_dir>/report.md. Mappings on the "
                    "command line are YAML and merge into the config file's (--train '{max_steps: 50}' keeps the "
                    f"other train keys). Without --config: {DEFAULT_CONFIG}.",
        epilog=f"each entry of `students`:\n{recipe}",
    )


def load_demo_config(yaml_path: str | None, overrides: list[str] | None = None) -> DemoConfig:
    """YAML, then `--key value` overrides (mappings and lists as YAML values; `train`, `eval`, `finetune` and
    `synthesize` merge into the file's). Raises ConfigError (a ValueError) on a bad key or value."""
    argv = (["--config", yaml_path] if yaml_path is not None else []) + list(overrides or [])
    return build_parser().parse(argv)[0]


def _reject_unknown(values: dict, known: set[str], where: str) -> None:
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown demo config key '{key}' in {where}{hint}")

"""`AlignConfig`: the settings of stage 1 (attention transfer), every field a YAML key and a `--key value` flag."""

from __future__ import annotations

from dataclasses import dataclass, field

TRAINABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "group_norm", "decays")
# What a hybrid student (attention_window > 0) trains unless `train` says otherwise. Its q/k/v/o are also its window
# attention's, which at conversion is exactly the teacher's attention over the window (+ sinks): with them frozen,
# every token whose context fits in the first W + S tokens stays exactly the teacher's, and stage 1 only adds the
# retention part (gate, per-head norm, decays) on top. Training them trades that exactness for a better fit of the
# far past: measured on stories260K (W=16, S=4, 150k tokens, held-out nats/token; teacher 1.623, converted 1.726),
# this default reaches 1.714 (1.713 at 300k tokens and lr 1e-2: capacity-bound, since retention must use the
# teacher's softmax q/k as linear features), q/k/v/o trained too 1.686, while the first W + S predictions move from
# the teacher's 1.906 to 1.890. List q/k/v/o in `train` to take that trade (or adapt them end to end in stage 2).
HYBRID_TRAINABLE = ("g_proj", "group_norm", "decays")


@dataclass
class AlignConfig:
    """Attention transfer settings (every field is also a `--key value` flag and a YAML key)."""

    teacher: str = field(default=None, metadata={"help": "LlamaForCausalLM folder, Hub id or Llama .gguf file to convert and align to."})
    student_out: str = field(default=None, metadata={"help": "Folder to write the aligned student into."})
    data: str = field(
        default=None,
        metadata={"help": "Alignment text: a text (one record per paragraph) / JSONL / Parquet file or a shard folder."},
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "Held-out text for the reported per-layer errors (default: the first items of data)."}
    )
    max_tokens: int = field(
        default=300_000,
        metadata={"help": "Real (unpadded) tokens to align on: the run takes ceil(max_tokens / (batch_size x "
                          "processes x mean sequence length)) steps."},
    )
    max_seq_length: int = field(default=256, metadata={"help": "Tokens per sequence (longer records are cut)."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate (cosine decay over the run)."})
    decay_learning_rate: float = field(default=3e-2, metadata={"help": "AdamW learning rate of the log-decays."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of the steps with a linear warm-up."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the trained matrices."})
    train: list[str] | None = field(
        default=None,
        metadata={"help": f"What trains, any of {TRAINABLE} (decays: the per-head gammas). Default: all of them for a "
                          f"pure RetNet; {list(HYBRID_TRAINABLE)} for a hybrid (attention_window > 0), whose q/k/v/o "
                          "are also its window attention's, exactly the teacher's at conversion: list them to train "
                          "them anyway."},
    )
    share_kv: bool = field(default=True, metadata={"help": "Keep the teacher's grouped k/v heads (shared states)."})
    gate: str = field(default="constant", metadata={"help": "Output gate at conversion: none, constant or random."})
    decays: str = field(default="attention", metadata={"help": "Initial decays: 'attention' (from the teacher) or 'retnet'."})
    calibration_sequences: int = field(default=64, metadata={"help": "Sequences measured for decays and norm scales."})
    eval_sequences: int = field(default=64, metadata={"help": "Held-out sequences the per-layer errors are measured on."})
    eval_steps: int = field(default=25, metadata={"help": "Measure the held-out per-layer error every this many steps."})
    save_steps: int = field(default=100, metadata={"help": "Write a resumable checkpoint every this many steps."})
    resume: bool = field(default=False, metadata={"help": "Continue from student_out/.align-checkpoint when present."})
    chunk_size: int = field(default=64, metadata={"help": "Chunk size of the student's chunkwise retention."})
    attention_window: int = field(
        default=0,
        metadata={"help": "W > 0 converts to the hybrid student: softmax attention over the last W tokens (the "
                          "teacher's own q/k/v/o) plus retention over the older ones; 0: pure RetNet. The retention "
                          "part starts silent and learns only from tokens more than W (+ attention_sinks) back, so "
                          "max_seq_length must exceed W + S, and the longer the sequences the more it sees."},
    )
    attention_sinks: int = field(
        default=0,
        metadata={"help": "S > 0 (with attention_window > 0): each document's first S tokens stay in the window "
                          "softmax of every later token and never enter the retention state (StreamingLLM's attention "
                          "sinks; 4 is the usual choice)."},
    )
    layers: list[str] | None = field(
        default=None,
        metadata={"help": "Teacher layer indices to keep, in increasing order, for a shallower student: "
                          "comma-separated on the command line (--layers 0,3,5), a list in YAML. Default: all. "
                          "Excludes keep_layers."},
    )
    keep_layers: int | None = field(
        default=None,
        metadata={"help": "Keep this many teacher layers, chosen on the calibration batch by "
                          "hf_retnet.convert_llama.select_layers (the first, the last and the middle blocks that "
                          "change their input most). Excludes layers."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of data order and new weights."})
    device: str = field(
        default="auto",
        metadata={"help": "'auto': accelerate's choice (the GPU when there is one; several with `accelerate launch`); "
                          "'cpu': the CPU even where a GPU is present; 'cuda': the GPU, an error without one."},
    )

    def __post_init__(self):
        for key in ("teacher", "student_out", "data"):
            if not getattr(self, key):
                raise ValueError(f"config key {key!r}: required (see python -m training.align --help)")
        for key in ("attention_window", "attention_sinks"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"config key {key!r}: must be a whole number >= 0, got {value!r}")
        if self.attention_sinks and not self.attention_window:
            raise ValueError("config key 'attention_sinks': needs attention_window > 0 (sinks extend the window)")
        if self.attention_window and self.max_seq_length <= self.attention_window + self.attention_sinks:
            raise ValueError(
                f"config key 'max_seq_length': {self.max_seq_length} tokens never reach past the window "
                f"(attention_window + attention_sinks = {self.attention_window + self.attention_sinks}), so the "
                "retention part would see no token to learn from; use longer sequences"
            )
        self.layers = _parse_layers(self.layers)
        if self.layers is not None and self.keep_layers is not None:
            raise ValueError("config keys 'layers' and 'keep_layers': give one of them (explicit indices, or a count "
                             "chosen by select_layers), not both")
        if self.keep_layers is not None and (isinstance(self.keep_layers, bool) or self.keep_layers < 2):
            raise ValueError(f"config key 'keep_layers': must be >= 2 (the first and last layers), got {self.keep_layers!r}")
        if self.train is None:
            self.train = list(HYBRID_TRAINABLE if self.attention_window else TRAINABLE)
        bad = [part for part in self.train if part not in TRAINABLE]
        if bad or not self.train:
            raise ValueError(f"config key 'train': {bad or 'empty'}; choose from {TRAINABLE}")
        for key in ("max_tokens", "max_seq_length", "batch_size", "eval_steps", "save_steps", "calibration_sequences",
                    "eval_sequences"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r}: must be >= 1, got {getattr(self, key)}")
        if self.learning_rate <= 0 or self.decay_learning_rate < 0:
            raise ValueError("config keys 'learning_rate' (> 0) and 'decay_learning_rate' (>= 0) out of range")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"config key 'warmup_ratio': must be in [0, 1), got {self.warmup_ratio}")
        if self.gate not in ("none", "constant", "random"):
            raise ValueError(f"config key 'gate': {self.gate!r} is not one of none, constant, random")
        if self.decays not in ("attention", "retnet"):
            raise ValueError(f"config key 'decays': {self.decays!r} is not one of attention, retnet")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"config key 'device': {self.device!r} is not one of auto, cpu, cuda (accelerate places "
                             "the run; CUDA_VISIBLE_DEVICES picks the GPU)")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("config key 'device': 'cuda', but torch sees no GPU; use 'auto' or 'cpu'")
        if "g_proj" in self.train and self.gate == "none":
            self.train = [part for part in self.train if part != "g_proj"]  # nothing to train


def _parse_layers(layers) -> list[int] | None:
    """Teacher layer indices from the command line ("0,3,5" or "0 3 5") or YAML ([0, 3, 5] or "0,3,5")."""
    if layers is None:
        return None
    items = layers.split(",") if isinstance(layers, str) else layers
    values = []
    for item in items:
        parts = item.split(",") if isinstance(item, str) else [item]
        for part in parts:
            if isinstance(part, str) and not part.strip():
                continue
            try:
                if isinstance(part, (bool, float)):
                    raise ValueError
                values.append(int(part))
            except (TypeError, ValueError):
                raise ValueError(f"config key 'layers': {layers!r} is not a list of teacher layer indices "
                                 "(e.g. 0,3,5)") from None
    if not values or any(i < 0 for i in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"config key 'layers': {layers!r} must be distinct indices >= 0 in increasing order")
    return values

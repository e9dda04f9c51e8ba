"""`DistillationConfig`: the Trainer's arguments plus the distillation fields, loadable from YAML + `--key value`.

Every distillation field is documented once, in its `help` metadata (shown by `python -m training.train --help`),
and validated in `__post_init__`, so a bad value fails with the key's name before any model or folder is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from training.utils.checks import (
    check_checkpoint_folder,
    check_local_folder,
    check_output_folder,
    check_weight_files,
    expand,
)
from training.utils.paths import looks_like_local_path
from training.converters.gguf import is_gguf_path

TEACHER_SOURCES = ("direct", "cached", "network")
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
CACHE_VERIFY = ("full", "manifest", "none")
MUON_ADJUST_LR = ("original", "match_rms_adamw")
# Config keys that hold local paths (or Hub ids); `~` in them is expanded once, at validation.
PATH_KEYS = ("student", "teacher_model", "teacher_adapter", "teacher_cache", "tokenizer", "train_data", "eval_data",
             "resume_from_checkpoint")


@dataclass
class DistillationConfig(TrainingArguments):
    """`TrainingArguments` plus what distilling a teacher into a RetNet student needs (README: "Real-teacher workflow")."""

    # Redeclared Trainer fields: `optim` also accepts "muon" (see training/trainers/optim.py); evaluation only needs the loss.
    optim: str = field(
        default="adamw_torch",
        metadata={
            "help": "Optimizer: any Trainer `optim` name, or 'muon' = torch.optim.Muon on the 2-D hidden matrices "
            "(lr `muon_learning_rate`) + AdamW on embeddings, lm_head, norms and 1-D params (lr `learning_rate`)."
        },
    )
    prediction_loss_only: bool = field(
        default=True,
        metadata={"help": "Evaluation returns only the distillation loss (no [B,T,V] logits are gathered)."},
    )

    # ---- student ----
    student: str = field(
        default="500M",
        metadata={"help": "RetNet student: a variant name ('350M', '500M') or a folder with a RetNet config/checkpoint."},
    )
    student_overrides: dict | str | None = field(
        default=None,
        metadata={
            "help": "Mapping (YAML mapping or JSON string) applied on top of the student config, e.g. "
            '\'{"hidden_size": 64, "num_hidden_layers": 2}\' for a tiny student.'
        },
    )

    # ---- teacher ----
    teacher_source: str = field(
        default="direct",
        metadata={"help": "Where teacher distributions come from: 'direct' (in process), 'cached' (disk), 'network'."},
    )
    teacher_model: str | None = field(
        default=None,
        metadata={"help": "Teacher Hub id, folder or Llama .gguf file (direct mode; a GGUF is converted once, "
                          "training.convert_gguf); its tokenizer is the default `tokenizer`. With "
                          "teacher_protocol=openai, the model id the vLLM server must serve (when set)."},
    )
    teacher_adapter: str | None = field(
        default=None, metadata={"help": "Optional peft adapter folder merged into the teacher's weights."}
    )
    teacher_cache: str | None = field(
        default=None, metadata={"help": "Folder written by `python -m training.cache_teacher_logits` (cached mode)."}
    )
    teacher_cache_verify: str = field(
        default="full",
        metadata={"help": f"How the teacher cache is checked at start (cached mode), one of {CACHE_VERIFY}: 'full' "
                  "(default) hashes every shard against the manifest's sha256 (reads the whole cache, on every "
                  "process, at every start); 'manifest' checks shard sizes and headers against the manifest "
                  "(no data read: use it for large caches); 'none' skips the size check. Every row is still "
                  "checked against the hash of its token ids when it is read."},
    )
    teacher_url: str | None = field(
        default=None, metadata={"help": "Base URL of `python -m training.serve_teacher` (network mode)."}
    )
    teacher_api_key: str | None = field(
        default=None,
        metadata={"help": "Bearer key for the teacher server; defaults to the TEACHER_API_KEY environment variable."},
    )
    teacher_protocol: str = field(
        default="topk",
        metadata={"help": "Network mode: 'topk' (our /v1/topk, binary) or 'openai' (a stock vLLM server's "
                  "/v1/completions with prompt_logprobs; temperature 1 only)."},
    )
    teacher_vocab_size: int | None = field(
        default=None,
        metadata={"help": "Network mode with teacher_protocol=openai: the teacher's vocabulary size (vLLM does "
                  "not report it); our /v1/topk server reports its own."},
    )
    teacher_retries: int = field(
        default=5,
        metadata={"help": "Network mode: retries of a failed teacher request, waiting 0.5 s, 1 s, 2 s, ... (at most "
                  "30 s) between them; 10 outlasts a teacher server restart of about 2.5 minutes (vLLM: 1-5 min)."},
    )
    teacher_startup_timeout: float = field(
        default=600.0,
        metadata={"help": "Network mode: seconds to wait, before the first batch, for a teacher server that is still "
                  "starting (answers 502/503/504, or refuses connections within teacher_connect_timeout); "
                  "docs/vllm.md."},
    )
    teacher_connect_timeout: float = field(
        default=10.0,
        metadata={"help": "Network mode: seconds a refused connection to teacher_url (nothing listening) is retried "
                  "at start-up before the run stops, naming the URL; raise it when the server is started together "
                  "with the run and listens only once its model has loaded."},
    )
    teacher_dtype: str = field(
        default="auto", metadata={"help": f"Teacher weights dtype, one of {TEACHER_DTYPES} ('auto' = checkpoint's)."}
    )
    teacher_device: str | None = field(
        default=None, metadata={"help": "Device of the direct teacher (e.g. 'cuda:1'); default: the student's device."}
    )

    # ---- loss ----
    teacher_topk: int = field(
        default=512, metadata={"help": "k of the teacher's top-k distribution; must be <= the vocabulary size."}
    )
    full_vocab_kd: bool = field(
        default=False,
        metadata={"help": "Direct mode only: use full-vocabulary KL from the teacher's logits instead of sparse top-k."},
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Softening temperature (> 0) of teacher and student; KD is scaled by T^2."}
    )
    temperature_start: float | None = field(
        default=None,
        metadata={"help": "If set, temperature moves linearly from this value to `temperature` over "
                  "`temperature_schedule_steps` optimizer steps."},
    )
    temperature_schedule_steps: int = field(
        default=0, metadata={"help": "Length in optimizer steps of the linear temperature schedule."}
    )
    distill_alpha: float = field(
        default=0.5, metadata={"help": "CE weight in [0, 1]: loss = alpha * CE + (1 - alpha) * KD (+ diversity)."}
    )
    distill_alpha_start: float | None = field(
        default=None,
        metadata={"help": "If set, alpha moves linearly from this value to `distill_alpha` over "
                  "`alpha_schedule_steps` optimizer steps."},
    )
    alpha_schedule_steps: int = field(
        default=0, metadata={"help": "Length in optimizer steps of the linear alpha schedule."}
    )
    kd_loss: str = field(
        default="forward_kl", metadata={"help": f"KD divergence, one of {KD_LOSSES}."}
    )
    jsd_beta: float = field(
        default=0.5, metadata={"help": "Interpolation beta in [0, 1] of the generalized JSD (GKD) when kd_loss=jsd."}
    )
    reverse_kl_warmup_steps: int = field(
        default=0, metadata={"help": "Use reverse KL for the first N optimizer steps, then `kd_loss`."}
    )
    diversity_weight: float = field(
        default=0.0,
        metadata={"help": "Weight (>= 0) of the entropy-gap regulariser that keeps the student's distribution spread."},
    )
    loss_chunk_size: int = field(
        default=1024, metadata={"help": "Token rows per lm_head chunk in the loss (bounds the [rows, V] fp32 memory)."}
    )

    # ---- Muon ----
    muon_learning_rate: float = field(
        default=0.02, metadata={"help": "Learning rate of the Muon part when optim=muon (AdamW uses learning_rate)."}
    )
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon momentum in [0, 1)."})
    muon_adjust_lr_fn: str = field(
        default="original", metadata={"help": f"torch.optim.Muon `adjust_lr_fn`, one of {MUON_ADJUST_LR}."}
    )

    # ---- data ----
    train_data: str | None = field(
        default=None,
        metadata={"help": "Training data: a shard folder from training.preprocess, a JSONL/Parquet/text file, or a "
                  "datasets id (tokenized on the fly)."},
    )
    eval_data: str | None = field(default=None, metadata={"help": "Held-out data, same forms as `train_data`."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub id; defaults to `teacher_model` (required in cached/network "
                  "mode without one)."}
    )
    max_seq_length: int = field(default=1024, metadata={"help": "Tokens per training sequence (>= 2)."})

    # ---- telemetry ----
    default_callbacks: bool = field(
        default=True, metadata={"help": "Attach the NaN guard, memory and throughput callbacks."}
    )
    saddle_escape: bool = field(
        default=False,
        metadata={"help": "Attach SaddleEscapeCallback: on a loss plateau with small gradients, boost the learning "
                  "rate for a while, then restore the scheduler's value exactly (docs/stability.md)."},
    )
    saddle_escape_config: dict | str | None = field(
        default=None,
        metadata={"help": "Mapping (YAML mapping or JSON string) of SaddleEscapeConfig thresholds overriding its "
                  "documented defaults, e.g. '{\"window\": 50, \"boost_factor\": 2.0}'."},
    )
    cuda_expandable_segments: bool = field(
        default=False,
        metadata={"help": "Configure the CUDA caching allocator with expandable segments before CUDA starts."},
    )

    def __post_init__(self):
        self._validate_distillation()
        # TrainingArguments turns `optim` into an OptimizerNames enum, which has no "muon": validate the rest with a
        # stand-in and put the name back (DistillationTrainer.create_optimizer handles it).
        use_muon = str(self.optim).lower() == "muon"
        if use_muon:
            self.optim = "adamw_torch"
        elif str(self.optim) not in {name.value for name in OptimizerNames}:
            raise ValueError(
                f"config key 'optim': {str(self.optim)!r} is not 'muon' nor one of "
                f"{sorted(name.value for name in OptimizerNames)}"
            )
        super().__post_init__()
        if use_muon:
            self.optim = "muon"

    @property
    def use_muon(self) -> bool:
        return str(self.optim) == "muon"

    def _validate_distillation(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"config key '{key}': {why}")

        if isinstance(self.student_overrides, str):
            try:
                self.student_overrides = json.loads(self.student_overrides) if self.student_overrides else None
            except json.JSONDecodeError as err:
                raise bad("student_overrides", f"not a JSON mapping ({err})") from None
        if self.student_overrides is not None and not isinstance(self.student_overrides, dict):
            raise bad("student_overrides", f"must be a mapping, got {type(self.student_overrides).__name__}")
        if isinstance(self.saddle_escape_config, str):
            try:
                self.saddle_escape_config = json.loads(self.saddle_escape_config) if self.saddle_escape_config else None
            except json.JSONDecodeError as err:
                raise bad("saddle_escape_config", f"not a JSON mapping ({err})") from None
        if self.saddle_escape_config is not None:
            from training.trainers.callbacks import SaddleEscapeConfig

            try:
                SaddleEscapeConfig.from_dict(dict(self.saddle_escape_config))
            except (TypeError, ValueError) as err:
                raise bad("saddle_escape_config", str(err)) from None
        # '~/runs/aligned' means the same folder to every consumer (the loaders do not all expand it themselves).
        for key in PATH_KEYS:
            setattr(self, key, expand(getattr(self, key)))
        if not self.student:
            raise bad("student", "empty; give a variant name ('350M', '500M') or a folder")
        if not os.path.isdir(self.student):
            from hf_retnet import VARIANTS

            if self.student not in VARIANTS:
                if looks_like_local_path(self.student):
                    raise FileNotFoundError(f"config key 'student': folder {self.student!r} does not exist")
                raise bad("student", f"{self.student!r} is neither a variant {sorted(VARIANTS)} nor an existing folder")
        check_student(self.student, self.student_overrides)
        check_output_folder(self.output_dir, "config key 'output_dir':")
        check_local_folder(self.tokenizer, "config key 'tokenizer'")
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, f"must be an integer >= 1, got {value!r}")
        self._check_resume()

        if self.teacher_source not in TEACHER_SOURCES:
            raise bad("teacher_source", f"{self.teacher_source!r} is not one of {TEACHER_SOURCES}")
        if self.teacher_source == "direct":
            if not self.teacher_model:
                raise bad("teacher_model", "required when teacher_source=direct (a Hub id or a folder)")
            if is_gguf_path(self.teacher_model):  # converted once when a loader first needs it
                if not os.path.isfile(os.path.expanduser(self.teacher_model)):
                    raise FileNotFoundError(f"config key 'teacher_model': GGUF file {self.teacher_model!r} does not exist")
            elif looks_like_local_path(self.teacher_model) and not os.path.isdir(os.path.expanduser(self.teacher_model)):
                raise FileNotFoundError(
                    f"config key 'teacher_model': folder {self.teacher_model!r} does not exist; pass an existing "
                    "folder or a Hub id such as 'meta-llama/Llama-3.2-1B-Instruct'"
                )
        if self.teacher_adapter is not None and not os.path.isdir(os.path.expanduser(self.teacher_adapter)):
            raise FileNotFoundError(f"config key 'teacher_adapter': folder {self.teacher_adapter!r} does not exist")
        if self.teacher_source == "cached":
            if not self.teacher_cache:
                raise bad("teacher_cache", "required when teacher_source=cached")
            if not os.path.isdir(os.path.expanduser(self.teacher_cache)):
                raise FileNotFoundError(f"config key 'teacher_cache': folder {self.teacher_cache!r} does not exist")
        if self.teacher_cache_verify not in CACHE_VERIFY:
            raise bad("teacher_cache_verify", f"{self.teacher_cache_verify!r} is not one of {CACHE_VERIFY}")
        if self.teacher_protocol not in ("topk", "openai"):
            raise bad("teacher_protocol", "must be 'topk' or 'openai'")
        if self.teacher_protocol == "openai" and self.teacher_source == "network" and not self.teacher_vocab_size:
            raise bad("teacher_vocab_size", "required with teacher_protocol=openai (a vLLM server does not report it)")
        if not isinstance(self.teacher_retries, int) or self.teacher_retries < 0:
            raise bad("teacher_retries", f"must be an integer >= 0, got {self.teacher_retries!r}")
        if self.teacher_source == "network" and not self.teacher_url:
            raise bad("teacher_url", "required when teacher_source=network (e.g. http://127.0.0.1:8000)")
        if self.full_vocab_kd and self.teacher_source != "direct":
            raise bad("full_vocab_kd", "needs teacher_source=direct (only the direct teacher has full logits)")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise bad("teacher_dtype", f"{self.teacher_dtype!r} is not one of {TEACHER_DTYPES}")
        if self.tokenizer is None and self.teacher_model:
            self.tokenizer = self.teacher_model
        if self.teacher_source == "cached" and self.temperature_start is not None:
            raise bad("temperature_start", "a cache holds log-probs at one temperature; no schedule in cached mode")

        if not isinstance(self.teacher_topk, int) or self.teacher_topk < 1:
            raise bad("teacher_topk", f"must be a positive integer, got {self.teacher_topk!r}")
        for key in ("temperature", "temperature_start"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise bad(key, f"must be > 0, got {value}")
        for key in ("distill_alpha", "distill_alpha_start", "jsd_beta"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value <= 1.0:
                raise bad(key, f"must be in [0, 1], got {value}")
        if self.kd_loss not in KD_LOSSES:
            raise bad("kd_loss", f"{self.kd_loss!r} is not one of {KD_LOSSES}")
        for key in ("temperature_schedule_steps", "alpha_schedule_steps", "reverse_kl_warmup_steps"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be >= 0, got {getattr(self, key)}")
        if not self.diversity_weight >= 0:
            raise bad("diversity_weight", f"must be >= 0, got {self.diversity_weight}")
        if self.loss_chunk_size < 1:
            raise bad("loss_chunk_size", f"must be >= 1, got {self.loss_chunk_size}")
        if not self.muon_learning_rate > 0:
            raise bad("muon_learning_rate", f"must be > 0, got {self.muon_learning_rate}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise bad("muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        if self.muon_adjust_lr_fn not in MUON_ADJUST_LR:
            raise bad("muon_adjust_lr_fn", f"{self.muon_adjust_lr_fn!r} is not one of {MUON_ADJUST_LR}")
        if self.max_seq_length < 2:
            raise bad("max_seq_length", f"must be >= 2 (one input and one next token), got {self.max_seq_length}")
        if self.teacher_source == "cached":
            check_cache_settings(self.teacher_cache, self.max_seq_length)

    def _check_resume(self) -> None:
        """`resume_from_checkpoint`: 'last' (also 'true', 'latest') needs a checkpoint in output_dir; a folder must
        be a complete Trainer checkpoint. Checked here so a typo fails before the models load, naming the folder."""
        resume = self.resume_from_checkpoint
        if resume is None or isinstance(resume, bool):
            return
        resume = str(resume).strip()
        if resume.lower() in ("", "false", "none", "no"):
            self.resume_from_checkpoint = None
            return
        if resume.lower() in ("true", "last", "latest"):
            from transformers.trainer_utils import get_last_checkpoint

            last = get_last_checkpoint(self.output_dir) if os.path.isdir(self.output_dir) else None
            if last is None:
                raise FileNotFoundError(
                    f"config key 'resume_from_checkpoint': {resume!r} resumes from the newest checkpoint-N folder in "
                    f"output_dir {self.output_dir!r}, which has none; leave resume_from_checkpoint out to start fresh"
                )
            check_checkpoint_folder(last, "config key 'resume_from_checkpoint'")
            return
        check_checkpoint_folder(resume, "config key 'resume_from_checkpoint'")

    def alpha_at(self, step: int) -> float:
        """CE weight at optimizer step `step` (linear schedule from distill_alpha_start, then constant)."""
        return _linear(self.distill_alpha_start, self.distill_alpha, step, self.alpha_schedule_steps)

    def temperature_at(self, step: int) -> float:
        """Softening temperature at optimizer step `step`."""
        return _linear(self.temperature_start, self.temperature, step, self.temperature_schedule_steps)

    def kd_loss_at(self, step: int) -> str:
        """KD kind at optimizer step `step` (reverse KL during the warm-up)."""
        return "reverse_kl" if step < self.reverse_kl_warmup_steps else self.kd_loss


def retnet_config_keys() -> set[str]:
    """The names `student_overrides` may set: RetNetConfig's arguments and PretrainedConfig's."""
    import inspect

    from transformers import PretrainedConfig

    from hf_retnet import RetNetConfig

    keys = set()
    for cls in (RetNetConfig, PretrainedConfig):
        keys |= {name for name, p in inspect.signature(cls.__init__).parameters.items()
                 if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return keys


def student_config_from_folder(folder: str, overrides: dict | None = None):
    """The RetNetConfig of a student folder with `overrides` applied through RetNetConfig's constructor, so an
    override is checked exactly like a value in config.json (`setattr` would skip the checks). Refuses a folder
    that holds no RetNet (a Llama teacher passed as the student, a folder without config.json)."""
    from hf_retnet import RetNetConfig

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"config key 'student': folder {folder!r} has no config.json; pass a RetNet checkpoint folder (from "
            "training.train or training.align) or a variant name ('350M', '500M')"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            model_type = json.load(handle).get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"config key 'student': {path} is not a JSON config ({err})") from None
    if model_type != RetNetConfig.model_type:
        raise ValueError(
            f"config key 'student': {folder!r} holds a {model_type!r} model, not a RetNet ({RetNetConfig.model_type!r}); "
            "convert a Llama first (python -m training.align --teacher <folder> --student_out <new folder>) and "
            "pass that folder, or pass a variant name ('350M', '500M')"
        )
    config = RetNetConfig.from_pretrained(folder)
    if not overrides:
        return config
    values = {**config.to_dict(), **overrides}
    if ("hidden_size" in overrides or "num_heads" in overrides) and "head_dim" not in overrides:
        values["head_dim"] = None  # derived from the new hidden_size / num_heads, not the folder's
    try:
        student = RetNetConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config key 'student_overrides': {err} (on top of {path})") from None
    student._name_or_path = config._name_or_path
    return student


def check_student(student: str, overrides: dict | None) -> None:
    """Before any weights load: `student_overrides` names RetNetConfig fields and gives a valid config (RetNetConfig's
    own checks, e.g. num_heads dividing hidden_size), and a folder student holds a RetNet with complete safetensors."""
    from hf_retnet import RetNetConfig

    overrides = dict(overrides or {})
    known = retnet_config_keys()
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else " (see hf_retnet.RetNetConfig)"
            raise ValueError(f"config key 'student_overrides': {key!r} is not a RetNetConfig field{hint}")
    if os.path.isdir(student):
        student_config_from_folder(student, overrides)
        check_weight_files(student, "config key 'student':")
        return
    try:
        RetNetConfig.from_variant(student, **overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config key 'student_overrides': {err}") from None


def check_cache_settings(cache_dir: str | None, max_seq_length: int) -> None:
    """A teacher cache answers only for sequences truncated as it truncated them: its manifest's max_seq_length
    must be the training max_seq_length (a cache built without truncation, max_seq_length null, is not checked
    here; every row is still checked by its hash when read)."""
    path = os.path.join(cache_dir or "", "manifest.json")
    if not cache_dir or not os.path.isfile(path):
        return  # the cached teacher says what is missing
    try:
        with open(path, encoding="utf-8") as handle:
            built = (json.load(handle).get("data") or {}).get("max_seq_length")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return  # the cached teacher reports a damaged manifest
    if built is not None and int(built) != int(max_seq_length):
        raise ValueError(
            f"config key 'max_seq_length': {max_seq_length}, but the teacher cache {cache_dir!r} was built with "
            f"max_seq_length {built} ({path}); train with --max_seq_length {built} or rebuild the cache with "
            f"--max-seq-length {max_seq_length}"
        )


def _linear(start: float | None, end: float, step: int, steps: int) -> float:
    if start is None or steps <= 0 or step >= steps:
        return float(end)
    return float(start + (end - start) * step / steps)


def distillation_field_names() -> list[str]:
    """The fields DistillationConfig adds to TrainingArguments (for docs and tests)."""
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [f.name for f in dataclasses.fields(DistillationConfig) if f.name not in base]


def config_parser(config_class, **kwargs):
    """The command parser (`training.utils.parser.CommandParser`: YAML + `--key value`) over `config_class`."""
    from training.utils.parser import CommandParser

    return CommandParser(config_class, **kwargs)


def load_config(
    yaml_path: str | os.PathLike | None = None, overrides: list[str] | None = None, config_class: type | None = None
):
    """YAML file, then `--key value` overrides -> a validated DistillationConfig (or `config_class`, any
    `TrainingArguments` dataclass, e.g. the teacher finetuning config). The parsing is the one every command uses
    (`training.utils.parser.CommandParser`).

    Raises ValueError naming the key for an unknown key, a malformed override or an out-of-range value, and
    FileNotFoundError for a missing config file or teacher/student folder. Nothing is loaded or written.
    """
    argv = (["--config", os.fspath(yaml_path)] if yaml_path is not None else []) + list(overrides or [])
    prog = "python -m training.train" if config_class in (None, DistillationConfig) else None
    (config,) = config_parser(config_class or DistillationConfig, prog=prog).parse(argv)
    return config

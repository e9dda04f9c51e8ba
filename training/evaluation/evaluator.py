"""Evaluate a distilled RetNet student (and, optionally, its teacher on the same tokens).

    python -m training.evaluate --model runs/tiny --teacher runs/tiny-teacher --data heldout.jsonl
    python -m training.evaluate --model user/retnet-500m --data heldout.jsonl --output runs/eval-500m \
        --lm_eval_tasks examples/lm_eval/tiny_cloze.yaml

Writes `<output or model folder>/eval/report.json`, `eval/report.md` and PNG plots (latency.png, passkey.png).
Sections: `heldout` (token-weighted loss, perplexity, KL(teacher || student), top-1 agreement), `passkey`
(retrieval at several depths and context lengths), `generation` (greedy and sampled samples), `latency` (decoding
time per token and memory, recurrent state vs KV cache) and `lm_eval` (lm-evaluation-harness, with
`--lm_eval_tasks`). From Python: `evaluate(model, teacher=None, data=..., output_dir=..., sections=...)` returns
the report dict. Everything that can be checked before weights load (folders, configs, tokenizers, data) is.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass, field, fields

from training.utils.errors import command

from .generation import DEFAULT_PROMPTS

REPORT_FORMAT = "hf-retnet-eval-report"
REPORT_VERSION = 1
SECTIONS = ("heldout", "passkey", "generation", "latency", "lm_eval")


@dataclass
class EvalConfig:
    """Every knob of an evaluation; the CLI exposes each as `--name`."""

    window: int = field(default=1024, metadata={"help": "held-out: longest window scored at once (tokens)"})
    stride: int = field(default=512, metadata={"help": "held-out: how far a window advances over a long document"})
    max_documents: int | None = field(default=None, metadata={"help": "held-out: evaluate the first N documents"})
    batch_size: int = field(default=1, metadata={"help": "held-out: windows per forward"})
    append_eos: bool = field(default=True, metadata={"help": "held-out: end each text document with EOS, as "
                                                             "training.preprocess does (--no-append_eos: as its "
                                                             "--append_eos false)"})
    passkey_lengths: tuple[int, ...] = field(default=(256, 1024, 4096), metadata={"help": "passkey context lengths"})
    passkey_depths: tuple[float, ...] = field(default=(0.1, 0.5, 0.9), metadata={"help": "passkey depths (0..1)"})
    passkey_trials: int = field(default=3, metadata={"help": "passkey: keys tried per (length, depth) cell"})
    prompts: tuple[str, ...] = field(default=DEFAULT_PROMPTS, metadata={"help": "generation: the fixed prompts"})
    max_new_tokens: int = field(default=40, metadata={"help": "generation: new tokens per sample"})
    temperature: float = field(default=0.8, metadata={"help": "generation: sampling temperature"})
    top_p: float = field(default=0.95, metadata={"help": "generation: nucleus sampling mass"})
    latency_lengths: tuple[int, ...] = field(default=(256, 1024, 4096), metadata={"help": "latency: context lengths"})
    decode_tokens: int = field(default=16, metadata={"help": "latency: tokens decoded per context length"})
    lm_eval_tasks: tuple[str, ...] = field(default=(), metadata={"help": "lm-eval task names or task YAML files"})
    lm_eval_limit: int | None = field(default=None, metadata={"help": "lm-eval: documents per task (all if unset)"})
    lm_eval_batch_size: int = field(default=4, metadata={"help": "lm-eval: batch size"})
    lm_eval_num_fewshot: int | None = field(default=None, metadata={"help": "lm-eval: few-shot examples"})
    seed: int = field(default=0, metadata={"help": "seeds sampling, passkeys and latency inputs"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype: float32, bfloat16, float16 or auto"})
    device: str | None = field(default=None, metadata={"help": "cuda when available, else cpu"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow checkpoints' own modeling code"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self):
        # Messages name the command-line flag (`--window`) and the field (`window=` from Python) alike.
        if self.window < 2:
            raise ValueError(f"--window (window=) must be >= 2 tokens (one input and one next token), got {self.window}")
        for name in ("stride", "batch_size", "passkey_trials", "max_new_tokens", "decode_tokens", "lm_eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} ({name}=) must be >= 1, got {getattr(self, name)}")
        if self.stride >= self.window:
            default = " (its default)" if self.stride == EvalConfig.stride else ""
            raise ValueError(
                f"--stride {self.stride}{default} must be smaller than --window {self.window}: a long document is "
                f"scored in windows of --window tokens advancing by --stride, so --stride must be in [1, "
                f"{self.window - 1}]; pass e.g. --stride {max(1, self.window // 2)}"
            )
        if any(not 0 <= d <= 1 for d in self.passkey_depths):
            raise ValueError(f"--passkey_depths (passkey_depths=) must lie in [0, 1], got {list(self.passkey_depths)}")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"--dtype (dtype=) must be float32, bfloat16, float16 or auto, got {self.dtype!r}")


def _describe(model, spec) -> dict:
    return {
        "name_or_path": spec if isinstance(spec, str) else getattr(model, "name_or_path", "") or type(model).__name__,
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "vocab_size": int(model.config.vocab_size),
    }


def _default_output(model) -> str:
    if isinstance(model, (str, os.PathLike)) and os.path.isdir(model):
        return os.fspath(model)
    raise ValueError("output_dir is required when the model is not a local folder (pass --output DIR)")


def _resolve_sections(sections, data, config: EvalConfig) -> list[str]:
    if sections is None:
        chosen = [s for s in SECTIONS if s != "lm_eval" or config.lm_eval_tasks]
        if data is None:
            chosen.remove("heldout")
        return chosen
    sections = [sections] if isinstance(sections, str) else list(sections)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if "heldout" in sections and data is None:
        raise ValueError("section 'heldout' needs data (--data: JSONL / text / Parquet file or a shard folder)")
    if "lm_eval" in sections and not config.lm_eval_tasks:
        raise ValueError("section 'lm_eval' needs lm_eval_tasks (task names or task YAML files)")
    return [s for s in SECTIONS if s in sections]


def evaluate(model, teacher=None, data=None, output_dir: str | None = None, sections=None,
             config: EvalConfig | None = None, tokenizer=None, teacher_tokenizer=None, **overrides) -> dict:
    """Evaluate `model` (folder, Hub id or a loaded causal LM) and optionally `teacher` (same forms) and return
    the report dict; it is also written to `<output_dir or model folder>/eval/` (report.json, report.md, plots).

    `sections`: any of SECTIONS (default: all that apply; `lm_eval` when tasks are given, `heldout` when data
    is). `config`: an EvalConfig; `overrides` set its fields (e.g. `passkey_lengths=(64, 128)`). Loaded models
    need their tokenizer passed (`tokenizer`, `teacher_tokenizer`) unless their `name_or_path` holds one.
    """
    import torch

    from . import loading

    config = config or EvalConfig()
    if overrides:
        known = {f.name for f in fields(EvalConfig)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"evaluate() got unknown option(s) {bad}; EvalConfig fields: {', '.join(sorted(known))}")
        config = EvalConfig(**{**{f.name: getattr(config, f.name) for f in fields(EvalConfig)}, **overrides})
    chosen = _resolve_sections(sections, data, config)
    out_root = os.fspath(output_dir) if output_dir is not None else _default_output(model)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")

    # -- checks that need no weights: configs, tokenizers, data
    if isinstance(model, (str, os.PathLike)):
        model = os.fspath(model)
        loading.load_model_config(model, "model", config.trust_remote_code)
    if tokenizer is None:
        tokenizer = loading.load_tokenizer(model if isinstance(model, str) else model.name_or_path, "model")
    if isinstance(teacher, (str, os.PathLike)):
        teacher = os.fspath(teacher)
        loading.load_model_config(teacher, "teacher", config.trust_remote_code)
    if teacher is not None:
        if teacher_tokenizer is None:
            teacher_tokenizer = loading.load_tokenizer(
                teacher if isinstance(teacher, str) else teacher.name_or_path, "teacher")
        loading.check_same_tokenizer(
            tokenizer, teacher_tokenizer,
            model if isinstance(model, str) else model.name_or_path,
            teacher if isinstance(teacher, str) else teacher.name_or_path)
    docs = None
    if "heldout" in chosen:
        from .heldout import load_documents

        docs = load_documents(data, tokenizer, config.max_documents, append_eos=config.append_eos)
    if "lm_eval" in chosen:
        from .lm_harness import _require_lm_eval

        _require_lm_eval()

    # -- weights
    load = dict(dtype=config.dtype, device=device, trust_remote_code=config.trust_remote_code)
    student_model = loading.load_causal_lm(model, "model", **load) if isinstance(model, str) else model.eval()
    teacher_model = None
    if teacher is not None:
        teacher_model = loading.load_causal_lm(teacher, "teacher", **load) if isinstance(teacher, str) else teacher.eval()
    models = {"student": student_model, **({"teacher": teacher_model} if teacher_model is not None else {})}
    max_positions = {name: getattr(m.config, "max_position_embeddings", None) if m.config.model_type != "hf_retnet"
                     else None for name, m in models.items()}

    report = {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "student": _describe(student_model, model),
        "teacher": _describe(teacher_model, teacher) if teacher_model is not None else None,
        "sections": chosen,
        "environment": {"device": device, "dtype": config.dtype, "torch": torch.__version__},
        "config": {f.name: getattr(config, f.name) for f in fields(EvalConfig)},
    }
    final = os.path.join(out_root, "eval")
    from training.utils.io import staged_folder

    from .report import render_markdown, write_json

    with staged_folder(final) as stage:
        if "heldout" in chosen:
            from .heldout import make_windows, score, scoring_description

            windows = make_windows(docs, config.window, config.stride)
            result = score(student_model, windows, tokenizer.pad_token_id, teacher=teacher_model,
                           batch_size=config.batch_size, progress=config.progress)
            report["heldout"] = {"data": data if isinstance(data, str) else [os.fspath(d) for d in data],
                                 "scoring": scoring_description(docs, config.window, config.stride), **result}
        if "passkey" in chosen:
            from .passkey import run_passkey
            from .plots import plot_passkey

            report["passkey"] = {name: run_passkey(m, tokenizer, config.passkey_lengths, config.passkey_depths,
                                                   config.passkey_trials, config.seed, max_positions[name],
                                                   config.progress) for name, m in models.items()}
            if plot_passkey(report["passkey"], os.path.join(stage, "passkey.png")):
                report["passkey"]["plot"] = "passkey.png"
        if "generation" in chosen:
            from .generation import generation_samples

            report["generation"] = {"max_new_tokens": config.max_new_tokens, "temperature": config.temperature,
                                    "top_p": config.top_p, "seed": config.seed}
            for name, m in models.items():
                report["generation"][name] = generation_samples(
                    m, tokenizer, config.prompts, config.max_new_tokens, config.seed, config.temperature, config.top_p)
        if "latency" in chosen:
            from .latency import latency_table
            from .plots import plot_latency

            report["latency"] = {"decode_tokens": config.decode_tokens, "device": device}
            for name, m in models.items():
                report["latency"][name] = latency_table(m, config.latency_lengths, config.decode_tokens,
                                                        max_positions[name], config.progress)
            if plot_latency(report["latency"], os.path.join(stage, "latency.png")):
                report["latency"]["plot"] = "latency.png"
        if "lm_eval" in chosen:
            from .lm_harness import run_lm_eval

            report["lm_eval"] = run_lm_eval(
                model if isinstance(model, str) else student_model, config.lm_eval_tasks, device=device,
                batch_size=config.lm_eval_batch_size, limit=config.lm_eval_limit,
                num_fewshot=config.lm_eval_num_fewshot, dtype=config.dtype, tokenizer=tokenizer)
        write_json(os.path.join(stage, "report.json"), report)
        with open(os.path.join(stage, "report.md"), "w", encoding="utf-8") as handle:
            handle.write(render_markdown(report))
    report["output_dir"] = final
    return report


@dataclass
class EvaluateArguments:
    """What `python -m training.evaluate` evaluates and where the report goes (the knobs are EvalConfig's)."""

    model: str = field(metadata={"help": "student folder or Hub id"})
    teacher: str | None = field(default=None, metadata={"help": "teacher folder or Hub id (same tokenizer as the student)"})
    data: list[str] | None = field(default=None, metadata={
        "help": "held-out data: JSONL / Parquet / text files, a folder of them, or a shard folder"})
    output: str | None = field(default=None, metadata={"help": "folder that receives eval/ (default: the model folder)"})
    sections: list[str] | None = field(default=None, metadata={"choices": SECTIONS,
                                                               "help": "sections to run (default: all that apply)"})
    skip: list[str] = field(default_factory=list, metadata={"choices": SECTIONS, "help": "sections to leave out"})


def build_parser():
    from training.utils.parser import CommandParser

    return CommandParser(
        [EvaluateArguments, EvalConfig], prog="python -m training.evaluate",
        description="Evaluate a RetNet student (and its teacher on the same tokens); writes <output>/eval/.")


@command
def main(argv: list[str] | None = None) -> int:
    args, config = build_parser().parse_or_exit(argv)
    sections = args.sections
    if args.skip:
        sections = [s for s in (sections or _resolve_sections(None, args.data, config)) if s not in args.skip]
    data = args.data[0] if args.data and len(args.data) == 1 else args.data
    report = evaluate(args.model, teacher=args.teacher, data=data, output_dir=args.output, sections=sections,
                      config=config)
    print(f"wrote {os.path.join(report['output_dir'], 'report.json')} and report.md")
    held = report.get("heldout")
    if held:
        line = f"student loss {held['student']['loss']:.4f} (ppl {held['student']['perplexity']:.2f})"
        if "teacher" in held:
            a = held["agreement"]
            line += (f", teacher loss {held['teacher']['loss']:.4f}, KL(t||s) {a['kl_teacher_student']:.4f}, "
                     f"top-1 agreement {a['top1_agreement']:.3f}")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

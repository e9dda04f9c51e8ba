"""The whole product in one command: distil a real pretrained Llama into RetNet students and report.

    python -m training.demo --config examples/configs/demo.yaml             # `make demo`: stories260K, CPU
    python -m training.demo --config examples/configs/demo_real.yaml --teacher meta-llama/Llama-3.2-1B-Instruct

Stages (each a function below, each calling the project's own module for its job):
  1. teacher    convert a llama2.c teacher (training.convert_llama2c) or check a folder / Hub id loads;
                split the stories into train and held-out JSONL
  2. shards     training.preprocess: tokenize the training split into shards
  3. finetune   training.finetune_teacher (LoRA), optional; the adapter is kept only if it helps
  4. cache      training.cache_teacher_logits: the teacher's top-k over the shards, once
  5. student:*  one stage per student: teacher-initialized (training.align, then distillation), random-init
                KD, CE only, ... all through training.trainers.distillation.run on the same data and token budget
  6. evaluate   training.evaluate on every student against the teacher, and each student's model card
  7. report     <output_dir>/report.md: table, plots, stories, model card; a summary table in the terminal

Rerunning resumes: a finished stage leaves `<output_dir>/.stages/<stage>.json` (its result, wall time and the
fingerprint of the settings it depends on) and is skipped while those settings are unchanged. Delete the marker
(or the output folder) to redo a stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict

from training.demo.config import DemoConfig, StudentRecipe, load_demo_config
from training.utils.errors import command
from training.utils.io import atomic_write_json, atomic_write_jsonl

BANNER_WIDTH = 78


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _banner(index: int, total: int, title: str) -> None:
    _say()
    _say("=" * BANNER_WIDTH)
    _say(f"[{index}/{total}] {title}")
    _say("=" * BANNER_WIDTH)


def _cpu_seconds() -> float:
    """CPU time of this process and its children: on a shared machine a fairer cost than wall time."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: str, obj) -> None:
    atomic_write_json(path, obj, default=str)


def distilled_teacher(ctx: dict) -> str:
    """The teacher the students learn from: the LoRA-corrected one (merged) when the finetune stage kept it."""
    return (ctx.get("finetune") or {}).get("teacher") or ctx["teacher"]["teacher"]


# ------------------------------------------------------------------------------------------------ stages


def stage_teacher(cfg: DemoConfig, ctx: dict) -> dict:
    """The teacher as something `from_pretrained` loads, and the train / held-out split of the stories."""
    from transformers import AutoConfig

    out = cfg.output_dir
    if cfg.teacher_is_llama2c:
        from training.converters.llama2c import convert_llama2c

        if not cfg.teacher_tokenizer:
            raise ValueError("demo config key 'teacher_tokenizer': a llama2.c teacher needs its tokenizer.bin")
        teacher = os.path.join(out, "teacher")
        convert_llama2c(cfg.teacher, cfg.teacher_tokenizer, teacher, overwrite=True)
        _say(f"converted llama2.c {cfg.teacher} -> {teacher}")
    else:
        from training.converters.gguf import resolve_pretrained

        if cfg.teacher.endswith(".bin"):
            raise FileNotFoundError(f"demo config key 'teacher': llama2.c checkpoint {cfg.teacher!r} does not exist")
        teacher = resolve_pretrained(cfg.teacher)  # a .gguf file: its converted Llama folder (once, then cached)
    tconf = AutoConfig.from_pretrained(teacher)  # a folder or a Hub id: the same from_pretrained path as any model
    records = conversations(cfg, teacher) if cfg.chat else [{"text": t} for t in read_stories(cfg.stories,
                                                                                               cfg.stories_limit)]
    source = "conversations" if cfg.chat else cfg.stories
    if len(records) <= cfg.heldout_stories:
        raise ValueError(
            f"{source}: {len(records)} records, but heldout_stories={cfg.heldout_stories}; leave some to train on"
        )
    train, heldout = records[: -cfg.heldout_stories], records[-cfg.heldout_stories :]
    data = os.path.join(out, "data")
    paths = {}
    for name, part in (("train", train), ("heldout", heldout)):
        paths[name] = os.path.join(data, f"{name}.jsonl")
        atomic_write_jsonl(paths[name], part)
    _say(f"{'conversations' if cfg.chat else 'stories'}: {len(train)} train, {len(heldout)} held out -> {data}")
    return {
        "teacher": os.path.abspath(teacher) if os.path.isdir(teacher) else teacher,
        "vocab_size": int(tconf.vocab_size),
        "teacher_config": {k: getattr(tconf, k, None) for k in
                           ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                            "intermediate_size", "vocab_size", "max_position_embeddings")},
        "train_data": os.path.abspath(paths["train"]),
        "heldout_data": os.path.abspath(paths["heldout"]),
        "num_train": len(train),
        "num_heldout": len(heldout),
    }


def conversations(cfg: DemoConfig, teacher: str) -> list[dict]:
    """Chat records the teacher writes itself (training.synthesize, Magpie-style): requests and answers. Resumable:
    a rerun continues the same file."""
    from training.teachers.synthesize import SynthesizeArguments, synthesize

    path = os.path.join(cfg.output_dir, "data", "conversations.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    settings = {"seed": cfg.seed, **cfg.synthesize}
    # The teacher as the config names it (a .gguf file converts to the same cached folder as `teacher`).
    synthesize(SynthesizeArguments(model=cfg.teacher, output=path, **settings))
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_stories(spec: str, limit: int | None = None) -> list[str]:
    """Records of `spec`: blank-line separated paragraphs of a text file, 'text' fields of JSONL, or a datasets id."""
    if os.path.isfile(spec):
        if spec.endswith((".jsonl", ".json")):
            with open(spec, encoding="utf-8") as handle:
                texts = [json.loads(line)["text"] for line in handle if line.strip()]
        else:
            with open(spec, encoding="utf-8") as handle:
                texts = [p.strip() for p in handle.read().split("\n\n")]
    elif os.path.exists(spec) or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"demo config key 'stories': {spec!r} is not a readable file")
    else:
        import datasets

        name, _, split = spec.partition(":")
        ds = datasets.load_dataset(name, split=(split or "train") + (f"[:{limit}]" if limit else ""))
        texts = list(ds["text"])
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise ValueError(f"demo config key 'stories': {spec!r} holds no text")
    return texts[:limit] if limit else texts


def stage_shards(cfg: DemoConfig, ctx: dict) -> dict:
    from training.data.preprocess import preprocess

    t = ctx["teacher"]
    out = os.path.join(cfg.output_dir, "data", "train_shards")
    manifest = preprocess([t["train_data"]], out, t["teacher"], max_seq_length=cfg.max_seq_length, pack=cfg.pack,
                          append_eos=cfg.append_eos, overwrite=True)
    totals = manifest["totals"]
    _say(f"shards: {totals['num_sequences']} sequences, {totals['num_tokens']} tokens -> {out}")
    return {"shards": os.path.abspath(out), "num_tokens": int(totals["num_tokens"]),
            "num_sequences": int(totals["num_sequences"])}


def stage_finetune(cfg: DemoConfig, ctx: dict) -> dict:
    """Teacher correction: LoRA on the training split; keep the adapter only if the held-out loss falls."""
    if not cfg.finetune_teacher:
        _say("skipped: finetune_teacher is false in the config (set it true to try a LoRA teacher correction)")
        return {"adapter": None, "skipped": "disabled"}
    from training.trainers.teacher_sft import TeacherFinetuneConfig, run

    t = ctx["teacher"]
    settings = dict(
        teacher_model=t["teacher"], train_data=t["train_data"], eval_data=t["heldout_data"],
        output_dir=os.path.join(cfg.output_dir, "teacher_ft"), report_to="none", seed=cfg.seed,
        max_length=cfg.max_seq_length, save_merged=True,
    )
    settings.update(cfg.finetune)
    result = run(TeacherFinetuneConfig(**settings))
    helps = result["eval_loss_after"] < result["eval_loss_before"]
    _say(f"teacher held-out loss {result['eval_loss_before']:.4f} -> {result['eval_loss_after']:.4f}: "
         + ("keeping the adapter" if helps else "no gain, distilling from the base teacher"))
    # The merged model is a plain Llama folder: every later stage (cache, alignment, evaluation) loads it as is.
    return {"teacher": result["merged"] if helps else None, "adapter": result["adapter"] if helps else None,
            **{k: result[k] for k in ("eval_loss_before", "eval_loss_after")}}


def stage_cache(cfg: DemoConfig, ctx: dict) -> dict:
    import torch

    from training.teachers.cache.build import main as cache_main

    t, out = ctx["teacher"], os.path.join(cfg.output_dir, "cache")
    argv = ["--teacher", distilled_teacher(ctx), "--data", ctx["shards"]["shards"], "--output", out,
            "--topk", str(cfg.teacher_topk), "--max-seq-length", str(cfg.max_seq_length),
            "--encoding", cfg.cache_encoding, "--batch-size", "16",
            "--dtype", "auto" if torch.cuda.is_available() else "float32"]
    code = cache_main(argv)
    if code:
        raise RuntimeError(f"training.cache_teacher_logits exited with {code}")
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as handle:
        totals = json.load(handle)["totals"]
    return {"cache": os.path.abspath(out), "bytes_per_token": totals["bytes_per_token"],
            "teacher": distilled_teacher(ctx)}


def distillation_settings(cfg: DemoConfig, ctx: dict, recipe: StudentRecipe, output_dir: str) -> dict:
    """The DistillationConfig of one student: the demo's data, cache and teacher, `train`, then the recipe's keys."""
    import torch

    t = ctx["teacher"]
    overrides = {"vocab_size": t["vocab_size"], **(cfg.student_overrides or {})}
    settings = dict(
        student=cfg.student, student_overrides=overrides,
        teacher_source="cached", teacher_cache=ctx["cache"]["cache"], tokenizer=t["teacher"],
        teacher_topk=cfg.teacher_topk, train_data=ctx["shards"]["shards"], max_seq_length=cfg.max_seq_length,
        output_dir=output_dir, seed=cfg.seed, data_seed=cfg.seed, report_to="none", save_strategy="no",
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    settings.update(cfg.train)
    settings.update(recipe.train)
    return settings


def scoring_window(cfg: DemoConfig) -> tuple[int, int]:
    """(window, stride) of held-out scoring: stories up to max_seq_length whole, longer ones in windows overlapping
    by half."""
    return cfg.max_seq_length, max(1, cfg.max_seq_length // 2)


def heldout_curve(cfg: DemoConfig, ctx: dict, offset_tokens: int):
    """A callback that scores the student on the first `curve_stories` held-out stories every `curve_every`
    optimizer steps (and before the first): the report's loss-against-tokens curve, on text no student trains on."""
    from transformers import AutoTokenizer, TrainerCallback

    from training.evaluation.heldout import load_documents, make_windows, score

    tokenizer = AutoTokenizer.from_pretrained(ctx["teacher"]["teacher"])
    docs = load_documents(ctx["teacher"]["heldout_data"], tokenizer, cfg.curve_stories, append_eos=cfg.append_eos)
    windows = make_windows(docs, *scoring_window(cfg))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    class HeldoutCurve(TrainerCallback):
        def __init__(self):
            self.points: list[dict] = []  # {"step", "tokens", "loss"}

        def _measure(self, state, model):
            was_training = model.training
            model.eval()
            loss = score(model, windows, pad_id, batch_size=16, progress=False)["student"]["loss"]
            model.train(was_training)
            self.points.append({"step": state.global_step, "loss": loss,
                                "tokens": offset_tokens + int(state.num_input_tokens_seen or 0)})

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                self._measure(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % cfg.curve_every == 0 or state.global_step == state.max_steps:
                self._measure(state, model)

    return HeldoutCurve()


def stage_student(cfg: DemoConfig, ctx: dict, recipe: StudentRecipe) -> dict:
    from training.trainers.distillation_config import DistillationConfig
    from training.trainers.distillation import run as train_run

    out = os.path.join(cfg.output_dir, "students", recipe.name)
    settings = distillation_settings(cfg, ctx, recipe, out)
    align_tokens, align_error = 0, None
    if recipe.init == "teacher":
        from training.trainers.alignment import AlignConfig
        from training.trainers.alignment import run as align_run

        t = ctx["teacher"]
        aligned = os.path.join(out, "aligned")
        import torch

        align_settings = dict(teacher=distilled_teacher(ctx), student_out=aligned, data=ctx["shards"]["shards"],
                              eval_data=t["heldout_data"], max_seq_length=cfg.max_seq_length, seed=cfg.seed,
                              device="cuda" if torch.cuda.is_available() else "cpu")
        align_settings.update(recipe.align)
        report = align_run(AlignConfig(**align_settings))
        align_tokens = int(report.get("tokens", align_settings.get("max_tokens", 0)) or 0)
        align_error = {"at_conversion": report.get("error_at_conversion"), "after": report.get("error_after")}
        settings["student"] = aligned
        settings["student_overrides"] = None  # the aligned folder holds the teacher's shape
    config = DistillationConfig(**settings)
    curve = heldout_curve(cfg, ctx, align_tokens)
    trainer = train_run(config, callbacks=[curve])
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    return {"path": os.path.abspath(out), "init": recipe.init, "distill_tokens": tokens, "align_tokens": align_tokens,
            "tokens": tokens + align_tokens, "align_error": align_error, "steps": trainer.state.global_step,
            "heldout_curve": curve.points, "distill_alpha": config.distill_alpha, "description": recipe.description,
            "parameters": sum(p.numel() for p in trainer.model.parameters())}


def stage_evaluate(cfg: DemoConfig, ctx: dict) -> dict:
    """`training.evaluate` on every student against the teacher (same held-out tokens), then each student's model
    card."""
    from training.hub.model_card import write_card

    from training.evaluation.evaluator import evaluate as run_evaluate

    t = ctx["teacher"]
    students = ctx["students"]
    heldout = t["heldout_data"]
    window, stride = scoring_window(cfg)
    options = dict(window=window, stride=stride, max_documents=cfg.eval_stories, prompts=tuple(cfg.prompts),
                   append_eos=cfg.append_eos)
    models, plots = {}, {}
    for name, r in students.items():
        recipe = next(x for x in cfg.students if x.name == name)
        extra = {**cfg.eval, **recipe.eval}
        sections = extra.pop("sections", None)
        settings = {**options, **{k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()}}
        report = run_evaluate(r["path"], teacher=distilled_teacher(ctx), data=heldout, output_dir=r["path"],
                              sections=sections, **settings)
        held, passkey = report.get("heldout") or {}, report.get("passkey") or {}
        agreement = held.get("agreement") or {}
        for who, key in (("teacher", "teacher"), (name, "student")):
            if who == "teacher" and "teacher" in models:
                continue
            scores = held.get(key) or {}
            models[who] = {
                "loss": scores.get("loss"), "perplexity": scores.get("perplexity"), "tokens_scored": scores.get("tokens"),
                "kl": agreement.get("kl_teacher_student", 0.0) if key == "student" else 0.0,
                "top1": agreement.get("top1_agreement", 1.0) if key == "student" else 1.0,
                "passkey": (passkey.get(key) or {}).get("accuracy"),
            }
        latency = report.get("latency") or {}
        if latency.get("plot"):
            plots[name] = {"latency": os.path.join(report["output_dir"], latency["plot"]),
                           "latency_rows": {who: latency[who]["rows"] for who in ("student", "teacher")
                                            if who in latency}}
        write_card(r["path"])
    return {"models": models, "plots": plots}


def stage_report(cfg: DemoConfig, ctx: dict) -> dict:
    from training.demo.report import write_report

    return write_report(cfg, ctx)


# ------------------------------------------------------------------------------------------------ pipeline


def plan(cfg: DemoConfig) -> list[tuple[str, str, object, dict]]:
    """(key, title, function, settings it depends on) for every stage, in order."""
    base = {"teacher": cfg.teacher, "teacher_tokenizer": cfg.teacher_tokenizer, "stories": cfg.stories,
            "stories_limit": cfg.stories_limit, "heldout_stories": cfg.heldout_stories, "synthesize": cfg.synthesize}
    shards = {**base, "max_seq_length": cfg.max_seq_length, "pack": cfg.pack, "append_eos": cfg.append_eos}
    finetune = {**shards, "finetune_teacher": cfg.finetune_teacher, "finetune": cfg.finetune}
    cache = {**finetune, "topk": cfg.teacher_topk, "encoding": cfg.cache_encoding}
    stages = [
        ("teacher", "teacher: convert / load it, split the stories", stage_teacher, base),
        ("shards", "shards: tokenize the training stories (training.preprocess)", stage_shards, shards),
        ("finetune", "finetune: LoRA teacher correction (training.finetune_teacher, optional)", stage_finetune,
         finetune),
        ("cache", "cache: the teacher's top-k over the shards (training.cache_teacher_logits)", stage_cache, cache),
    ]
    student_deps = {}
    for r in cfg.students:
        deps = {**cache, "recipe": asdict(r), "student": cfg.student, "student_overrides": cfg.student_overrides,
                "train": cfg.train, "seed": cfg.seed, "curve": [cfg.curve_stories, cfg.curve_every]}
        student_deps[r.name] = deps
        kind = "teacher-initialized (align, then distil)" if r.init == "teacher" else "random init"
        stages.append((f"student:{r.name}", f"student {r.name}: {r.description or kind}",
                       lambda c, x, r=r: stage_student(c, x, r), deps))
    evaluate = {"students": student_deps, "eval_stories": cfg.eval_stories, "eval": cfg.eval,
                "recipe_eval": {r.name: r.eval for r in cfg.students},
                "append_eos": cfg.append_eos}
    stages.append(("evaluate", "evaluate: teacher and students on the held-out stories", stage_evaluate, evaluate))
    stages.append(("report", "report: report.md, plots, stories, model card", stage_report,
                   {**evaluate, "prompts": cfg.prompts, "sample_tokens": cfg.sample_tokens,
                    "chat_requests": cfg.chat_requests}))
    return stages


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or resume) every stage; returns the context: each stage's result by key, and the timings."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    os.makedirs(cfg.output_dir, exist_ok=True)
    markers = os.path.join(cfg.output_dir, ".stages")
    stages = plan(cfg)
    ctx: dict = {"students": {}, "timings": {}, "cpu_seconds": {}}
    started = time.perf_counter()
    for i, (key, title, fn, deps) in enumerate(stages, 1):
        _banner(i, len(stages), title)
        marker = os.path.join(markers, key.replace(":", "__") + ".json")
        fp = _fingerprint(deps)
        done = None
        if os.path.isfile(marker):
            with open(marker, encoding="utf-8") as handle:
                done = json.load(handle)
            if done.get("fingerprint") != fp:
                _say("settings changed since this stage finished: running it again")
                done = None
        if done is not None:
            result, seconds, cpu = done["result"], done["seconds"], done.get("cpu_seconds", 0.0)
            _say(f"done earlier ({seconds:.1f} s); delete {marker} to redo it")
        else:
            t0, c0 = time.perf_counter(), _cpu_seconds()
            result = fn(cfg, ctx)
            seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            _write_json(marker, {"stage": key, "fingerprint": fp, "seconds": seconds, "cpu_seconds": cpu,
                                 "result": result})
            _say(f"finished in {seconds:.1f} s ({cpu:.1f} CPU s)")
        ctx["timings"][key] = seconds
        ctx["cpu_seconds"][key] = cpu
        if key.startswith("student:"):
            ctx["students"][key.split(":", 1)[1]] = result
        else:
            ctx[key] = result
    ctx["total_seconds"] = time.perf_counter() - started
    from training.demo.report import print_summary

    print_summary(cfg, ctx)
    return ctx


@command
def main(argv: list[str] | None = None) -> int:
    from training.demo.config import DEFAULT_CONFIG, build_parser

    argv = sys.argv[1:] if argv is None else list(argv)
    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv) and "-h" not in argv and "--help" not in argv:
        argv = ["--config", DEFAULT_CONFIG, *argv]
    (cfg,) = build_parser().parse(argv)  # a bad key: one `error:` line (@command)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_demo(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The student's model card, generated from what a run leaves behind: config.json (architecture), the weights
(parameter count), trainer_state.json (steps, losses, tokens), training_config.json (the recipe, when the run
saved it) and eval/report.json (the evaluation table and latency plot). The template is `retnet_student.md`
in the `model_cards` folder (data only, no code); every `${...}` in it is filled, and the result is checked for
leftover placeholders.

    python -m training.model_card <run dir> [--repo_id user/name] [--base_model meta-llama/...] [--license ...]
"""

from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass, field

import yaml

from training.evaluation.report import markdown_table
from training.hub.teacher import describe_teacher, is_hub_id, teacher_text
from training.utils.errors import command
from training.utils.io import atomic_write_text


def _table(header, rows) -> str:
    return "\n".join(markdown_table(header, rows))

# The template ships as package data of `model_cards` (installed beside `training`); found by path, not imported.
TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "model_cards",
                        "retnet_student.md")
PROJECT_NAME = "hf-retnet"
CARD_NAME = "README.md"
# What reads as an unfilled placeholder on a published card.
PLACEHOLDER_RE = re.compile(r"\{\{|\}\}|\$\{|\bTODO\b|\bFIXME\b|\bTBD\b|<[A-Za-z_][^<>\n]*>")
RECIPE_KEYS = (
    "student", "student_overrides", "teacher_model", "teacher_adapter", "teacher_source", "teacher_topk", "kd_loss",
    "distill_alpha", "temperature", "train_data", "eval_data", "max_seq_length", "max_steps", "num_train_epochs",
    "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "muon_learning_rate", "optim",
    "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "bf16", "fp16", "seed",
)


def find_placeholders(text: str) -> list[str]:
    """Every substring of `text` that looks like an unfilled template slot or a to-do marker."""
    return [m.group(0) for m in PLACEHOLDER_RE.finditer(text)]


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e


def count_parameters(run_dir: str) -> int:
    """Parameters stored in the run's safetensors files (shared tensors, e.g. tied embeddings, counted once)."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(run_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no .safetensors weights; is this a finished training.train output_dir?")
    total = 0
    for name in files:
        with safe_open(os.path.join(run_dir, name), framework="pt") as handle:
            for key in handle.keys():
                n = 1
                for dim in handle.get_slice(key).get_shape():
                    n *= dim
                total += n
    return total


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}{unit}"
    return f"{int(n)}{unit}"


def _bytes(n: float) -> str:
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{int(n)} bytes"


def state_bytes(config: dict) -> int:
    """Bytes of decoding state one sequence carries, whatever the context length: what `RetNetCache` holds for a
    batch of one (`RetNetCache.nbytes()`), computed from config.json. Per layer and k/v head (grouped heads share
    one state, `num_kv_heads`): the fp32 retention matrix [d_k, d_v] (d_v + 1 columns with
    `retention_score_normalization`); a hybrid (`attention_window` W > 0, plus `attention_sinks` S where the model
    has them) adds S + W fp32 keys [d_k] and values [d_v]; one bool per window slot marks which hold a token; one
    int64 counts the tokens read (the next position), and with sinks one more counts the current document's tokens.
    d_k = `head_dim` (default hidden_size / num_heads), d_v = `value_head_dim` (default value_factor * d_k)."""
    layers, heads = config["num_hidden_layers"], config["num_heads"]
    kv_heads = config.get("num_kv_heads") or heads
    d_k = config.get("head_dim") or config["hidden_size"] // heads
    d_v = config.get("value_head_dim") or d_k * config.get("value_factor", 2)
    state = d_k * (d_v + (1 if config.get("retention_score_normalization") else 0))
    window = config.get("attention_window") or 0
    sinks = (config.get("attention_sinks") or 0) if window else 0
    fp32, int64 = 4, 8
    per_layer = kv_heads * (state + (window + sinks) * (d_k + d_v)) * fp32
    return layers * per_layer + window + int64 + (int64 if sinks else 0)  # + window slot flags, position, doc tokens


def _git_remote(root: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", root, "remote", "get-url", "origin"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def normalize_git_url(url: str | None) -> str | None:
    """A git remote as a public https URL without credentials or `.git` (`git@github.com:o/r.git` ->
    `https://github.com/o/r`); None for a local path or anything unrecognised."""
    if not url:
        return None
    url = url.strip()
    scp = re.match(r"^(?:[\w.-]+@)?([\w.-]+\.[A-Za-z]{2,}):(?!//)(.+)$", url)  # git@host:owner/repo.git
    if scp:
        host, path = scp.group(1), scp.group(2)
    else:
        parsed = re.match(r"^(?:https?|ssh|git|git\+ssh)://(?:[^@/]*@)?([^/:]+)(?::\d+)?/(.+)$", url)
        if not parsed:
            return None
        host, path = parsed.group(1), parsed.group(2)
    path = path.strip("/")
    if path.endswith(".git"):
        path = path[:-4]
    if not path or "/" not in path:
        return None
    return f"https://{host}/{path}"


def project_url() -> str | None:
    """This project's repository URL, from the git metadata of the checkout the code runs from (`git remote get-url
    origin`, as https); None when there is no checkout or no origin (then the card links nothing)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return normalize_git_url(_git_remote(root))


def architecture_text(config: dict) -> str:
    """The architecture paragraph, from what config.json says this model is."""
    decays = config.get("retention_decays")
    if decays:
        per = "per layer and head" if isinstance(decays[0], list) else "per head"
        decay = (f"decays {per} chosen for this model rather than RetNet's fixed schedule (`retention_decays` in "
                 "config.json: set at conversion from the teacher and/or learned in training)")
    else:
        decay = "fixed per-head decay gamma_h = 1 - 2^(-5-h)"
    heads, kv = config.get("num_heads"), config.get("num_kv_heads") or config.get("num_heads")
    parts = [f"multi-scale retention with {decay}"]
    if kv and heads and kv < heads:
        parts.append(f"grouped k/v heads ({heads} query heads read {kv} shared states)")
    parts.append("rotary relative positions")
    parts.append("per-head RMS normalisation" + ("" if config.get("group_norm_affine", True) else " without a learned scale"))
    parts.append("a swish output gate" if config.get("use_output_gate", True) else "no output gate")
    act = config.get("hidden_act", "silu")
    parts.append("a SwiGLU feed-forward block" if act == "silu" else f"a gated feed-forward block ({act})")
    text = ("Retention after Sun et al. (2023), *Retentive Network: A Successor to Transformer for Large Language "
            "Models* (arXiv:2307.08621): " + ", ".join(parts[:-1]) + " and " + parts[-1] + ".")
    window = config.get("attention_window") or 0
    if window:
        text += (f" Every layer is a hybrid: exact softmax attention over the last {window} tokens plus retention over "
                 "the tokens that have left that window.")
    return text


def install_text(url: str | None) -> str:
    where = (f"from its repository (`pip install \"git+{url}\"`)" if url else
             "from a clone of its repository (`pip install -e .` in the clone)")
    return (f"With the hf-retnet code installed {where}; it is not published on PyPI. The model type is then "
            "registered and no remote code runs")


def public(value):
    """A value as shown on a public card: local absolute paths shortened to their last component (a card should
    not publish the trainer's file system), Hub ids and relative paths unchanged."""
    if isinstance(value, str) and os.path.isabs(value):
        return os.path.basename(value.rstrip("/")) or value
    if isinstance(value, list):
        return [public(v) for v in value]
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items()}
    return value


def _evaluation_section(report: dict | None) -> str:
    if not report:
        return ("This run has no evaluation report (eval/report.json), so no quality numbers are claimed here; "
                "`python -m training.evaluate --model` with the run folder writes one.")
    parts = []
    held = report.get("heldout")
    if held:
        rows = [["student", held["student"]["loss"], held["student"]["perplexity"], held["student"]["tokens"]]]
        if "teacher" in held:
            rows.append(["teacher", held["teacher"]["loss"], held["teacher"]["perplexity"], held["teacher"]["tokens"]])
        data = held["data"] if isinstance(held["data"], str) else ", ".join(held["data"])
        parts.append(f"Held-out next-token loss on `{os.path.basename(str(data).rstrip('/')) or data}` "
                     f"({held['scoring']['text']}):\n\n" + _table(["model", "loss (nats/token)", "perplexity", "tokens"], rows))
        if "agreement" in held:
            a = held["agreement"]
            parts.append("Agreement with the teacher on the same tokens:\n\n" + _table(
                ["KL(teacher ‖ student) per token", "top-1 agreement"], [[a["kl_teacher_student"], a["top1_agreement"]]]))
    passkey = report.get("passkey")
    if passkey:
        rows = []
        for name in ("student", "teacher"):
            cells = (passkey.get(name) or {}).get("cells", [])
            for length in sorted({c["context_length"] for c in cells}):
                accs = [c["accuracy"] for c in cells if c["context_length"] == length]
                rows.append([name, length, sum(accs) / len(accs)])
        if rows:
            parts.append("Passkey retrieval (a 5-digit key hidden at several depths of filler text; mean accuracy "
                         "over depths):\n\n" + _table(["model", "context length", "accuracy"], rows))
    lm = report.get("lm_eval")
    if lm and lm.get("tasks"):
        rows = []
        for task, metrics in lm["tasks"].items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "," in metric \
                        and "stderr" not in metric:
                    rows.append([task, metric.split(",")[0], value])
        parts.append("lm-evaluation-harness:\n\n" + _table(["task", "metric", "value"], rows))
    lat = report.get("latency")
    if lat:
        rows = []
        for name in ("student", "teacher"):
            for r in (lat.get(name) or {}).get("rows", []):
                rows.append([name, r["context_length"], r["ms_per_token"], _bytes(r["cache_bytes"])])
        if rows:
            parts.append(f"Decoding cost per token after a context of the given length (median of "
                         f"{lat['decode_tokens']} steps on {lat['device']}; memory carried between steps: recurrent "
                         "state for the student, KV cache for the teacher):\n\n"
                         + _table(["model", "context", "ms/token", "state / cache"], rows))
        if lat.get("plot"):
            parts.append(f"![Decoding latency and memory against context length](eval/{lat['plot']})")
    return "\n\n".join(parts)


def _describe_data(spec) -> str:
    """`name`, with its sequence and token counts when it is a shard folder (training.preprocess manifest) here."""
    text = f"`{public(spec)}`"
    manifest = _read_json(os.path.join(str(spec), "manifest.json")) if os.path.isdir(str(spec)) else None
    totals = (manifest or {}).get("totals") or {}
    if totals.get("num_tokens"):
        text += f" ({totals.get('num_sequences', 0):,} sequences, {totals['num_tokens']:,} tokens)"
    return text


def _training_section(state: dict | None, recipe: dict | None, teacher: dict | None = None) -> tuple[str, str]:
    recipe = recipe or {}
    rows = []
    if teacher and recipe:
        rows.append(["teacher", teacher_text(teacher) + (f" (teacher_source: {recipe['teacher_source']})"
                                                         if recipe.get("teacher_source") else "")])
    if recipe.get("kd_loss"):
        rows.append(["objective", f"{recipe.get('distill_alpha')} × CE + (1 − {recipe.get('distill_alpha')}) × "
                                  f"{recipe['kd_loss']} on the teacher's top-{recipe.get('teacher_topk')} "
                                  f"(temperature {recipe.get('temperature')})"])
    if recipe.get("train_data"):
        data = recipe["train_data"]
        rows.append(["training data", ", ".join(_describe_data(d) for d in (data if isinstance(data, list) else [data]))])
    if state:
        steps = state.get("global_step")
        rows.append(["optimizer steps", steps])
        seen = state.get("num_input_tokens_seen")
        if seen:
            rows.append(["tokens seen", f"{seen:,}"])
        elif recipe.get("max_seq_length") and steps:
            per_step = (recipe.get("per_device_train_batch_size") or state.get("train_batch_size") or 0) * \
                (recipe.get("gradient_accumulation_steps") or 1)
            if per_step:
                rows.append(["tokens seen (upper bound)", f"{steps * per_step * recipe['max_seq_length']:,} per process "
                             f"({steps} steps × {per_step} sequences × {recipe['max_seq_length']} tokens)"])
        losses = [h for h in state.get("log_history", []) if "loss" in h]
        if losses:
            last = losses[-1]
            text = f"{last['loss']:.4f} at step {last.get('step')}"
            if "loss/ce" in last and "loss/kd" in last:
                text += f" (CE {last['loss/ce']:.4f}, KD {last['loss/kd']:.4f})"
            rows.append(["final training loss", text])
    if recipe.get("optim"):
        text = f"{recipe['optim']}, learning rate {recipe.get('learning_rate')}"
        if recipe["optim"] == "muon" and recipe.get("muon_learning_rate") is not None:
            text = (f"Muon on the hidden matrices (learning rate {recipe['muon_learning_rate']}), AdamW on the rest "
                    f"(learning rate {recipe.get('learning_rate')})")
        rows.append(["optimizer", text])
    intro = (f"Distilled with `python -m training.train` from hf-retnet: the student learns the teacher's next-token "
             f"distribution at every position of the training sequences.")
    if not recipe:
        intro += " This run did not save its training configuration (training_config.json), so the recipe below is empty."
    return intro, _table(["", ""], [[k, v] for k, v in rows]) if rows else ""


def build_card(run_dir: str, repo_id: str | None = None, base_model: str | None = None, license: str | None = None,
               datasets: list[str] | None = None, title: str | None = None) -> str:
    """The filled model card (Markdown with a YAML metadata header) for the run in `run_dir`."""
    run_dir = os.fspath(run_dir)
    config = _read_json(os.path.join(run_dir, "config.json"))
    if config is None:
        raise FileNotFoundError(f"{run_dir}: no config.json; pass a finished training.train output_dir")
    state = _read_json(os.path.join(run_dir, "trainer_state.json"))
    recipe = _read_json(os.path.join(run_dir, "training_config.json"))
    report = _read_json(os.path.join(run_dir, "eval", "report.json"))
    repo_id = repo_id or os.path.basename(os.path.abspath(run_dir))
    # A Hub id names itself; otherwise what training.train recorded while the teacher folder was at hand, else what
    # the folder (still) says.
    teacher = (recipe or {}).get("teacher_model") or ((report or {}).get("teacher") or {}).get("name_or_path")
    identity = None if is_hub_id(teacher) else (recipe or {}).get("teacher_identity")
    if not identity:
        identity = describe_teacher(teacher)
        if identity is not None:
            identity["adapter"] = bool((recipe or {}).get("teacher_adapter"))
    base_model = base_model or ((identity or {}).get("hub_id") if identity else None)
    if datasets is None:
        data = (recipe or {}).get("train_data")
        datasets = [d.split(":")[0] for d in (data if isinstance(data, list) else [data]) if is_hub_id(str(d).split(":")[0])]

    meta = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    if base_model:
        meta["base_model"] = base_model
    if license:
        meta["license"] = license
    meta["tags"] = ["retnet", "hf-retnet", "distillation", "knowledge-distillation", "recurrent", "custom_code"]
    if datasets:
        meta["datasets"] = list(datasets)

    n_params = count_parameters(run_dir)
    arch_rows = [
        ["architecture", f"{config.get('architectures', ['RetNetForCausalLM'])[0]} (model_type `{config.get('model_type')}`)"],
        ["parameters", f"{n_params:,} ({_human(n_params)})"],
        ["layers", config.get("num_hidden_layers")], ["hidden size", config.get("hidden_size")],
        ["retention heads", config.get("num_heads")],
        *([["k/v heads (one state each)", config["num_kv_heads"]]]
          if config.get("num_kv_heads") and config["num_kv_heads"] != config.get("num_heads") else []),
        *([["attention window (hybrid)", f"{config['attention_window']} tokens"]]
          if config.get("attention_window") else []),
        ["FFN size", config.get("intermediate_size")],
        ["vocabulary", config.get("vocab_size")], ["chunk size (chunkwise form)", config.get("chunk_size")],
        ["tied embeddings", config.get("tie_word_embeddings")],
        ["recurrent state", f"{_bytes(state_bytes(config))} fp32 per sequence, whatever the context length"],
    ]
    recipe_view = {k: public(recipe[k]) for k in RECIPE_KEYS if recipe and recipe.get(k) not in (None, "", [], {})}
    if recipe_view.get("max_steps", -1) > 0:
        recipe_view.pop("num_train_epochs", None)  # max_steps decides the length
    else:
        recipe_view.pop("max_steps", None)
    intro, train_table = _training_section(state, recipe, identity)
    if base_model and not (identity or {}).get("hub_id"):
        identity = {**(identity or {}), "name": base_model, "hub_id": base_model}
    url = project_url()
    held = (report or {}).get("heldout")
    values = {
        "metadata": yaml.safe_dump(meta, sort_keys=False).strip(),
        "title": title or repo_id.split("/")[-1],
        "num_parameters": _human(n_params),
        "teacher_text": teacher_text(identity),
        "project_link": f"[{PROJECT_NAME}]({url})" if url else PROJECT_NAME,
        "state_size": _bytes(state_bytes(config)),
        "architecture_text": architecture_text(config),
        "install_text": install_text(url),
        "decay_rates": "per-head rates set for this model" if config.get("retention_decays") else "fixed per-head rates",
        "architecture_table": "\n".join(_table(["", ""], arch_rows).splitlines()[2:]),
        "repo_id": repo_id,
        "training_text": intro,
        "training_table": train_table,
        "recipe_yaml": yaml.safe_dump(recipe_view, sort_keys=False).strip() if recipe_view else "# not saved by this run",
        "loss_curves": "![Training losses](loss_curves.png)" if os.path.isfile(os.path.join(run_dir, "loss_curves.png")) else "",
        "evaluation": _evaluation_section(report),
        "data_limit": (f" (held-out loss on {held['student']['tokens']:,} tokens)" if held else ""),
        "license_note": f"; this card declares `{license}`" if license else "",
    }
    card = string.Template(open(TEMPLATE, encoding="utf-8").read()).substitute(values)
    card = re.sub(r"\n{3,}", "\n\n", card)
    left = find_placeholders(card)
    if left:
        raise ValueError(f"model card for {run_dir} still has placeholders {left[:5]}; fill them before publishing")
    return card


def write_card(run_dir: str, path: str | None = None, **kwargs) -> str:
    """Write the card to `path` (default `<run_dir>/README.md`) atomically and return the path."""
    card = build_card(run_dir, **kwargs)
    return atomic_write_text(path or os.path.join(run_dir, CARD_NAME), card)


@dataclass
class ModelCardArguments:
    """`python -m training.model_card RUN_DIR`: every field is a flag (or positional) and a YAML key."""

    run_dir: str = field(metadata={"positional": True, "help": "a finished training.train output_dir"})
    repo_id: str | None = field(default=None, metadata={
        "help": "Hub id used in the card's code (default: the folder name)"})
    base_model: str | None = field(default=None, metadata={
        "help": "Hub id of the teacher (default: from the run's config)"})
    license: str | None = field(default=None, metadata={"help": "license identifier for the YAML header"})


def build_parser():
    from training.utils.parser import CommandParser

    return CommandParser(ModelCardArguments, prog="python -m training.model_card",
                         description="Write RUN_DIR/README.md, the student's model card.")


@command
def main(argv=None) -> int:
    """python -m training.model_card RUN_DIR [--repo_id ...]: write RUN_DIR/README.md, the student's model card."""
    (args,) = build_parser().parse_or_exit(argv)
    print(write_card(args.run_dir, repo_id=args.repo_id, base_model=args.base_model, license=args.license))
    return 0

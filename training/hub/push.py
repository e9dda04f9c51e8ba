"""Publish a finished run to the Hugging Face Hub: the student with its code, tokenizer, card and plots.

    python -m training.push runs/retnet-500m user/retnet-500m [--private] [--license llama3.2]
    python -m training.push runs/retnet-500m user/retnet-500m --folder hub-upload/   # build only, no upload

`build_hub_folder` is the one place that decides what is published: weights (safetensors), config.json with
`auto_map`, both modeling files, tokenizer files, generation_config.json, the model card (README.md, generated
by `training.hub.model_card` from the run's metadata and eval/report.json), loss curves and the evaluation report and plots.
`push` checks the token first (argument, HF_TOKEN, or `hf auth login`'s stored token), so a push that cannot
succeed fails before anything is written; then it writes the card into the run folder, builds the upload folder
in a temporary directory and uploads it with `huggingface_hub.upload_folder`.
`python -m training.train ... --push_to_hub true [--hub_model_id user/name]` calls the same code after training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

from training.utils.errors import command
from training.utils.io import atomic_write_json, staged_folder

WEIGHT_SUFFIXES = (".safetensors",)
WEIGHT_INDEX = "model.safetensors.index.json"
CODE_FILES = ("modeling_retnet.py", "configuration_retnet.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
RUN_FILES = ("generation_config.json", "trainer_state.json", "training_config.json", "loss_curves.png")
EVAL_FILES = re.compile(r"^(report\.json|report\.md|[\w.-]+\.png)$")
TRAINING_CONFIG = "training_config.json"
_SECRET_KEY_RE = re.compile(r"token$|api_key|password|secret", re.IGNORECASE)


def resolve_token(token: str | None = None) -> str:
    """The Hub token: the one given, else HF_TOKEN / the token stored by `hf auth login`; a clear error if none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise ValueError(
            "pushing to the Hub needs a token and none was found: run `hf auth login`, set HF_TOKEN, or pass "
            "--token (training: --hub_token). Nothing was written or uploaded"
        )
    return token


def check_run_dir(run_dir: str) -> dict:
    """The run's config.json, after checking the folder holds a publishable student; errors say what is missing."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{run_dir}: no config.json; pass a finished training.train output_dir")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    names = os.listdir(run_dir)
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        extra = " (it has .bin weights: re-save with safe_serialization=True)" if any(n.endswith(".bin") and n != "training_args.bin" for n in names) else ""
        raise FileNotFoundError(f"{run_dir}: no safetensors weights{extra}; the Hub folder publishes safetensors only")
    if "tokenizer_config.json" not in names:
        raise FileNotFoundError(f"{run_dir}: no tokenizer (tokenizer_config.json); save the tokenizer beside the weights")
    if config.get("model_type") != "hf_retnet" and "AutoModelForCausalLM" not in (config.get("auto_map") or {}):
        raise ValueError(f"{run_dir}: config.json is model_type {config.get('model_type')!r}, not a RetNet student")
    return config


def _code_source(run_dir: str, name: str) -> str:
    """The run's copy of a modeling file, else the installed package's (identical: save_pretrained copies it)."""
    path = os.path.join(run_dir, name)
    if os.path.isfile(path):
        return path
    import hf_retnet

    return os.path.join(os.path.dirname(hf_retnet.__file__), name)


def build_hub_folder(run_dir: str, dest: str, repo_id: str | None = None, base_model: str | None = None,
                     license: str | None = None) -> list[str]:
    """Build `dest` (new, or an empty folder) holding what is published for the run in `run_dir`; returns the
    relative paths written. Built in a staging folder and renamed into place, so a failure leaves no half-built
    folder. No network."""
    from training.hub.model_card import build_card

    run_dir, dest = os.fspath(run_dir), os.fspath(dest)
    config = check_run_dir(run_dir)
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise FileExistsError(f"{dest}: exists and is not an empty folder; the Hub folder is built into a new one")
    card = build_card(run_dir, repo_id=repo_id, base_model=base_model, license=license)  # fails before any copy
    with staged_folder(dest, prefix=".hub-folder-") as stage:  # an empty `dest` is replaced only when complete
        written = _fill(run_dir, stage, config, card)
    return written


def _fill(run_dir: str, dest: str, config: dict, card: str) -> list[str]:
    written = []

    def copy(src: str, rel: str) -> None:
        os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
        shutil.copyfile(src, os.path.join(dest, rel))
        written.append(rel)

    for name in sorted(os.listdir(run_dir)):
        if name.endswith(WEIGHT_SUFFIXES) or name == WEIGHT_INDEX or name in TOKENIZER_FILES or name in RUN_FILES:
            copy(os.path.join(run_dir, name), name)
    config.setdefault("auto_map", {})
    config["auto_map"].setdefault("AutoConfig", "configuration_retnet.RetNetConfig")
    config["auto_map"].setdefault("AutoModel", "modeling_retnet.RetNetModel")
    config["auto_map"].setdefault("AutoModelForCausalLM", "modeling_retnet.RetNetForCausalLM")
    with open(os.path.join(dest, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    written.append("config.json")
    for name in CODE_FILES:
        copy(_code_source(run_dir, name), name)
    if "generation_config.json" not in written:
        from transformers import GenerationConfig, PretrainedConfig

        GenerationConfig.from_model_config(PretrainedConfig.from_dict(config)).save_pretrained(dest)
        written.append("generation_config.json")
    eval_dir = os.path.join(run_dir, "eval")
    if os.path.isdir(eval_dir):
        for name in sorted(os.listdir(eval_dir)):
            if EVAL_FILES.match(name):
                copy(os.path.join(eval_dir, name), f"eval/{name}")
    with open(os.path.join(dest, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)
    written.append("README.md")
    return sorted(written)


def push(run_dir: str, repo_id: str, token: str | None = None, private: bool = False, base_model: str | None = None,
         license: str | None = None, commit_message: str | None = None) -> str:
    """Upload the run's publishable part to `repo_id` (created if needed); returns the commit URL."""
    from huggingface_hub import HfApi

    token = resolve_token(token)  # first: a push that cannot succeed writes nothing
    check_run_dir(run_dir)
    from training.hub.model_card import write_card

    write_card(run_dir, repo_id=repo_id, base_model=base_model, license=license)  # the run folder's own README.md
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hf-retnet-push-") as folder:
        build_hub_folder(run_dir, folder, repo_id=repo_id, base_model=base_model, license=license)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                 commit_message=commit_message or "Upload RetNet student distilled with hf-retnet")
    return str(getattr(info, "commit_url", info))


# ----------------------------------------------------------------------------- from training.train


def save_training_config(config, output_dir: str) -> str:
    """The run's DistillationConfig as JSON beside the weights (secrets dropped), for the card and for the record,
    with `teacher_identity` (training.hub.teacher: the Hub id or the checkpoint the teacher was converted from)."""
    from training.hub.teacher import teacher_of_run

    values = {k: v for k, v in config.to_dict().items() if not _SECRET_KEY_RE.search(k)}
    values["teacher_identity"] = teacher_of_run(config)  # what the teacher is, while its folder is at hand
    return atomic_write_json(os.path.join(output_dir, TRAINING_CONFIG), values, newline=True, sort_keys=True,
                             default=str)


def prepare_push(config) -> dict | None:
    """Before training: with `push_to_hub`, resolve the repo id and token (failing now, not after hours of training)
    and turn the Trainer's own push off (it would upload every checkpoint from a repo clone); this module publishes
    the finished folder once, with its card."""
    if not getattr(config, "push_to_hub", False):
        return None
    plan = {
        "repo_id": config.hub_model_id or os.path.basename(os.path.abspath(config.output_dir)),
        "token": resolve_token(getattr(config, "hub_token", None)),
        "private": bool(getattr(config, "hub_private_repo", False)),
    }
    config.push_to_hub = False
    return plan


def finish_run(trainer, config, plan: dict | None) -> str | None:
    """After `save_final`: training_config.json beside the weights and, when planned, the push (main process)."""
    if trainer is not None and not trainer.is_world_process_zero():
        return None
    save_training_config(config, config.output_dir)
    if plan is None:
        return None
    url = push(config.output_dir, plan["repo_id"], token=plan["token"], private=plan["private"])
    print(f"pushed {config.output_dir} to {url}")
    return url


@dataclass
class PushArguments:
    """`python -m training.push RUN_DIR REPO_ID`: every field is a flag (or positional) and a YAML key."""

    run_dir: str = field(metadata={"positional": True,
                                   "help": "a finished training.train output_dir (evaluated: eval/report.json)"})
    repo_id: str = field(metadata={"positional": True, "help": "Hub repository, e.g. user/retnet-500m"})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN or `hf auth login`)"})
    private: bool = field(default=False, metadata={"help": "create the repository private"})
    base_model: str | None = field(default=None, metadata={"help": "teacher's Hub id for the card (default: from the run)"})
    license: str | None = field(default=None, metadata={"help": "license identifier for the card's metadata"})
    commit_message: str | None = field(default=None, metadata={"help": "the Hub commit's message"})
    folder: str | None = field(default=None, metadata={
        "help": "only build the upload folder here (empty or new); no upload"})


def build_parser():
    from training.utils.parser import CommandParser

    return CommandParser(PushArguments, prog="python -m training.push", description=__doc__.split("\n\n")[0])


@command
def main(argv: list[str] | None = None) -> int:
    (args,) = build_parser().parse_or_exit(argv)
    if args.folder:
        written = build_hub_folder(args.run_dir, args.folder, repo_id=args.repo_id, base_model=args.base_model,
                                   license=args.license)
        print(f"built {args.folder}: {', '.join(written)}")
        return 0
    url = push(args.run_dir, args.repo_id, token=args.token, private=args.private, base_model=args.base_model,
               license=args.license, commit_message=args.commit_message)
    print(f"pushed {args.run_dir} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

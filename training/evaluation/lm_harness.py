"""lm-evaluation-harness on a checkpoint: `lm_eval.simple_evaluate` with its HF wrapper ("hf"), which loads the
checkpoint through AutoModelForCausalLM with trust_remote_code, so the RetNet is evaluated exactly as a Hub user
would load it. lm-eval is the optional `eval` extra.

Tasks are lm-eval task names or local task YAML files. A YAML file's folder becomes an include path, and relative
`dataset_kwargs.data_files` in it are resolved against that folder (lm-eval would resolve them against the
working directory), so a task shipped as `examples/lm_eval/*.yaml` + JSONL runs from anywhere, offline.
"""

from __future__ import annotations

import os
import tempfile


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "--lm_eval_tasks needs lm-evaluation-harness: pip install 'hf-retnet[eval]' (or pip install lm-eval)"
        ) from e


def _resolve_data_files(value, base: str):
    if isinstance(value, str):
        return value if os.path.isabs(value) or "://" in value else os.path.normpath(os.path.join(base, value))
    if isinstance(value, list):
        return [_resolve_data_files(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_data_files(v, base) for k, v in value.items()}
    return value


def prepare_tasks(tasks, workdir: str) -> tuple[list[str], list[str]]:
    """(task names, include paths). YAML files are copied into `workdir` with data_files made absolute."""
    import yaml

    names, include = [], []
    for task in tasks:
        if not task.endswith((".yaml", ".yml")):
            names.append(task)
            continue
        if not os.path.isfile(task):
            raise FileNotFoundError(f"lm-eval task file {task!r} does not exist")
        with open(task, encoding="utf-8") as handle:
            spec = yaml.safe_load(handle)
        if not isinstance(spec, dict) or "task" not in spec:
            raise ValueError(f"{task}: not an lm-eval task YAML (no 'task:' key)")
        files = (spec.get("dataset_kwargs") or {}).get("data_files")
        if files is not None:
            spec["dataset_kwargs"]["data_files"] = _resolve_data_files(files, os.path.dirname(os.path.abspath(task)))
        with open(os.path.join(workdir, os.path.basename(task)), "w", encoding="utf-8") as handle:
            yaml.safe_dump(spec, handle, sort_keys=False)
        names.append(spec["task"])
        if workdir not in include:
            include.append(workdir)
    return names, include


def _plain(value):
    """JSON-safe numbers: lm-eval reports 'N/A' strings and numpy scalars beside floats."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def run_lm_eval(model, tasks, *, device: str = "cpu", batch_size: int = 4, limit: int | None = None,
                num_fewshot: int | None = None, dtype: str = "float32", tokenizer=None) -> dict:
    """{"tasks": {task: {metric: value}}, "versions", "n_samples", "config"} from lm-eval on `model`: a folder or
    Hub id (loaded by lm-eval's "hf" wrapper with trust_remote_code) or an already loaded model (wrapped in the
    same HFLM class, with `tokenizer`)."""
    _require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="hf-retnet-lm-eval-") as workdir:
        names, include = prepare_tasks(list(tasks), workdir)
        manager = TaskManager(include_path=include or None)
        if isinstance(model, (str, os.PathLike)):
            lm, model_args, name = "hf", {"pretrained": os.fspath(model), "trust_remote_code": True, "dtype": dtype}, \
                os.fspath(model)
        else:
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
            model_args, name = None, getattr(model, "name_or_path", type(model).__name__)
        results = lm_eval.simple_evaluate(
            model=lm, model_args=model_args,
            tasks=names, task_manager=manager, device=device, batch_size=batch_size, limit=limit,
            num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0,
        )
    if results is None:  # non-zero ranks in a distributed run
        return {}
    return {
        "tasks": _plain(results.get("results", {})),
        "versions": _plain(results.get("versions", {})),
        "n_samples": _plain(results.get("n-samples", {})),
        "config": {"model": "hf", "pretrained": name, "limit": limit, "num_fewshot": num_fewshot,
                   "lm_eval_version": getattr(lm_eval, "__version__", None)},
    }

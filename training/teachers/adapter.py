"""peft adapters on a teacher: check that one was made for the given base, then merge it once on load.

Every teacher consumer (the in-process `DirectTeacher`, the cache builder, the teacher server) loads a teacher
through `training.teachers.direct.load_teacher_model`, which calls `merge_adapter` here: so an adapter is applied the
same way everywhere, and the merged weights cost nothing per forward.

Why a base fingerprint: a LoRA adapter made for another checkpoint of the same architecture (say the base instead
of the instruct model) has the same shapes and loads without complaint, then silently gives a different teacher.
`python -m training.finetune_teacher` writes `teacher_base.json` beside the adapter with a fingerprint of the base's
weights; loading compares it with the base actually given. The fingerprint reads one row of every tensor straight
from the safetensors files (no weights are loaded, so it is cheap for any size), rounded to bfloat16 so an fp32 and a
bf16 copy of the same checkpoint agree. Adapters from elsewhere (no such file) are still checked for shapes and
target modules, with a clear error instead of a state-dict dump.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

from training.utils.io import atomic_write_json

ADAPTER_BASE_FILE = "teacher_base.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def _safetensors_files(model: str) -> list[str]:
    """The safetensors files of a local folder, or of a Hub id already in the local cache ([] if none found)."""
    if os.path.isdir(model):
        return sorted(glob.glob(os.path.join(model, "*.safetensors")))
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return []
    try:
        index = try_to_load_from_cache(model, "model.safetensors.index.json")
    except ValueError:  # not a valid Hub id (e.g. a local path that does not exist)
        return []
    if isinstance(index, str):
        with open(index, encoding="utf-8") as handle:
            names = sorted(set(json.load(handle)["weight_map"].values()))
        paths = [try_to_load_from_cache(model, name) for name in names]
        return [p for p in paths if isinstance(p, str)] if all(isinstance(p, str) for p in paths) else []
    single = try_to_load_from_cache(model, "model.safetensors")
    return [single] if isinstance(single, str) else []


def base_fingerprint(model: str) -> str | None:
    """sha256 over (name, shape, first row rounded to bf16) of every tensor of a checkpoint; None if it has no
    safetensors files here (then only the shape checks of `merge_adapter` apply)."""
    import torch
    from safetensors import safe_open

    files = _safetensors_files(os.path.expanduser(model))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for name in sorted(handle.keys()):
                view = handle.get_slice(name)
                shape = list(view.get_shape())
                row = view[:1] if shape else handle.get_tensor(name)
                values = row.reshape(-1)[:256].to(torch.bfloat16).view(torch.int16).numpy().tobytes()
                digest.update(f"{name}:{shape}:".encode())
                digest.update(values)
    return digest.hexdigest()


def write_adapter_base(adapter_dir: str, base_model: str) -> None:
    """Record which base `adapter_dir` was made for (written atomically beside adapter_config.json)."""
    record = {"base_model": base_model, "fingerprint": base_fingerprint(base_model)}
    atomic_write_json(os.path.join(adapter_dir, ADAPTER_BASE_FILE), record)


def check_adapter_folder(adapter: str, base_model: str | None = None) -> bool:
    """Fail clearly on a missing folder, a folder that is not a peft adapter, or an adapter recorded for another base.

    Runs before any weights load, so a wrong `--adapter` costs nothing. Returns False when the adapter records a
    base fingerprint that could not be compared yet (a Hub base not downloaded so far): check again after loading."""
    if not os.path.isdir(adapter):
        raise FileNotFoundError(
            f"teacher adapter folder {adapter!r} does not exist; pass the folder written by "
            "`python -m training.finetune_teacher` (its output_dir/adapter) or drop the adapter option"
        )
    if not os.path.isfile(os.path.join(adapter, ADAPTER_CONFIG_FILE)):
        raise ValueError(
            f"teacher adapter folder {adapter!r} has no {ADAPTER_CONFIG_FILE}, so it is not a peft adapter; pass the "
            "folder that holds adapter_config.json and adapter_model.safetensors"
        )
    record_path = os.path.join(adapter, ADAPTER_BASE_FILE)
    if base_model is None or not os.path.isfile(record_path):
        return True
    with open(record_path, encoding="utf-8") as handle:
        record = json.load(handle)
    want = record.get("fingerprint")
    got = base_fingerprint(base_model) if want else None
    if want and got is None:
        return False
    if want and want != got:
        raise ValueError(
            f"teacher adapter {adapter!r} was made for base model {record.get('base_model')!r}, but the teacher given "
            f"is {base_model!r} with different weights (fingerprint {got[:12]} != {want[:12]}); pass the base the "
            "adapter was trained on, or finetune an adapter for this teacher with `python -m training.finetune_teacher`"
        )
    return True


def merge_adapter(model, adapter: str, base_model: str | None = None):
    """Apply the peft adapter in `adapter` to the loaded `model` and merge it into the weights (returns the plain
    model). A shape or module mismatch (an adapter for another architecture or size) is a clear ValueError.
    Call `check_adapter_folder` first (before loading `model`), as `load_teacher_model` does."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as err:
        try:
            with open(os.path.join(adapter, ADAPTER_CONFIG_FILE), encoding="utf-8") as handle:
                made_for = json.load(handle).get("base_model_name_or_path")
        except (OSError, ValueError):
            made_for = None
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"teacher adapter {adapter!r} does not fit the teacher {base_model or type(model).__name__!r}: it was made "
            f"for {made_for!r} ({first}); pass the base model the adapter was trained on"
        ) from err
    return peft_model.merge_and_unload()

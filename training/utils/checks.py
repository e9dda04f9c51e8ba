"""Cheap checks of a command's inputs, run before any model loads: each raises with one line that names the input
(the config key or flag, and the path) and says what to do. No imports from the package; no weights read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct

from training.utils.paths import looks_like_local_path

# What a Trainer checkpoint folder holds besides its weights; anything else counts as weights.
_CHECKPOINT_EXTRAS = {"trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt",
                      "config.json", "generation_config.json"}


def expand(value):
    """`~` and `~user` expanded in a path-like string; anything else returned unchanged."""
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    return value


def check_output_folder(path, name: str) -> None:
    """`path` is where a command writes a folder: it may be new or an existing folder, not an existing file."""
    if path is None:
        return
    path = os.path.expanduser(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(
            f"{name} {path!r} is an existing file, not a folder; pass a folder path (new or existing) or move the file"
        )


def check_local_folder(value, name: str, what: str = "folder") -> None:
    """A value that is clearly a local path (starts with '/', '.', '~' or has two '/') must exist; a Hub id
    ('org/name') is left to the Hub. Raises FileNotFoundError saying it is a missing folder (or .gguf file), not a
    bad repo id."""
    if not value or not isinstance(value, str):
        return
    path = os.path.expanduser(value)
    if looks_like_local_path(value) and not os.path.exists(path):
        if value.lower().endswith(".gguf"):
            what = "GGUF file"
        raise FileNotFoundError(
            f"{name}: {what} {value!r} does not exist; pass an existing folder or a Hub id such as 'org/name'"
        )


def check_safetensors(path, name: str | None = None) -> None:
    """Raise ValueError naming `path` (after `name`, e.g. "config key 'student':") when it is not a complete
    safetensors file: a header that does not parse, or fewer (or more) bytes than the header's tensors need (a
    truncated copy or an interrupted save). Reads the header only."""
    try:
        _check_safetensors(os.fspath(path))
    except ValueError as err:
        if name:
            raise ValueError(f"{name} {err}") from None
        raise


def _check_safetensors(path: str) -> None:
    size = os.path.getsize(path)
    fix = "re-copy or re-save it (save_pretrained writes complete files)"
    if size < 8:
        raise ValueError(f"{path} is truncated or corrupt: {size} bytes, not a safetensors file; {fix}")
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > size - 8:
            raise ValueError(f"{path} is truncated or corrupt: its safetensors header claims {header_len} bytes but "
                             f"the file has {size}; {fix}")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path} is corrupt: its safetensors header is not valid JSON; {fix}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupt: its safetensors header is not a mapping; {fix}")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise ValueError(f"{path} is corrupt: tensor {key!r} has no data offsets in the header; {fix}")
        end = max(end, int(offsets[1]))
    if 8 + header_len + end != size:
        raise ValueError(f"{path} is truncated or corrupt: {size} bytes, its header describes "
                         f"{8 + header_len + end}; {fix}")


def check_weight_files(folder: str, name: str | None = None) -> None:
    """Every `*.safetensors` file in `folder` is complete (see check_safetensors)."""
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            check_safetensors(os.path.join(folder, file), name)


def check_checkpoint_folder(path: str, name: str = "resume_from_checkpoint") -> None:
    """A Trainer checkpoint to resume from: an existing folder with a readable trainer_state.json and weights."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{name}: checkpoint folder {path!r} does not exist; pass a checkpoint-N folder of an earlier run, "
            "'last' (the newest in output_dir), or leave it out to start fresh"
        )
    if not os.path.isdir(path):
        raise NotADirectoryError(
            f"{name}: {path!r} is a file, not a checkpoint folder; pass a checkpoint-N folder of an earlier run"
        )
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state):
        raise FileNotFoundError(
            f"{name}: {path!r} is not a Trainer checkpoint (no trainer_state.json); pass a checkpoint-N folder "
            "written during training (save_strategy), or 'last'"
        )
    try:
        with open(state, encoding="utf-8") as handle:
            loaded = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{name}: {state} is not valid JSON ({err}); the checkpoint is damaged: resume from an "
                         "earlier checkpoint-N folder") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{name}: {state} does not hold a Trainer state; resume from another checkpoint-N folder")
    weights = [n for n in os.listdir(path) if n not in _CHECKPOINT_EXTRAS and not n.startswith("rng_state") and (
        n.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json")) or os.path.isdir(os.path.join(path, n)))]
    if not weights:
        raise FileNotFoundError(
            f"{name}: {path!r} holds no model weights (model.safetensors); resume from another checkpoint-N folder"
        )
    check_weight_files(path, f"{name}:")


@contextlib.contextmanager
def no_empty_folder_left(path):
    """Remove `path` on failure when it did not exist before and is still empty: a command that stops on a mistake
    leaves no empty output folder behind."""
    path = os.path.expanduser(os.fspath(path)) if path is not None else None
    existed = path is None or os.path.exists(path)
    try:
        yield
    except BaseException:
        if not existed and os.path.isdir(path) and not os.listdir(path):
            shutil.rmtree(path, ignore_errors=True)
        raise

"""What a run's teacher is, said the way a public model card should say it: the Hub id, or the checkpoint a local
teacher folder was converted from (a GGUF file, a llama2.c checkpoint: `training.convert_gguf` and
`training.convert_llama2c` record it beside the weights), never the trainer's local folder path.

`training.train` records this as `teacher_identity` in `training_config.json` while the teacher folder is still at
hand; the model card reads it from there (or works it out from the folder when the run predates the field).
"""

from __future__ import annotations

import json
import os
import re

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files the teacher converters write beside the weights: (file, key naming the source, what the source is).
SOURCE_RECORDS = (
    ("gguf_source.json", "gguf_file", "GGUF file", "training.convert_gguf"),
    ("llama2c_source.json", "checkpoint", "llama2.c checkpoint", "training.convert_llama2c"),
)


def is_hub_id(value) -> bool:
    """'owner/name' that is not an existing local path: something the Hub's base_model/datasets fields accept."""
    return (isinstance(value, str) and bool(_HUB_ID_RE.match(value)) and not os.path.exists(value)
            and not value.lower().endswith((".jsonl", ".json", ".parquet", ".txt", ".csv", ".yaml", ".md")))


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def describe_teacher(spec) -> dict | None:
    """{"name", "hub_id", "source", "converted_by"} for a teacher given as a Hub id, a folder or a .gguf file (None
    when there is none). `name` is safe to publish: a Hub id, a source file's name, or a folder's last component."""
    if not spec:
        return None
    spec = os.fspath(spec)
    if is_hub_id(spec):
        return {"name": spec, "hub_id": spec, "source": "Hub model", "converted_by": None}
    path = os.path.expanduser(spec)
    base = os.path.basename(path.rstrip("/")) or spec
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        return {"name": base, "hub_id": None, "source": "GGUF file", "converted_by": None}
    if os.path.isdir(path):
        for file, key, what, tool in SOURCE_RECORDS:
            record = _read_json(os.path.join(path, file))
            if record and record.get(key):
                return {"name": os.path.basename(str(record[key])), "hub_id": None, "source": what,
                        "converted_by": tool}
        config = _read_json(os.path.join(path, "config.json")) or {}
        recorded = config.get("_name_or_path")
        if is_hub_id(recorded):
            return {"name": recorded, "hub_id": recorded, "source": "Hub model", "converted_by": None}
        kind = (config.get("architectures") or [None])[0] or config.get("model_type") or "model"
        return {"name": base, "hub_id": None, "source": f"local {kind} folder", "converted_by": None}
    return {"name": base if os.path.isabs(path) else spec, "hub_id": None, "source": None, "converted_by": None}


def teacher_of_run(config) -> dict | None:
    """The teacher of a DistillationConfig-like object: `teacher_model`, else (cached mode) the teacher recorded in
    the cache's manifest; with a LoRA adapter, `adapter` says so."""
    spec = getattr(config, "teacher_model", None)
    if not spec and getattr(config, "teacher_source", None) == "cached" and getattr(config, "teacher_cache", None):
        manifest = _read_json(os.path.join(os.path.expanduser(config.teacher_cache), "manifest.json")) or {}
        spec = (manifest.get("teacher") or {}).get("id")
        adapter = (manifest.get("teacher") or {}).get("adapter")
    else:
        adapter = getattr(config, "teacher_adapter", None)
    identity = describe_teacher(spec)
    if identity is not None:
        identity["adapter"] = bool(adapter)
    return identity


def teacher_text(identity: dict | None) -> str:
    """Markdown naming the teacher: "`meta-llama/Llama-3.2-1B-Instruct`", "`x.gguf` (a GGUF file, converted with
    training.convert_gguf)", "a local LlamaForCausalLM checkpoint (`teacher`)"."""
    if not identity:
        return "a Transformer teacher"
    name, source = identity["name"], identity.get("source")
    if identity.get("hub_id"):
        text = f"`{name}`"
    elif source and source.startswith("local "):
        text = f"a {source.replace(' folder', ' checkpoint')} (`{name}`)"
    elif source:
        text = f"`{name}` (a {source}" + (f", converted with `{identity['converted_by']}`" if identity.get(
            "converted_by") else "") + ")"
    else:
        text = f"`{name}`"
    if identity.get("adapter"):
        text += " with a LoRA adapter merged in"
    return text

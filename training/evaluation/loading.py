"""Load the student and the teacher as causal LMs, with clear errors for folders that are not one, and check
that both read text with the same tokenizer (otherwise their losses and distributions are not comparable)."""

from __future__ import annotations

import hashlib
import json
import os

from training.utils.checks import check_local_folder


def _register_retnet() -> None:
    """`hf_retnet` registers its config/model with the Auto classes when it is importable (a checkpoint on the
    Hub loads without it through `trust_remote_code`)."""
    try:
        import hf_retnet  # noqa: F401
    except ImportError:
        pass


def _resolve(spec) -> str:
    """A folder or Hub id as given; a Llama .gguf file as the folder it converts to (once, cached)."""
    from training.converters.gguf import resolve_pretrained

    return resolve_pretrained(os.fspath(spec))


def load_model_config(spec: str, role: str, trust_remote_code: bool):
    """The config of `spec` (folder or Hub id), checked to be one AutoModelForCausalLM can load."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    _register_retnet()
    spec = os.path.expanduser(os.fspath(spec))
    check_local_folder(spec, f"--{role}" if role in ("model", "teacher") else role)
    spec = _resolve(spec)
    if os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "config.json")):
        raise ValueError(
            f"{role} {spec!r}: this folder has no config.json, so it is not a model checkpoint; pass a folder "
            "written by save_pretrained (e.g. a training.train output_dir) or a Hub id"
        )
    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError / ValueError / KeyError for the many ways this fails
        if not os.path.exists(spec):
            raise ValueError(
                f"{role} {spec!r}: no such local folder, and not loadable as a Hub id ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); pass an existing model folder or a reachable Hub id"
            ) from e
        raise ValueError(
            f"{role} {spec!r}: could not load a model config ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "pass a causal-LM folder written by save_pretrained or a Hub id (with --trust_remote_code for custom code)"
        ) from e
    from transformers import AutoModelForCausalLM

    auto_map = getattr(config, "auto_map", None) or {}
    known = type(config) in AutoModelForCausalLM._model_mapping or config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not known and not (trust_remote_code and "AutoModelForCausalLM" in auto_map):
        archs = ", ".join(getattr(config, "architectures", None) or []) or "none listed"
        raise ValueError(
            f"{role} {spec!r}: not a causal language model: its config is {type(config).__name__} "
            f"(model_type {config.model_type!r}, architectures: {archs}), which AutoModelForCausalLM cannot load. "
            "Pass a decoder-only LM checkpoint (a RetNet student, a Llama teacher, ...)"
        )
    return config


def load_causal_lm(spec: str, role: str = "model", *, dtype: str = "float32", device: str = "cpu",
                   trust_remote_code: bool = False):
    """`AutoModelForCausalLM.from_pretrained(spec)` in eval mode on `device`; errors name the role and the fix."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = _resolve(spec)
    config = load_model_config(spec, role, trust_remote_code)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except Exception as e:
        raise ValueError(
            f"{role} {spec!r}: the config loads but the weights do not ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); is the checkpoint complete (model.safetensors)?"
        ) from e
    return model.to(device).eval()


def load_tokenizer(spec: str, role: str = "model"):
    from transformers import AutoTokenizer

    spec = os.path.expanduser(os.fspath(spec))
    check_local_folder(spec, f"--{role}" if role in ("model", "teacher", "tokenizer") else role)
    try:
        tokenizer = AutoTokenizer.from_pretrained(_resolve(spec))
    except Exception as e:
        raise ValueError(
            f"{role} {spec!r}: no tokenizer could be loaded ({type(e).__name__}); save the tokenizer beside the "
            "weights (training.train does) or pass --tokenizer"
        ) from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def token_identity(tokenizer) -> str:
    """A hash of what decides token ids (vocabulary, merges, normalisation, pre-tokenisation, BOS/EOS ids) and
    nothing else: an instruct and a base tokenizer with different chat templates still read text identically."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        for key in ("truncation", "padding"):
            state.pop(key, None)
    else:
        state = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = {"backend": state, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, student_name: str, teacher_name: str) -> None:
    """Raise when the teacher reads text into different ids than the student: every comparison would be wrong."""
    if token_identity(student_tokenizer) == token_identity(teacher_tokenizer):
        return
    sv, tv = len(student_tokenizer), len(teacher_tokenizer)
    raise ValueError(
        f"the teacher's tokenizer ({teacher_name}, {tv} tokens, bos={teacher_tokenizer.bos_token_id}) differs from "
        f"the student's ({student_name}, {sv} tokens, bos={student_tokenizer.bos_token_id}); losses and KL are only "
        "comparable on identical token ids. Pass the teacher the student was distilled from (its tokenizer is the "
        "one saved with the student)"
    )

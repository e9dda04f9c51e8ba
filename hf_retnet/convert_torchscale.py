"""Convert torchscale RetNet checkpoints to `hf_retnet` (and back) with identical outputs.

    python -m hf_retnet.convert_torchscale <checkpoint.pt | .safetensors> <out dir> \
        [--config args.json|yaml] [--tokenizer DIR]
    python -m hf_retnet.convert_torchscale --to-torchscale <hf_retnet dir> <out.pt | out.safetensors>

The checkpoint is the state dict of a torchscale `RetNetDecoder` (torchscale 0.3.0), bare or under a prefix as
training scripts save it (`model.`, `decoder.`, `model.decoder.`, or nested under a "model" / "state_dict" entry).
`.pt` / `.bin` files are read with `torch.load(weights_only=True)`: no code in the checkpoint runs; the format is told
from the first bytes, and a file that is neither a torch.save file nor safetensors is refused without unpickling it.

The config is torchscale's `RetNetConfig` arguments (`decoder_embed_dim`, `decoder_retention_heads`, ...) as a
mapping, an object with those attributes, or a JSON / YAML file; widths, depth, vocabulary and head count are
read from the weights (the `retnet_rel_pos` buffers give the heads) and checked against it, so only what the
weights do not show (`activation_fn`, `layernorm_eps`, `recurrent_chunk_size`) needs it. Defaults are torchscale's.

What makes the converted model compute what torchscale computes (see docs/torchscale.md):
rotary on interleaved pairs with angles 10000^-linspace(0, 1, d_k/2) (`rotary_style="interleaved"`,
`rotary_spacing="linspace"`), a weightless per-head norm (`group_norm_affine=False`), the GLU FFN with torchscale's
activation (`hidden_act`), an untied output projection unless the checkpoint shares it, and the retention score
normalisation of torchscale's parallel form (`retention_score_normalization=True`). This module never imports
torchscale: the conversion is a renaming of tensors, checked key by key.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .configuration_retnet import RetNetConfig
from .modeling_retnet import RetNetForCausalLM, fp32_log_decays, rotary_linspace_inv_freq

# torchscale 0.3.0 `RetNetConfig` defaults of the arguments that shape a RetNet decoder.
TORCHSCALE_DEFAULTS = {
    "decoder_embed_dim": 768,
    "decoder_value_embed_dim": 1280,
    "decoder_retention_heads": 3,
    "decoder_ffn_embed_dim": 1280,
    "decoder_layers": 12,
    "decoder_normalize_before": True,
    "activation_fn": "gelu",
    "no_scale_embedding": True,
    "layernorm_embedding": False,
    "moe_freq": 0,
    "deepnorm": False,
    "subln": True,
    "multiway": False,
    "share_decoder_input_output_embed": False,
    "no_output_layer": False,
    "layernorm_eps": 1e-6,
    "recurrent_chunk_size": 512,
    "vocab_size": -1,
}
# torchscale option value -> why hf_retnet refuses it (options that change the computation in ways it lacks).
UNSUPPORTED = {
    ("no_scale_embedding", False): "embeddings scaled by sqrt(decoder_embed_dim)",
    ("layernorm_embedding", True): "a norm after the embedding",
    ("deepnorm", True): "DeepNorm post-norm residuals",
    ("decoder_normalize_before", False): "post-norm blocks",
    ("multiway", True): "multiway (per-modality) projections",
    ("no_output_layer", True): "no output projection",
}
ACTIVATIONS = {"gelu": "gelu", "swish": "silu", "relu": "relu"}  # torchscale activation_fn -> hidden_act
LAYER_KEYS = {  # torchscale key inside layers.{i}. -> hf_retnet key inside model.layers.{i}.
    "retention.q_proj.weight": "retention.q_proj.weight",
    "retention.k_proj.weight": "retention.k_proj.weight",
    "retention.v_proj.weight": "retention.v_proj.weight",
    "retention.g_proj.weight": "retention.g_proj.weight",
    "retention.out_proj.weight": "retention.o_proj.weight",
    "retention_layer_norm.weight": "retention_norm.weight",
    "ffn.fc1.weight": "mlp.gate_proj.weight",  # activated branch
    "ffn.gate.weight": "mlp.up_proj.weight",  # linear branch
    "ffn.fc2.weight": "mlp.down_proj.weight",
    "final_layer_norm.weight": "ffn_norm.weight",
}
TOP_KEYS = {"embed_tokens.weight": "model.embed_tokens.weight", "layer_norm.weight": "model.norm.weight"}
OUTPUT_KEY, ANGLE_KEY, DECAY_KEY = "output_projection.weight", "retnet_rel_pos.angle", "retnet_rel_pos.decay"
ANCHOR = "layers.0.retention.q_proj.weight"  # every torchscale RetNetDecoder has it; it locates the prefix
NESTED = ("model", "state_dict", "module", "decoder")  # dict entries training scripts nest the weights under


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints and configs
# ----------------------------------------------------------------------------------------------------------------


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format (a zip archive)
LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # torch.save(_use_new_zipfile_serialization=False): pickled magic number first


def checkpoint_format(path: str | os.PathLike) -> str:
    """'safetensors', 'torch' (a torch.save file, zip or legacy) or 'unknown', from the file's first bytes (its
    suffix is not trusted: a file is only ever unpickled by torch.load(weights_only=True), and only when it is a
    torch.save file)."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head.startswith(ZIP_MAGIC) or head.startswith(LEGACY_MAGIC):
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return "unknown"


def _describe_folder(path: Path) -> str:
    """What a folder passed as a checkpoint holds, and what to do instead."""
    config = path / "config.json"
    model_type = None
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (ValueError, AttributeError):
            model_type = None
    if model_type == RetNetConfig.model_type:
        return (f"{path} is an hf_retnet model folder, not a torchscale checkpoint; to write it as torchscale, run "
                f"python -m hf_retnet.convert_torchscale --to-torchscale {path} out.pt")
    if model_type:
        return (f"{path} is a {model_type!r} model folder, not a torchscale checkpoint; this converter reads the "
                "state dict of a torchscale RetNetDecoder (.pt or .safetensors file). A Llama becomes a RetNet with "
                "RetNetForCausalLM.from_llama or python -m training.align")
    return f"{path} is a folder; pass the torchscale checkpoint file in it (.pt, .bin or .safetensors)"


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a safetensors file, or a torch.save file (`.pt` / `.bin`) read with
    weights_only=True. Anything else (random bytes, a plain pickle, a text file) is refused unread."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(_describe_folder(path))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (expected a .pt, .bin or .safetensors file)")
    kind = checkpoint_format(path)
    if kind == "unknown":
        raise ValueError(
            f"{path} is not a torchscale checkpoint: it is neither a torch.save file nor safetensors (it was not "
            "unpickled); pass the .pt / .safetensors file torchscale's training wrote"
        )
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors' own error type: a truncated or damaged file
            raise ValueError(f"{path} is a truncated or corrupt safetensors file ({str(err).splitlines()[0]}); "
                             "copy or save it again") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError, RuntimeError from the zip reader, EOFError, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise ValueError(
                f"{path} cannot be read with torch.load(weights_only=True): it pickles objects beside the tensors "
                "(e.g. an argparse.Namespace), which are not loaded. Re-save the weights alone, e.g. "
                "torch.save(checkpoint['model'], 'weights.pt'), and pass the arguments with --config"
            ) from err
        raise ValueError(f"{path} is a truncated or corrupt torch.save file ({reason}); copy or save it again") from err
    return _unnest(obj, str(path))


def _unnest(obj, where: str) -> dict[str, torch.Tensor]:
    """Descend into {"model": {...}} style wrappers until a dict with tensors is found."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for key in NESTED:
        if isinstance(obj.get(key), Mapping):
            return _unnest(obj[key], f"{where}[{key!r}]")
    raise ValueError(f"{where} holds no tensors (keys: {sorted(obj)[:8]}); pass the RetNet's state dict")


def load_torchscale_args(source) -> dict:
    """torchscale RetNetConfig arguments from a mapping, an object (RetNetConfig, argparse.Namespace) or a
    JSON / YAML file. Only the keys in TORCHSCALE_DEFAULTS are used; training arguments beside them are ignored.
    A fairseq-style {"model": {...}} nesting is unwrapped."""
    if source is None:
        return {}
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"config {str(path)!r} does not exist (expected a JSON or YAML file)")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            source = yaml.safe_load(text)
        else:
            source = json.loads(text)
    elif not isinstance(source, Mapping):
        source = vars(source)
    if not isinstance(source, Mapping):
        raise ValueError(
            f"the torchscale config must be a mapping of RetNetConfig arguments; got {type(source).__name__}"
        )
    if not any(k in source for k in TORCHSCALE_DEFAULTS) and isinstance(source.get("model"), Mapping):
        source = source["model"]
    return {k: source[k] for k in TORCHSCALE_DEFAULTS if k in source and source[k] is not None}


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder's own keys: the prefix is whatever precedes `layers.0.retention.q_proj.weight`."""
    anchors = [k for k in state_dict if k.endswith(ANCHOR) and (k == ANCHOR or k[: -len(ANCHOR)].endswith("."))]
    if not anchors:
        sample = ", ".join(sorted(state_dict)[:6]) or "none"
        raise ValueError(
            f"not a torchscale RetNet state dict: no key ends in {ANCHOR!r} (keys: {sample}, ...). Pass the "
            "state dict of a torchscale RetNetDecoder (torchscale.architecture.retnet)"
        )
    if len(anchors) > 1:
        raise ValueError(f"several RetNet decoders in one state dict ({anchors}); save the one to convert on its own")
    prefix = anchors[0][: -len(ANCHOR)]
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------------------------------
# torchscale -> hf_retnet
# ----------------------------------------------------------------------------------------------------------------


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise KeyError(f"missing key {key!r}: the state dict is not a complete torchscale RetNetDecoder")
    return tuple(sd[key].shape)


def config_from_torchscale(state_dict: Mapping[str, torch.Tensor], args=None, **overrides) -> RetNetConfig:
    """The RetNetConfig that reproduces the torchscale RetNet whose (prefix-free) weights are `state_dict`.

    Shapes come from the weights; any of them also given in `args` must agree (the error names both). `overrides`
    are passed to RetNetConfig last (e.g. chunk_size, retention_mode, eos_token_id)."""
    given = load_torchscale_args(args)
    opts = {**TORCHSCALE_DEFAULTS, **given}
    if opts["subln"] and not opts["deepnorm"]:
        opts["decoder_normalize_before"] = True  # torchscale's RetNetConfig forces this
    for (name, value), what in UNSUPPORTED.items():
        if bool(opts[name]) == value:
            raise ValueError(f"{name}={opts[name]!r}: the checkpoint uses {what}, which hf_retnet does not implement")
    if opts["moe_freq"]:
        raise ValueError(f"moe_freq={opts['moe_freq']}: mixture-of-experts RetNets are not supported by hf_retnet")
    if opts["activation_fn"] not in ACTIVATIONS:
        raise ValueError(f"activation_fn={opts['activation_fn']!r} is not one of torchscale's {sorted(ACTIVATIONS)}")

    vocab, embed = _shape(state_dict, "embed_tokens.weight")
    value = _shape(state_dict, "layers.0.retention.v_proj.weight")[0]
    ffn = _shape(state_dict, "layers.0.ffn.fc1.weight")[0]
    parts = [k.split(".") for k in state_dict]
    layers = 1 + max(int(p[1]) for p in parts if p[0] == "layers" and len(p) > 1 and p[1].isdigit())
    inferred = {
        "vocab_size": (vocab, "embed_tokens.weight"),
        "decoder_embed_dim": (embed, "embed_tokens.weight"),
        "decoder_value_embed_dim": (value, "layers.0.retention.v_proj.weight"),
        "decoder_ffn_embed_dim": (ffn, "layers.0.ffn.fc1.weight"),
        "decoder_layers": (layers, "layers.{i}.*"),
    }
    if DECAY_KEY in state_dict:
        inferred["decoder_retention_heads"] = (state_dict[DECAY_KEY].numel(), DECAY_KEY)
    elif ANGLE_KEY in state_dict:
        inferred["decoder_retention_heads"] = (embed // state_dict[ANGLE_KEY].numel(), ANGLE_KEY)
    elif "decoder_retention_heads" not in given:
        raise ValueError(
            f"the state dict has neither {DECAY_KEY!r} nor {ANGLE_KEY!r}, so the head count is unknown: pass the "
            "torchscale config (decoder_retention_heads) with --config"
        )
    for name, (found, key) in inferred.items():
        if name in given and int(given[name]) != found and not (name == "vocab_size" and int(given[name]) <= 0):
            raise ValueError(
                f"config {name}={given[name]} does not match the weights: {key} implies {name}={found}; fix the "
                "config or pass the checkpoint it was written for"
            )
        opts[name] = found
    heads = int(opts["decoder_retention_heads"])
    if embed % heads or value % heads or (embed // heads) % 2:
        raise ValueError(
            f"decoder_retention_heads={heads} must divide decoder_embed_dim={embed} (into even key widths) and "
            f"decoder_value_embed_dim={value}"
        )
    tied = bool(opts["share_decoder_input_output_embed"])
    value_width = {"value_factor": value // embed} if value % embed == 0 else {"value_head_dim": value // heads}
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=embed,
        num_hidden_layers=layers,
        num_heads=heads,
        intermediate_size=ffn,
        chunk_size=int(opts["recurrent_chunk_size"]),
        rope_theta=10000.0,  # torchscale's base, fixed in RetNetRelPos
        rms_norm_eps=float(opts["layernorm_eps"]),
        tie_word_embeddings=tied,
        hidden_act=ACTIVATIONS[opts["activation_fn"]],
        rotary_style="interleaved",
        rotary_spacing="linspace",
        group_norm_affine=False,
        retention_score_normalization=True,
        fp32_decays=True,
        **value_width,
    )
    return RetNetConfig(**{**kwargs, **overrides})


def expected_torchscale_keys(config: RetNetConfig) -> dict[str, tuple[int, ...]]:
    """torchscale key -> shape for the RetNetDecoder `config` describes (buffers included)."""
    d, v, f = config.hidden_size, _value_dim(config), config.intermediate_size
    shapes = {"embed_tokens.weight": (config.vocab_size, d), "layer_norm.weight": (d,)}
    shapes[OUTPUT_KEY] = (config.vocab_size, d)
    per_layer = {
        "retention.q_proj.weight": (d, d),
        "retention.k_proj.weight": (d, d),
        "retention.v_proj.weight": (v, d),
        "retention.g_proj.weight": (v, d),
        "retention.out_proj.weight": (d, v),
        "retention_layer_norm.weight": (d,),
        "ffn.fc1.weight": (f, d),
        "ffn.gate.weight": (f, d),
        "ffn.fc2.weight": (d, f),
        "final_layer_norm.weight": (d,),
    }
    for i in range(config.num_hidden_layers):
        shapes.update({f"layers.{i}.{k}": s for k, s in per_layer.items()})
    shapes[ANGLE_KEY] = (config.head_dim,)
    shapes[DECAY_KEY] = (config.num_heads,)
    return shapes


def _value_dim(config: RetNetConfig) -> int:
    if config.value_head_dim is not None:
        return config.num_heads * config.value_head_dim
    return config.hidden_size * config.value_factor


def _same(stored: torch.Tensor, computed: torch.Tensor) -> bool:
    """A stored rotary / decay buffer equals the fp32 value we compute, once rounded to the buffer's dtype (a model
    saved after .half() holds them rounded)."""
    return torch.allclose(stored.float().cpu(), computed.to(stored.dtype).float(), rtol=1e-6, atol=0.0)


def _torchscale_buffers(config: RetNetConfig) -> dict[str, torch.Tensor]:
    """The `retnet_rel_pos` buffers as torchscale 0.3.0 computes them for this shape."""
    angle = rotary_linspace_inv_freq(config).unsqueeze(-1).repeat(1, 2).flatten()
    return {ANGLE_KEY: angle, DECAY_KEY: fp32_log_decays(config.num_heads)}


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], config: RetNetConfig) -> dict[str, torch.Tensor]:
    """Rename a prefix-free torchscale RetNetDecoder state dict to RetNetForCausalLM keys, checking every key.

    Missing, unexpected or mis-shaped keys raise, naming the key. The rotary and decay buffers, when present,
    must equal what hf_retnet computes for `config` (a patched torchscale with other angles or decays would
    silently compute something else)."""
    expected = expected_torchscale_keys(config)
    optional = {ANGLE_KEY, DECAY_KEY} | ({OUTPUT_KEY} if config.tie_word_embeddings else set())
    missing = [k for k in expected if k not in state_dict and k not in optional]
    if missing:
        raise KeyError(
            f"missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ": the state dict is not a complete torchscale RetNetDecoder of this config"
        )
    extra = [k for k in state_dict if k not in expected]
    if extra:
        hint = ""
        if extra[0] == "layernorm_embedding.weight":
            hint = " (layernorm_embedding=True is not supported)"
        elif ".A." in extra[0] or ".B." in extra[0]:
            hint = " (multiway RetNets are not supported)"
        raise KeyError(
            f"unexpected key {extra[0]!r}{hint}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + ": it has no place in an hf_retnet model of this config; check the checkpoint and --config"
        )
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(
                f"{key} has shape {tuple(tensor.shape)} but the config implies {expected[key]}: the config does not "
                "match the weights"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{key} has dtype {tensor.dtype}; a RetNet's weights are floating point")
    for key, ours in _torchscale_buffers(config).items():
        theirs = state_dict.get(key)  # a checkpoint saved after .half() holds them rounded to its dtype
        if theirs is not None and not _same(theirs, ours):
            raise ValueError(
                f"{key} = {state_dict[key].tolist()[:6]}... differs from torchscale 0.3.0's {ours.tolist()[:6]}...: "
                "the checkpoint comes from a torchscale patched to other rotary angles or decays, which this "
                "converter cannot express"
            )
    if config.tie_word_embeddings and OUTPUT_KEY in state_dict:
        if not torch.equal(state_dict[OUTPUT_KEY], state_dict["embed_tokens.weight"]):
            raise ValueError(
                f"share_decoder_input_output_embed=True but {OUTPUT_KEY} differs from embed_tokens.weight; set "
                "share_decoder_input_output_embed=False in the config"
            )

    out = {ours: state_dict[theirs] for theirs, ours in TOP_KEYS.items()}
    out["lm_head.weight"] = state_dict["embed_tokens.weight" if config.tie_word_embeddings else OUTPUT_KEY]
    for i in range(config.num_hidden_layers):
        for theirs, ours in LAYER_KEYS.items():
            out[f"model.layers.{i}.{ours}"] = state_dict[f"layers.{i}.{theirs}"]
    return out


def torchscale_to_hf(state_dict: Mapping[str, torch.Tensor], args=None, **overrides) -> RetNetForCausalLM:
    """A RetNetForCausalLM (eval mode, in the checkpoint's dtype) computing what the torchscale RetNet computes."""
    state_dict = strip_prefix(state_dict)
    if "layers.0.mlp.gate_proj.weight" in state_dict or "layers.0.retention.o_proj.weight" in state_dict:
        raise ValueError(
            "these are hf_retnet weights (already converted: mlp.gate_proj, retention.o_proj), not a torchscale "
            "RetNetDecoder's; load the folder with RetNetForCausalLM.from_pretrained, or write torchscale with "
            "--to-torchscale"
        )
    given = load_torchscale_args(args)
    if "share_decoder_input_output_embed" not in given:
        # Not stated: a shared output projection is either absent (safetensors' save_model keeps one name of a
        # shared tensor) or equal to the embedding.
        output, embed = state_dict.get(OUTPUT_KEY), state_dict.get("embed_tokens.weight")
        shared = output is None or (embed is not None and output.shape == embed.shape and torch.equal(output, embed))
        args = {**given, "share_decoder_input_output_embed": shared}
    config = config_from_torchscale(state_dict, args, **overrides)
    weights = convert_state_dict(state_dict, config)
    dtype = weights["model.embed_tokens.weight"].dtype
    config.dtype = dtype
    model = RetNetForCausalLM(config)
    model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=True)
    return model.to(dtype).eval()


def convert_torchscale(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    config=None,
    tokenizer: str | os.PathLike | None = None,
    overwrite: bool = False,
    **overrides,
) -> RetNetForCausalLM:
    """Convert a torchscale checkpoint file to a saved RetNetForCausalLM folder (with the tokenizer, when given).

    The folder is written beside its final place and renamed into it, so it appears complete or not at all."""
    output_dir = Path(output_dir)
    _check_output(output_dir, overwrite)
    tok = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        name = os.fspath(tokenizer)
        local = name.startswith(("/", ".", "~")) or name.count("/") > 1  # not a Hub id ('org/name')
        if local and not os.path.isdir(os.path.expanduser(name)):
            raise FileNotFoundError(f"--tokenizer: folder {os.fspath(tokenizer)!r} does not exist; pass the folder "
                                    "holding the model's tokenizer (tokenizer.json / tokenizer_config.json)")
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(os.fspath(tokenizer)))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tok, name, None) is not None:
                overrides.setdefault(name, getattr(tok, name))
    model = torchscale_to_hf(load_checkpoint(checkpoint), config, **overrides)
    if tok is not None and len(tok) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer in {tokenizer} has {len(tok)} tokens but the checkpoint's vocabulary has "
            f"{model.config.vocab_size}: pass the tokenizer the model was trained with"
        )

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)

    _write_dir_atomic(output_dir, write)
    return model


# ----------------------------------------------------------------------------------------------------------------
# hf_retnet -> torchscale
# ----------------------------------------------------------------------------------------------------------------


def torchscale_args(config: RetNetConfig) -> dict:
    """torchscale RetNetConfig arguments for a model `config` describes; raises when torchscale cannot compute it."""
    needed = {
        "rotary_style": "interleaved",
        "rotary_spacing": "linspace",
        "rope_theta": 10000.0,
        "group_norm_affine": False,
        "retention_score_normalization": True,
    }  # fp32_decays is checked on the decays themselves: below 21 heads both ways agree
    for name, value in needed.items():
        if getattr(config, name) != value:
            raise ValueError(
                f"{name}={getattr(config, name)!r}: torchscale's RetNet computes {name}={value!r}, so this model has "
                "no torchscale equivalent (only models converted from torchscale, or built with its options, do)"
            )
    others = (("num_kv_heads", config.num_heads), ("head_dim", config.hidden_size // config.num_heads),
              ("retention_decays", None), ("use_output_gate", True), ("gate_bias", False), ("rotary_scaling", None))
    for name, value in others:
        if getattr(config, name, value) != value:  # options of other converters, where this version has them
            raise ValueError(
                f"{name}={getattr(config, name)!r} has no torchscale equivalent (it needs {name}={value!r})"
            )
    act = {v: k for k, v in ACTIVATIONS.items()}.get(config.hidden_act)
    if act is None:
        raise ValueError(
            f"hidden_act={config.hidden_act!r} is not one of torchscale's activations {sorted(ACTIVATIONS.values())}"
        )
    return {
        "vocab_size": config.vocab_size,
        "decoder_embed_dim": config.hidden_size,
        "decoder_value_embed_dim": _value_dim(config),
        "decoder_retention_heads": config.num_heads,
        "decoder_ffn_embed_dim": config.intermediate_size,
        "decoder_layers": config.num_hidden_layers,
        "activation_fn": act,
        "layernorm_eps": config.rms_norm_eps,
        "share_decoder_input_output_embed": bool(config.tie_word_embeddings),
        "recurrent_chunk_size": config.chunk_size,
        "no_scale_embedding": True,
        "dropout": 0.0,
        "drop_path_rate": 0.0,
    }


def to_torchscale_state_dict(model: RetNetForCausalLM, prefix: str = "") -> dict[str, torch.Tensor]:
    """The torchscale RetNetDecoder state dict (keys under `prefix`) of a model with torchscale's options; loads
    with `RetNetDecoder(RetNetConfig(**torchscale_args(model.config)), embed_tokens=nn.Embedding(...))`."""
    config = model.config
    torchscale_args(config)  # raises when the model has no torchscale form
    ours = model.state_dict()
    extra = [k for k in ours if k.endswith(".bias") or "group_norm" in k]
    if extra:
        raise ValueError(
            f"{extra[0]} has no place in a torchscale RetNet (its projections have no bias, its group norm no weight)"
        )
    out = {theirs: ours[key] for theirs, key in TOP_KEYS.items()}
    out[OUTPUT_KEY] = ours["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        for theirs, key in LAYER_KEYS.items():
            out[f"layers.{i}.{theirs}"] = ours[f"model.layers.{i}.{key}"]
    for key, value in _torchscale_buffers(config).items():
        out[key] = value.to(out["embed_tokens.weight"].dtype)  # as torchscale's .to(dtype) leaves them
    log_decay = model.model.layers[0].retention.log_decay.cpu()  # rounded to the model dtype after .to(dtype)
    if not _same(log_decay, fp32_log_decays(config.num_heads)):
        raise ValueError(f"the model's decays {log_decay.exp().tolist()} are not torchscale's fixed 1 - 2^(-5-h)")
    return {prefix + k: v.detach().cpu().contiguous() for k, v in out.items()}


def check_retnet_folder(folder: str | os.PathLike) -> None:
    """Refuse, before loading, a --to-torchscale source that is not an hf_retnet folder: RetNetForCausalLM would
    otherwise load a Llama folder's config as a RetNet's (random weights, Llama's rotary layout) and fail later with
    a misleading rotary_style error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; --to-torchscale converts an hf_retnet model folder")
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; --to-torchscale converts an hf_retnet model folder")
    try:
        values = json.loads(config.read_text())
    except ValueError as err:
        raise ValueError(f"{config} is not valid JSON ({err})") from None
    model_type = values.get("model_type") if isinstance(values, dict) else None
    if model_type != RetNetConfig.model_type:
        archs = ", ".join(values.get("architectures") or []) if isinstance(values, dict) else ""
        raise ValueError(
            f"{folder} holds a {model_type!r} model ({archs or 'no architectures listed'}), not an hf_retnet RetNet: "
            "only RetNets convert to torchscale (a Llama has no torchscale form; RetNetForCausalLM.from_llama turns "
            "one into a RetNet, whose Llama rotary layout torchscale cannot express either)"
        )


def save_torchscale(model: RetNetForCausalLM, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the torchscale state dict to `path` (.pt or .safetensors) and its arguments to `<stem>.args.json`."""
    path = Path(path)
    if path.suffix not in (".pt", ".bin", ".safetensors"):
        raise ValueError(f"{path}: name the torchscale checkpoint .pt, .bin or .safetensors")
    args_path = path.with_name(path.stem + ".args.json")
    for p in (path, args_path):
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; pass --overwrite (overwrite=True) to replace it")
    state_dict = to_torchscale_state_dict(model)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        state_dict = {k: v.clone() for k, v in state_dict.items()}  # shared tensors cannot be saved as such
        _write_file_atomic(path, lambda tmp: save_file(state_dict, tmp, metadata={"format": "pt"}))
    else:
        _write_file_atomic(path, lambda tmp: torch.save(state_dict, tmp))
    text = json.dumps(torchscale_args(model.config), indent=2) + "\n"
    _write_file_atomic(args_path, lambda tmp: Path(tmp).write_text(text))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def _check_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; pass --overwrite to replace it")


def _write_dir_atomic(output_dir: Path, write) -> None:
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        write(tmp)
        if output_dir.exists():
            shutil.rmtree(output_dir) if output_dir.is_dir() else output_dir.unlink()
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_file_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_retnet.convert_torchscale",
        description="Convert a torchscale RetNet checkpoint to an hf_retnet model folder, or (--to-torchscale) back.",
    )
    parser.add_argument(
        "source", help="torchscale checkpoint (.pt/.bin/.safetensors); with --to-torchscale an hf_retnet folder"
    )
    parser.add_argument("output", help="output folder; with --to-torchscale the .pt/.safetensors file to write")
    parser.add_argument(
        "--config", help="torchscale RetNetConfig arguments (JSON or YAML); shapes come from the weights"
    )
    parser.add_argument("--tokenizer", help="tokenizer folder to save beside the model (sets bos/eos/pad ids)")
    parser.add_argument("--to-torchscale", action="store_true", help="convert an hf_retnet folder to torchscale")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also HF_RETNET_DEBUG=1)")
    args = parser.parse_args(argv)
    try:
        if args.to_torchscale:
            if args.config or args.tokenizer:
                parser.error("--config and --tokenizer apply to torchscale -> hf_retnet only")
            check_retnet_folder(args.source)
            model = RetNetForCausalLM.from_pretrained(args.source)
            path = save_torchscale(model, args.output, overwrite=args.overwrite)
            print(f"wrote {path} and {path.with_name(path.stem + '.args.json')}")
        else:
            model = convert_torchscale(args.source, args.output, args.config, args.tokenizer, overwrite=args.overwrite)
            n = sum(p.numel() for p in model.parameters())
            print(f"wrote {args.output}: RetNetForCausalLM, {n / 1e6:.2f}M parameters")
    except (ValueError, KeyError, OSError) as err:
        if args.debug or os.environ.get("HF_RETNET_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off"):
            raise
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Teacher-initialised RetNet students: a `LlamaForCausalLM` becomes a `RetNetForCausalLM` of the same shape.

Everything with a counterpart is copied exactly: token embeddings, the pre-norms, the SwiGLU MLPs, the q/k/v/o
projections (keeping grouped k/v heads, so heads sharing k and v share one retention state), the final norm and the
LM head. The rotary encoding already rotates halves as transformers' Llama does, with the same theta and Llama-3
scaling. Only what attention lacks is new: the per-head decays (RetNet's fixed ones, or chosen from the teacher's
attention distances on calibration text), the per-head output norm (its scale can be calibrated to each attention
head's output size) and the output gate (absent, constant, or random). Stage 1 (`training.align`) then trains the
retention layers to reproduce the attention outputs; stage 2 is ordinary distillation.

    from hf_retnet import RetNetForCausalLM
    student = RetNetForCausalLM.from_llama("path/to/llama", decays="attention", calibration_ids=ids)

Not imported by `modeling_retnet.py`, so checkpoints stay self-contained.
"""

from __future__ import annotations

import math
import os

import torch

from .configuration_retnet import RetNetConfig
from .modeling_retnet import RetNetForCausalLM

GATES = ("none", "constant", "random")
DECAY_CHOICES = ("retnet", "attention")
# A constant gate swish(b) with b = 2 passes 88% of its input; the output norm is divided by swish(b) so the
# layer's output is unchanged, and the gate's weights (zero) still get gradients through swish'(b) > 0.
CONSTANT_GATE_BIAS = 2.0
# A hybrid student (attention_window > 0) starts as the window (+ sinks) attention alone: its retention part must
# add nothing at conversion, since the window's softmax output is already normalised over its keys (added at full
# size on top of it, the retention made the converted hybrid ~10^4 times the teacher's perplexity). With
# gate="constant" the gate starts at swish(0) = 0 (zero weights and bias): its value is 0 but its derivative
# swish'(0) = 1/2 is not, so stage 1 grows the gate (bias and weights) from the first step. With gate="none" or
# "random" the per-head output norm's weight starts at 0 instead (its gradient, the normalised retention output
# times the gate, is not zero), and the rest follows once it has grown.
HYBRID_GATE_BIAS = 0.0


def _rope_settings(llama_config) -> tuple[float, dict | None]:
    """(theta, Llama-3 scaling or None) from either spelling transformers has used (rope_parameters / rope_scaling)."""
    params = getattr(llama_config, "rope_parameters", None) or {}
    scaling = getattr(llama_config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(llama_config, "rope_theta", None) or 10000.0)
    source = params if params.get("rope_type", "default") != "default" else scaling
    kind = source.get("rope_type", source.get("type", "default")) if source else "default"
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ValueError(
            f"the teacher uses rope_type={kind!r}; only the default and Llama-3 rotary scaling convert to a RetNet"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return float(theta), {"rope_type": "llama3", **{k: source[k] for k in keys}}


def _check_convertible(llama_config) -> None:
    if getattr(llama_config, "model_type", None) != "llama":
        raise ValueError(
            f"from_llama converts LlamaForCausalLM checkpoints; got model_type={llama_config.model_type!r}"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(llama_config, flag, False):
            raise ValueError(f"the teacher sets {flag}=True; RetNet projections have no biases, so it cannot convert")
    if getattr(llama_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"the teacher's MLP uses {llama_config.hidden_act!r}; the RetNet MLP is SwiGLU (silu)")


def retnet_config_from_llama(
    llama_config,
    *,
    share_kv: bool = True,
    gate: str = "none",
    retention_decays: list | None = None,
    chunk_size: int = 64,
    retention_mode: str = "chunkwise",
    layers: list[int] | None = None,
    attention_window: int = 0,
    attention_sinks: int = 0,
) -> RetNetConfig:
    """The RetNet config with the teacher's shapes. share_kv=False repeats k/v heads (a state per query head).
    layers: the teacher layers kept (all by default), recorded as `teacher_layers`."""
    _check_convertible(llama_config)
    layers = _check_layers(layers, llama_config.num_hidden_layers)
    if gate not in GATES:
        raise ValueError(f"gate={gate!r} is not one of {GATES}")
    heads = llama_config.num_attention_heads
    head_dim = getattr(llama_config, "head_dim", None) or llama_config.hidden_size // heads
    kv_heads = getattr(llama_config, "num_key_value_heads", None) or heads
    theta, scaling = _rope_settings(llama_config)
    return RetNetConfig(
        vocab_size=llama_config.vocab_size,
        hidden_size=llama_config.hidden_size,
        num_hidden_layers=len(layers),
        teacher_layers=layers,
        attention_window=attention_window,
        attention_sinks=attention_sinks,
        num_heads=heads,
        num_kv_heads=kv_heads if share_kv else heads,
        head_dim=head_dim,
        value_factor=1,
        intermediate_size=llama_config.intermediate_size,
        chunk_size=chunk_size,
        retention_mode=retention_mode,
        rope_theta=theta,
        rotary_scaling=scaling,
        rms_norm_eps=llama_config.rms_norm_eps,
        retention_decays=retention_decays,
        use_output_gate=gate != "none",
        gate_bias=gate == "constant",
        tie_word_embeddings=bool(getattr(llama_config, "tie_word_embeddings", False)),
        pad_token_id=llama_config.pad_token_id,
        bos_token_id=llama_config.bos_token_id,
        eos_token_id=llama_config.eos_token_id,
    )


def _check_layers(layers, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    values = list(layers)
    if (
        not values
        or any(isinstance(i, bool) or not isinstance(i, int) for i in values)
        or any(not 0 <= i < num_layers for i in values)
        or any(b <= a for a, b in zip(values, values[1:]))
    ):
        raise ValueError(
            f"layers={layers!r} must be distinct teacher layer indices in [0, {num_layers}) in increasing order "
            "(e.g. from hf_retnet.convert_llama.select_layers)"
        )
    return values


def copied_parameter_names(config: RetNetConfig) -> dict[str, str]:
    """{RetNet parameter name: Llama parameter name} for every tensor copied from the teacher; student layer i comes
    from teacher layer `config.teacher_layers[i]` (layer i when the config does not say)."""
    names = {"model.embed_tokens.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    sources = getattr(config, "teacher_layers", None) or list(range(config.num_hidden_layers))
    for i, source in enumerate(sources):
        ours, theirs = f"model.layers.{i}.", f"model.layers.{source}."
        names[ours + "retention_norm.weight"] = theirs + "input_layernorm.weight"
        names[ours + "ffn_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[ours + f"retention.{proj}.weight"] = theirs + f"self_attn.{proj}.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[ours + f"mlp.{proj}.weight"] = theirs + f"mlp.{proj}.weight"
    return names


def _load_llama(llama_model_or_path, dtype):
    if isinstance(llama_model_or_path, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(os.fspath(llama_model_or_path), dtype=dtype or torch.float32)
    return llama_model_or_path


def _teacher_device(llama) -> torch.device:
    return next(llama.parameters()).device


@torch.no_grad()
def attention_statistics(llama, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Per layer and query head, on calibration text: the mean distance n - m the attention reads from, and the RMS
    of each head's output (the input of o_proj). Returns (distances [L, H], head_rms [L, H]) in fp32, on the
    teacher's device.

    Distances count real tokens only. The first real token of each row is an attention sink that no decay can
    reach, so its column is left out and the rest renormalised; with left padding that is the row's first
    non-pad token, not column 0. Positions restart at each row's first real token (as if it stood alone), so a
    left-padded batch measures what the same sequences measure unpadded."""
    config = llama.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    device = _teacher_device(llama)  # every tensor below follows the teacher (CPU, CUDA, meta)
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    real = attention_mask.bool()  # [B, T]
    rank = attention_mask.cumsum(-1) - 1  # [B, T] real-token position: 0 at each row's first real token (the sink)
    previous = llama.config._attn_implementation
    llama.set_attn_implementation("eager")  # attention probabilities are only returned by the eager kernel
    head_sq: dict[int, torch.Tensor] = {}
    hooks = []
    weight = real.float().unsqueeze(-1)  # [B, T, 1]
    count = weight.sum().clamp(min=1)

    def capture(i):
        def hook(module, args):
            x = args[0].float().unflatten(-1, (heads, head_dim))  # [B, T, H, d]
            head_sq[i] = (x.pow(2).mean(-1) * weight).sum(dim=(0, 1)) / count  # [H], mean over real tokens

        return hook

    try:
        for i, layer in enumerate(llama.model.layers):
            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(capture(i)))
        out = llama(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=rank.clamp(min=0), output_attentions=True
        )
    finally:
        for h in hooks:
            h.remove()
        llama.set_attn_implementation(previous)
    after_sink = real & (rank >= 1)  # [B, T] real tokens other than the sink: the keys kept, and the queries scored
    position = rank.float()
    dist = (position[:, :, None] - position[:, None, :]).clamp(min=0)  # [B, T, T] real-token distance n - m
    keys = after_sink[:, None, None, :].float()  # [B, 1, 1, T]
    queries = after_sink[:, None, :].float()  # [B, 1, T]
    distances = []
    for probs in out.attentions:  # [B, H, T, T]
        p = probs.float() * keys  # the sink's and the pads' columns dropped
        mass = p.sum(-1).clamp(min=1e-9)
        mean = (p * dist[:, None]).sum(-1) / mass  # [B, H, T], renormalised over the kept keys
        distances.append((mean * queries).sum(dim=(0, 2)) / queries.sum(dim=(0, 2)).clamp(min=1))
    rms = torch.stack([head_sq[i].sqrt() for i in range(len(head_sq))])
    return torch.stack(distances), rms


@torch.no_grad()
def layer_importance(llama, calibration_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """How much each decoder block changes its input on calibration text: 1 - cos(input, output) of its hidden
    states, averaged over real tokens ([L] fp32, on the teacher's device). A block near 0 is close to the identity
    (the residual stream passes it almost unchanged), so dropping it costs least (ShortGPT's block influence)."""
    device = _teacher_device(llama)
    calibration_ids = calibration_ids.to(device)
    mask = torch.ones_like(calibration_ids) if attention_mask is None else attention_mask.to(device=device)
    real = mask.bool().float()  # [B, T]
    scores: dict[int, torch.Tensor] = {}

    def measure(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]  # [B, T, d] block input
            y = output[0] if isinstance(output, tuple) else output  # [B, T, d] block output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # [B, T]
            scores[i] = ((1 - cos) * real).sum() / real.sum().clamp(min=1)

        return hook

    hooks = [layer.register_forward_hook(measure(i), with_kwargs=True) for i, layer in enumerate(llama.model.layers)]
    try:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        llama(input_ids=calibration_ids, attention_mask=mask, position_ids=positions)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([scores[i] for i in range(len(llama.model.layers))])


def select_layers(llama, calibration_ids: torch.Tensor, keep: int, attention_mask: torch.Tensor | None = None) -> list[int]:
    """The `keep` teacher layers to build a shallower student from, in order: always the first and the last (they
    map tokens into and out of the residual stream), plus the `keep - 2` middle blocks that change their input most
    on `calibration_ids` (see `layer_importance`). Pass the result as `retnet_from_llama(..., layers=...)`."""
    num = len(llama.model.layers)
    if not isinstance(keep, int) or not min(2, num) <= keep <= num:
        raise ValueError(f"keep={keep!r} must be between {min(2, num)} and the teacher's {num} layers")
    if keep == num:
        return list(range(num))
    scores = layer_importance(llama, calibration_ids, attention_mask).cpu()
    middle = sorted(range(1, num - 1), key=lambda i: (-scores[i].item(), i))[: keep - 2]
    return sorted([0, num - 1, *middle])


def decays_from_distances(distances: torch.Tensor, kv_heads: int, lowest: float = 0.5, highest: float = 0.9995):
    """gamma per (layer, k/v head) whose geometric weights gamma^d have the heads' mean distance D:
    E[d] = gamma / (1 - gamma), so gamma = D / (1 + D); query heads of a group share the mean of their D."""
    d = distances.unflatten(-1, (kv_heads, -1)).mean(-1)  # [L, H_kv]
    return (d / (1 + d)).clamp(lowest, highest).tolist()


def retnet_from_llama(
    llama_model_or_path,
    *,
    share_kv: bool = True,
    gate: str = "none",
    decays: str | list = "retnet",
    calibration_ids: torch.Tensor | None = None,
    calibration_mask: torch.Tensor | None = None,
    calibrate_norm: bool = True,
    chunk_size: int = 64,
    retention_mode: str = "chunkwise",
    dtype: torch.dtype | None = None,
    layers: list[int] | None = None,
    attention_window: int = 0,
    attention_sinks: int = 0,
) -> RetNetForCausalLM:
    """A RetNet holding the teacher's weights wherever they have a counterpart.

    share_kv: keep the teacher's grouped k/v heads (state shrinks by the group factor); False repeats them.
    gate: "none" (no output gate, the attention layer's shape), "constant" (zero weights plus a bias: starts as a
        constant that learns to depend on the input) or "random" (RetNet's gate, freshly initialised).
    decays: "retnet" (fixed 1 - 2^(-5-h)), "attention" (from the teacher's attention distances on
        `calibration_ids`, see `decays_from_distances`), or explicit values as `RetNetConfig.retention_decays`.
    calibrate_norm: with `calibration_ids`, set each head's output-norm weight to the RMS of the attention head it
        replaces (the norm makes every head's output unit-RMS; attention heads are not).
    layers: teacher layer indices to keep, in increasing order (default: all), for a shallower student that still
        starts from the teacher's weights; `select_layers` chooses them. Decays and norm scales of student layer i
        come from teacher layer `layers[i]`; explicit `decays` are given per student layer.
    attention_window: W > 0 builds the hybrid student (`RetNetConfig.attention_window`): softmax attention over the
        last W tokens with the teacher's own q/k/v/o, retention over the older ones. Its retention part starts
        switched off (see HYBRID_GATE_BIAS): gate="constant" starts at swish(0) = 0, "none" and "random" with a zero
        output-norm weight; so the converted hybrid is exactly the teacher with its attention masked to the window
        (and sinks), and stage 1 (`training.align`) trains the retention part to supply what the older tokens gave.
    attention_sinks: S > 0 (with W > 0) also keeps each document's first S tokens in the softmax
        (`RetNetConfig.attention_sinks`); the masked teacher then attends to {k <= q : q - k < W or k < S}.
    """
    llama = _load_llama(llama_model_or_path, dtype)
    _check_convertible(llama.config)
    layers = _check_layers(layers, llama.config.num_hidden_layers)
    if isinstance(decays, str) and decays not in DECAY_CHOICES:
        raise ValueError(f"decays={decays!r}: give one of {DECAY_CHOICES} or a list of values")
    needs_data = decays == "attention" or calibrate_norm
    if decays == "attention" and calibration_ids is None:
        raise ValueError("decays='attention' measures the teacher's attention: pass calibration_ids [B, T]")
    stats = None
    if needs_data and calibration_ids is not None:
        distances, head_rms = attention_statistics(llama, calibration_ids, calibration_mask)
        stats = (distances[layers].cpu(), head_rms[layers].cpu())  # rows of the kept teacher layers, in order
    kv_heads = getattr(llama.config, "num_key_value_heads", None) or llama.config.num_attention_heads
    explicit = None
    if decays == "attention":
        explicit = decays_from_distances(stats[0], kv_heads if share_kv else llama.config.num_attention_heads)
    elif not isinstance(decays, str):
        explicit = decays
    config = retnet_config_from_llama(
        llama.config,
        share_kv=share_kv,
        gate=gate,
        retention_decays=explicit,
        chunk_size=chunk_size,
        retention_mode=retention_mode,
        layers=layers,
        attention_window=attention_window,
        attention_sinks=attention_sinks,
    )
    hybrid = attention_window > 0
    student = RetNetForCausalLM(config).to(dtype=next(llama.parameters()).dtype)
    theirs = llama.state_dict()
    ours = student.state_dict()
    group = config.num_heads // config.num_kv_heads
    teacher_group = llama.config.num_attention_heads // kv_heads
    with torch.no_grad():
        for name, source in copied_parameter_names(config).items():
            tensor = theirs[source]
            if name.endswith(("k_proj.weight", "v_proj.weight")) and group != teacher_group:
                tensor = tensor.unflatten(0, (kv_heads, -1)).repeat_interleave(teacher_group, 0).flatten(0, 1)
            if ours[name].shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(ours[name].shape)} but the teacher's {source} is {tuple(tensor.shape)}")
            ours[name].copy_(tensor)
        for layer_idx, layer in enumerate(student.model.layers):
            retention = layer.retention
            scale = torch.ones(config.num_heads)
            if stats is not None and calibrate_norm:
                scale = stats[1][layer_idx].clamp(min=1e-4)
            if gate == "constant" and hybrid:  # gate swish(0) = 0: the retention part starts silent
                retention.g_proj.weight.zero_()
                retention.g_proj.bias.fill_(HYBRID_GATE_BIAS)
            elif gate == "constant":
                retention.g_proj.weight.zero_()
                retention.g_proj.bias.fill_(CONSTANT_GATE_BIAS)
                scale = scale / (CONSTANT_GATE_BIAS / (1 + math.exp(-CONSTANT_GATE_BIAS)))
            elif hybrid:  # no gate to close (or a random one): the output norm starts at zero instead
                scale = torch.zeros_like(scale)
            dv = config.head_dim * config.value_factor
            retention.group_norm.weight.copy_(scale.repeat_interleave(dv).to(retention.group_norm.weight.dtype))
    if config.tie_word_embeddings:
        student.tie_weights()
    return student


__all__ = [
    "retnet_from_llama",
    "retnet_config_from_llama",
    "copied_parameter_names",
    "attention_statistics",
    "decays_from_distances",
    "layer_importance",
    "select_layers",
]

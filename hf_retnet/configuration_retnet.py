"""RetNet configuration (Sun et al., 2023, "Retentive Network: A Successor to Transformer for LLMs")."""

from transformers.configuration_utils import PretrainedConfig

RETENTION_MODES = ("parallel", "chunkwise", "recurrent")
ROTARY_STYLES = ("halves", "interleaved")
ROTARY_SPACINGS = ("arange", "linspace")

# The seed's two student sizes, on the Llama-3 vocabulary so a Llama-3 teacher's tokenizer is reused as is.
# Parameter counts (tied embeddings): 350M -> 351.6M, 500M -> 508.3M (printed by tests/hf_retnet/test_config.py).
VARIANTS = {
    "350M": dict(hidden_size=1024, num_hidden_layers=15, num_heads=8, intermediate_size=2048),
    "500M": dict(hidden_size=1280, num_hidden_layers=15, num_heads=10, intermediate_size=2560),
}


class RetNetConfig(PretrainedConfig):
    r"""
    Configuration of a RetNet decoder. Defaults give a small model; `from_variant("350M" | "500M")` gives the
    distillation students.

    Args:
        vocab_size (`int`, defaults to 128256): vocabulary size (Llama-3's by default).
        hidden_size (`int`, defaults to 1024): model width d.
        num_hidden_layers (`int`, defaults to 15): number of retention + FFN blocks.
        num_heads (`int`, defaults to 8): retention heads; head h decays with gamma_h = 1 - 2^(-5-h).
        value_factor (`int`, defaults to 2): value/gate width is `value_factor * hidden_size`, as in the paper.
        intermediate_size (`int`, defaults to 2048): SwiGLU FFN width.
        chunk_size (`int`, defaults to 128): chunk length of the chunkwise mode (any sequence length works).
        retention_mode (`str`, defaults to "chunkwise"): default forward mode, one of parallel / chunkwise / recurrent.
        rope_theta (`float`, defaults to 10000.0): base of the rotary (xPos-style) relative position of queries/keys.
        rms_norm_eps (`float`, defaults to 1e-6): epsilon of the pre-norms and the per-head output norm.
        initializer_range (`float`, defaults to 0.02): std of the normal init of linear and embedding weights.
        tie_word_embeddings (`bool`, defaults to True): share the input embedding with the LM head.
        use_cache (`bool`, defaults to True): return the recurrent state for generation.
        num_kv_heads (`int`, *optional*): key/value heads (grouped retention, like grouped-query attention). Query
            heads in a group read one shared k/v head and therefore one shared state and decay, so the recurrent
            state shrinks by `num_heads / num_kv_heads`. Defaults to `num_heads`.
        head_dim (`int`, *optional*): query/key width per head; defaults to `hidden_size // num_heads`. Values are
            `value_factor * head_dim` wide per head.
        rotary_scaling (`dict`, *optional*): Llama-3 style frequency scaling of the rotary encoding, as in a Llama
            config: `{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}`. None leaves the frequencies unscaled.
        retention_decays (`list`, *optional*): explicit decays gamma in (0, 1), one per k/v head (the same for every
            layer) or a list per layer (`[num_hidden_layers][num_kv_heads]`), e.g. chosen from a teacher's attention
            distances. None keeps RetNet's fixed gamma_h = 1 - 2^(-5-h).
        use_output_gate (`bool`, defaults to True): multiply the retention output by swish(g_proj(x)) as in RetNet;
            False drops the gate (and g_proj), so the layer has the shape of the attention it may replace.
        gate_bias (`bool`, defaults to False): give g_proj a bias, so the gate can start as a constant
            (zero weights, bias b: swish(b) for every token) and learn to depend on the input.
        value_head_dim (`int`, *optional*): value/gate width of one head, when it is not a whole multiple of the
            key width (torchscale's `decoder_value_embed_dim / decoder_retention_heads`). None: `value_factor`
            times the key width.
        hidden_act (`str`, defaults to "silu"): activation of the gated FFN down(act(gate(x)) * up(x)) ("gelu" for
            torchscale's GLU, whose `fc1`, `gate`, `fc2` are our `gate_proj`, `up_proj`, `down_proj`).
        rotary_style (`str`, defaults to "halves"): which coordinates the rotary encoding rotates together:
            "halves" pairs i with i + d_k/2 (Llama), "interleaved" pairs 2i with 2i + 1 (torchscale, GPT-J).
        rotary_spacing (`str`, defaults to "arange"): exponents of the rotary frequencies theta^-e_i:
            "arange" e_i = 2i/d_k (Llama), "linspace" e_i = i/(d_k/2 - 1), i.e. torch.linspace(0, 1, d_k/2)
            (torchscale, whose slowest pair turns at exactly 1/theta).
        group_norm_affine (`bool`, defaults to True): give the per-head output norm a learned weight; torchscale's
            has none.
        retention_score_normalization (`bool`, defaults to False): the paper's retention score normalisation, as
            torchscale's parallel form computes it: each output row is divided by
            max(sqrt(sum_m D_nm), |sum_m q_n k_m D_nm|) before the per-head norm. The norm cancels that factor
            except through its eps, so it matters only for exact parity with torchscale checkpoints.
        fp32_decays (`bool`, defaults to False): evaluate the decays log(1 - 2^(-5-h)) in fp32, as torchscale does,
            where heads h >= 20 round to gamma = 1 (no decay); False computes them exactly (float64, log1p).
        attention_window (`int`, defaults to 0): 0 is the pure RetNet. W > 0 makes every token mixer a hybrid
            (after LoLCATs' sliding window + linear attention): exact softmax attention over the last W real tokens
            (the token itself included) plus retention over the tokens that have left that window, whose state
            takes a token only once it leaves. The attention part uses the same q/k/v/o projections (so a
            teacher-initialised student computes the teacher's attention exactly while T <= W); the retention part
            keeps its per-head norm and output gate. Decoding state: the retention matrix plus the last W keys and
            values per layer, constant in the context length.
        attention_sinks (`int`, defaults to 0): S > 0 (hybrid only) keeps the first S real tokens of every document
            ("attention sinks", StreamingLLM) visible to the window softmax of every later query of that document:
            each query attends to the union of its document's first S tokens and its last W tokens in one softmax
            (a sink still inside the window counts once), and sink tokens never enter the retention state, which
            covers exactly the tokens that are neither sinks nor in the window. A document is a row after its left
            padding, or each document of a packed row (where position_ids restart). Decoding state: S more keys
            and values per layer.
        teacher_layers (`list[int]`, *optional*): for a student converted from a teacher (`from_llama(layers=...)`),
            the teacher layer each of its layers was copied from, in order. Informational; None otherwise.
    """

    model_type = "hf_retnet"  # "retnet" belongs to flash-linear-attention
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 128256,
        hidden_size: int = 1024,
        num_hidden_layers: int = 15,
        num_heads: int = 8,
        value_factor: int = 2,
        intermediate_size: int = 2048,
        chunk_size: int = 128,
        retention_mode: str = "chunkwise",
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        rotary_scaling: dict | None = None,
        retention_decays: list | None = None,
        use_output_gate: bool = True,
        gate_bias: bool = False,
        value_head_dim: int | None = None,
        hidden_act: str = "silu",
        rotary_style: str = "halves",
        rotary_spacing: str = "arange",
        group_norm_affine: bool = True,
        retention_score_normalization: bool = False,
        fp32_decays: bool = False,
        attention_window: int = 0,
        attention_sinks: int = 0,
        teacher_layers: list | None = None,
        **kwargs,
    ):
        if hidden_size % num_heads != 0:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}; choose num_heads dividing "
                f"hidden_size (e.g. num_heads={_largest_divisor(hidden_size, num_heads)}) or change hidden_size"
            )
        if head_dim is None and (hidden_size // num_heads) % 2 != 0:
            raise ValueError(
                f"head dimension hidden_size/num_heads={hidden_size // num_heads} must be even for the rotary "
                "position encoding; change hidden_size or num_heads"
            )
        if head_dim is not None and (head_dim < 2 or head_dim % 2 != 0):
            raise ValueError(f"head_dim={head_dim} must be a positive even number (the rotary encoding rotates pairs)")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} (each k/v head serves a group of "
                "query heads); choose a divisor of num_heads"
            )
        _check_rotary_scaling(rotary_scaling)
        retention_decays = _check_decays(retention_decays, num_hidden_layers, num_kv_heads)
        if retention_mode not in RETENTION_MODES:
            raise ValueError(f"retention_mode={retention_mode!r} is not one of {RETENTION_MODES}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens")
        if value_head_dim is not None and value_head_dim < 1:
            raise ValueError(f"value_head_dim={value_head_dim} must be a positive width (or None for value_factor)")
        if isinstance(attention_window, bool) or not isinstance(attention_window, int) or attention_window < 0:
            raise ValueError(
                f"attention_window={attention_window!r} must be a non-negative number of tokens (0: pure RetNet, "
                "W > 0: softmax attention over the last W tokens beside retention over the older ones)"
            )
        if isinstance(attention_sinks, bool) or not isinstance(attention_sinks, int) or attention_sinks < 0:
            raise ValueError(
                f"attention_sinks={attention_sinks!r} must be a non-negative number of tokens (0: no sinks, S > 0: "
                "the first S tokens of each document stay visible to the window softmax)"
            )
        if attention_sinks and not attention_window:
            raise ValueError(
                f"attention_sinks={attention_sinks} needs attention_window > 0: sinks extend the hybrid's softmax "
                "window; the pure RetNet (attention_window=0) has no softmax to extend"
            )
        if attention_window and retention_score_normalization:
            raise ValueError(
                "attention_window > 0 cannot be combined with retention_score_normalization (a torchscale-parity "
                "option whose row sums would have to exclude the window); turn one of them off"
            )
        teacher_layers = _check_teacher_layers(teacher_layers, num_hidden_layers)
        for name, value, allowed in (
            ("rotary_style", rotary_style, ROTARY_STYLES),
            ("rotary_spacing", rotary_spacing, ROTARY_SPACINGS),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.value_factor = value_factor
        self.intermediate_size = intermediate_size
        self.chunk_size = chunk_size
        self.retention_mode = retention_mode
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads if head_dim is None else head_dim
        self.rotary_scaling = rotary_scaling
        self.retention_decays = retention_decays
        self.use_output_gate = use_output_gate
        self.gate_bias = gate_bias
        self.value_head_dim = value_head_dim
        self.hidden_act = hidden_act
        self.rotary_style = rotary_style
        self.rotary_spacing = rotary_spacing
        self.group_norm_affine = group_norm_affine
        self.retention_score_normalization = retention_score_normalization
        self.fp32_decays = fp32_decays
        self.attention_window = attention_window
        self.attention_sinks = attention_sinks
        self.teacher_layers = teacher_layers
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @classmethod
    def from_variant(cls, name: str, **overrides) -> "RetNetConfig":
        """The seed's student sizes: `from_variant("350M")` or `from_variant("500M", chunk_size=256)`."""
        if name not in VARIANTS:
            raise ValueError(f"unknown RetNet variant {name!r}; choose one of {sorted(VARIANTS)}")
        return cls(**{**VARIANTS[name], **overrides})


def _check_rotary_scaling(rotary_scaling: dict | None) -> None:
    if rotary_scaling is None:
        return
    kind = rotary_scaling.get("rope_type", rotary_scaling.get("type"))
    if kind == "default":
        return
    needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [key for key in needed if key not in rotary_scaling]
    if kind != "llama3" or missing:
        raise ValueError(
            f"rotary_scaling={rotary_scaling!r}: only Llama-3 scaling is supported, as "
            f"{{'rope_type': 'llama3', {', '.join(repr(k) + ': ...' for k in needed)}}}"
            + (f"; missing {missing}" if kind == "llama3" else "")
        )


def _check_decays(decays, num_layers: int, num_kv_heads: int) -> list | None:
    """One decay per k/v head, or one list per layer; each strictly between 0 and 1. Returns plain floats."""
    if decays is None:
        return None
    rows = decays if decays and isinstance(decays[0], (list, tuple)) else [decays]
    if len(rows) not in (1, num_layers) or any(len(row) != num_kv_heads for row in rows):
        raise ValueError(
            f"retention_decays must hold {num_kv_heads} values (one per k/v head) or {num_layers} lists of "
            f"{num_kv_heads} (one per layer); got {decays!r}"
        )
    values = [[float(g) for g in row] for row in rows]
    if any(not 0.0 < g < 1.0 for row in values for g in row):
        raise ValueError(f"retention_decays must lie strictly between 0 and 1; got {decays!r}")
    return values[0] if len(rows) == 1 and not isinstance(decays[0], (list, tuple)) else values


def _check_teacher_layers(layers, num_layers: int) -> list | None:
    """Teacher layer indices, one per student layer, strictly increasing. Returns plain ints."""
    if layers is None:
        return None
    values = [int(i) for i in layers]
    if len(values) != num_layers or any(i < 0 for i in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(
            f"teacher_layers must list {num_layers} distinct teacher layer indices in increasing order (one per "
            f"layer); got {layers!r}"
        )
    return values


def _largest_divisor(n: int, at_most: int) -> int:
    return max(h for h in range(1, at_most + 1) if n % h == 0)

"""parallel == chunkwise == recurrent: outputs, final states and gradients, with and without padding."""

import pytest
import torch

from hf_retnet import RetNetConfig, RetNetForCausalLM
from hf_retnet.modeling_retnet import (
    CACHE_FIELD,
    retention_chunkwise,
    retention_parallel,
    retention_recurrent,
    retnet_log_decays,
)

TOL = 1e-4  # fp32


def tiny_config(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4, intermediate_size=64, chunk_size=4)
    return RetNetConfig(**{**base, **kw})


def make_mask(batch, seq_len, padding):
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if padding == "left":
        for b in range(batch):
            mask[b, : (b * 3) % seq_len] = 0
    elif padding == "right":
        for b in range(batch):
            mask[b, seq_len - (b * 2) % seq_len :] = 0
    return mask


def ops_inputs(b, h, t, dk, dv, padding, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, h, t, dk, generator=g), torch.randn(b, h, t, dk, generator=g) * dk**-0.5
    v = torch.randn(b, h, t, dv, generator=g)
    mask = make_mask(b, t, padding)
    k, v = k * mask[:, None, :, None], v * mask[:, None, :, None]
    time = mask.cumsum(-1).float()
    log_decay = retnet_log_decays(h)
    state = torch.randn(b, h, dk, dv, generator=g)
    return q, k, v, log_decay, time, state


@pytest.mark.parametrize("seq_len", [1, 7, 8, 16, 33])
@pytest.mark.parametrize("chunk_size", [1, 4, 8, 64])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("with_state", [False, True])
def test_ops_agree(seq_len, chunk_size, batch, padding, with_state):
    q, k, v, log_decay, time, state = ops_inputs(batch, 4, seq_len, 8, 16, padding)
    state = state if with_state else None
    ref_out, ref_state = retention_recurrent(q, k, v, log_decay, time, state)
    par_out, par_state = retention_parallel(q, k, v, log_decay, time, state)
    chk_out, chk_state = retention_chunkwise(q, k, v, log_decay, time, state, chunk_size)
    torch.testing.assert_close(par_out, ref_out, atol=TOL, rtol=TOL)
    torch.testing.assert_close(chk_out, ref_out, atol=TOL, rtol=TOL)
    torch.testing.assert_close(par_state, ref_state, atol=TOL, rtol=TOL)
    torch.testing.assert_close(chk_state, ref_state, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("seq_len", [5, 12, 19])
@pytest.mark.parametrize("chunk_size", [4, 6])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_model_modes_agree(seq_len, chunk_size, batch, padding):
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(chunk_size=chunk_size)).eval()
    ids = torch.randint(0, 97, (batch, seq_len))
    mask = make_mask(batch, seq_len, padding)
    outs = {
        mode: model(ids, attention_mask=mask, retention_mode=mode, use_cache=True)
        for mode in ("parallel", "chunkwise", "recurrent")
    }
    keep = mask.bool()  # padded positions carry no meaning
    for mode in ("chunkwise", "recurrent"):
        torch.testing.assert_close(outs[mode].logits[keep], outs["parallel"].logits[keep], atol=TOL, rtol=TOL)
        for a, b in zip(outs[mode][CACHE_FIELD].states, outs["parallel"][CACHE_FIELD].states):
            torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("seq_len", [8, 13])
@pytest.mark.parametrize("padding", ["none", "right"])
def test_gradients_parallel_vs_chunkwise(seq_len, padding):
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(chunk_size=4))
    ids = torch.randint(0, 97, (2, seq_len))
    mask = make_mask(2, seq_len, padding)
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for mode in ("parallel", "chunkwise"):
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels, retention_mode=mode).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["parallel"].items():
        torch.testing.assert_close(grads["chunkwise"][name], g, atol=TOL, rtol=1e-3, msg=name)


def test_retention_state_is_fp32_in_bf16_model():
    model = RetNetForCausalLM(tiny_config(num_heads=8)).eval()
    decays = [layer.retention.log_decay.clone() for layer in model.model.layers]
    model = model.to(torch.bfloat16)
    for layer, before in zip(model.model.layers, decays):  # the cast leaves the decays fp32 and unrounded
        assert layer.retention.log_decay.dtype == torch.float32
        assert torch.equal(layer.retention.log_decay, before)
    out = model(torch.randint(0, 97, (2, 9)), use_cache=True)
    assert out.logits.dtype == torch.bfloat16
    assert all(s.dtype == torch.float32 for s in out[CACHE_FIELD].states)


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 16))
    ref = model(ids).logits
    low = model.to(torch.bfloat16)(ids).logits.float()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


# Options a converted Llama uses (see hf_retnet/convert_llama.py); every one must keep the three modes equal.
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
OPTIONS = {
    "kv_groups_of_2": dict(num_kv_heads=2),
    "one_kv_head": dict(num_kv_heads=1),
    "explicit_head_dim": dict(head_dim=6),
    "value_factor_1": dict(value_factor=1),
    "llama3_rope_scaling": dict(rotary_scaling=LLAMA3_SCALING, rope_theta=500000.0),
    "decays_per_head": dict(retention_decays=[0.5, 0.9, 0.99, 0.999]),
    "decays_per_layer": dict(num_kv_heads=2, retention_decays=[[0.3, 0.95], [0.8, 0.999]]),
    "no_gate": dict(use_output_gate=False),
    "gate_bias": dict(gate_bias=True),
    "grouped_with_torchscale_options": dict(
        num_kv_heads=2, retention_score_normalization=True, rotary_style="interleaved", rotary_spacing="linspace",
        group_norm_affine=False, value_head_dim=12, retention_decays=[0.7, 0.99],
    ),
    "converted_llama_like": dict(
        num_kv_heads=2, head_dim=6, value_factor=1, rotary_scaling=LLAMA3_SCALING, use_output_gate=False,
        retention_decays=[[0.6, 0.97], [0.9, 0.99]],
    ),
}


def _randomize_biases(model):
    with torch.no_grad():  # zero-initialised biases would hide a bias that is dropped in one mode
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_model_modes_agree_with_options(option, padding):
    torch.manual_seed(0)
    config = tiny_config(chunk_size=4, **OPTIONS[option])
    model = RetNetForCausalLM(config).eval()
    _randomize_biases(model)
    ids = torch.randint(0, 97, (2, 11))
    mask = make_mask(2, 11, padding)
    outs = {
        mode: model(ids, attention_mask=mask, retention_mode=mode, use_cache=True)
        for mode in ("parallel", "chunkwise", "recurrent")
    }
    keep = mask.bool()
    kv_heads = config.num_kv_heads
    for mode in ("chunkwise", "recurrent"):
        torch.testing.assert_close(outs[mode].logits[keep], outs["parallel"].logits[keep], atol=TOL, rtol=TOL)
        for a, b in zip(outs[mode][CACHE_FIELD].states, outs["parallel"][CACHE_FIELD].states):
            d_v = (config.value_head_dim or config.head_dim * config.value_factor) + config.retention_score_normalization
            assert a.shape == (2, kv_heads, config.head_dim, d_v)
            torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_state_continuation_with_options(option):
    """A prefix read chunkwise into a cache, then the rest one token at a time, equals one parallel pass."""
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(chunk_size=4, **OPTIONS[option])).eval()
    _randomize_biases(model)
    ids = torch.randint(0, 97, (2, 10))
    full = model(ids, retention_mode="parallel").logits
    first = model(ids[:, :6], retention_mode="chunkwise", use_cache=True)
    cache, steps = first[CACHE_FIELD], [first.logits]
    for i in range(6, 10):
        out = model(ids[:, i : i + 1], past_key_values=cache, retention_mode="recurrent", use_cache=True)
        cache = out[CACHE_FIELD]
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("option", ["converted_llama_like", "gate_bias", "decays_per_layer"])
def test_gradients_parallel_vs_chunkwise_with_options(option):
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(chunk_size=4, **OPTIONS[option]))
    _randomize_biases(model)
    ids = torch.randint(0, 97, (2, 13))
    grads = {}
    for mode in ("parallel", "chunkwise"):
        model.zero_grad()
        model(ids, labels=ids, retention_mode=mode).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["parallel"].items():
        torch.testing.assert_close(grads["chunkwise"][name], g, atol=TOL, rtol=1e-3, msg=name)


def test_explicit_decays_reach_the_layers():
    config = tiny_config(num_kv_heads=2, retention_decays=[[0.3, 0.95], [0.8, 0.999]])
    model = RetNetForCausalLM(config)
    got = [layer.retention.log_decay.exp().tolist() for layer in model.model.layers]
    torch.testing.assert_close(torch.tensor(got), torch.tensor([[0.3, 0.95], [0.8, 0.999]]))


def test_llama3_rope_scaling_matches_transformers():
    """The rotary frequencies equal those of transformers' Llama with the same rope scaling."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from hf_retnet.modeling_retnet import rotary_inv_freq

    config = tiny_config(rotary_scaling=LLAMA3_SCALING, rope_theta=500000.0, head_dim=16)
    llama = LlamaConfig(
        hidden_size=32, num_attention_heads=4, head_dim=16, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING),
        max_position_embeddings=64,
    )
    torch.testing.assert_close(rotary_inv_freq(config), LlamaRotaryEmbedding(llama).inv_freq.float())


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(num_kv_heads=3), "num_kv_heads=3 must divide"),
        (dict(head_dim=5), "head_dim=5"),
        (dict(retention_decays=[0.5, 1.0, 0.9, 0.9]), "strictly between 0 and 1"),
        (dict(retention_decays=[0.5, 0.9]), "one per k/v head"),
        (dict(rotary_scaling={"rope_type": "yarn", "factor": 2.0}), "only Llama-3 scaling"),
    ],
)
def test_bad_options_fail_clearly(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        tiny_config(**kwargs)


def test_log_decays_are_exact_for_many_heads():
    heads = 32
    expected = torch.log1p(-(2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float64))))
    got = retnet_log_decays(heads)
    assert got.dtype == torch.float32
    assert (got < 0).all(), "every head must decay; fp32 log(1 - 2^(-5-h)) rounds to 0 from h = 20"
    assert (got.diff() > 0).all(), "later heads decay more slowly"
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    model = RetNetForCausalLM(tiny_config(hidden_size=64, num_heads=heads))
    torch.testing.assert_close(model.model.layers[0].retention.log_decay, got, rtol=0, atol=0)


@pytest.mark.parametrize("seq_len,chunk_size", [(1024, 64), (2048, 128), (3001, 256)])
def test_ops_agree_on_long_sequences_with_many_heads(seq_len, chunk_size):
    """Every mode in fp32 against the recurrence in fp64. Slow heads (gamma = 1 - 2^-28) sum thousands of terms
    without forgetting: the fp32 recurrence rounds at every step, so its error grows with T (1.1e-4 of the state's
    largest value at T=3001); chunkwise and parallel round far less (3e-7). Tolerances: relative to the largest value."""
    inputs = ops_inputs(1, 24, seq_len, 4, 4, "left", seed=1)
    true_out, true_state = retention_recurrent(*(x.double() for x in inputs))

    def check(out, state, rel):
        torch.testing.assert_close(out.double(), true_out, atol=rel * true_out.abs().max(), rtol=0)
        torch.testing.assert_close(state.double(), true_state, atol=rel * true_state.abs().max(), rtol=0)

    check(*retention_recurrent(*inputs), rel=4e-4)
    check(*retention_chunkwise(*inputs, chunk_size), rel=1e-5)
    if seq_len <= 2048:  # parallel is O(T^2) memory
        check(*retention_parallel(*inputs), rel=1e-5)


def test_model_modes_agree_on_a_long_sequence_with_many_heads():
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(hidden_size=96, num_heads=24, chunk_size=128)).eval()
    ids = torch.randint(0, 97, (1, 2048))
    with torch.no_grad():
        outs = {m: model(ids, retention_mode=m, use_cache=True) for m in ("parallel", "chunkwise", "recurrent")}
    for mode in ("chunkwise", "recurrent"):
        torch.testing.assert_close(outs[mode].logits, outs["parallel"].logits, atol=1e-4, rtol=1e-4)
        for a, b in zip(outs[mode][CACHE_FIELD].states, outs["parallel"][CACHE_FIELD].states):
            torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max(), rtol=1e-4)

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
    model = RetNetForCausalLM(tiny_config()).to(torch.bfloat16).eval()
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
    q, k, v, log_decay, time, state = ops_inputs(1, 24, seq_len, 4, 4, "left", seed=1)
    ref_out, ref_state = retention_recurrent(q, k, v, log_decay, time, state)
    chk_out, chk_state = retention_chunkwise(q, k, v, log_decay, time, state, chunk_size)
    # Slow heads (gamma = 1 - 2^-28) sum thousands of fp32 terms without forgetting, and the recurrent reference
    # rounds at every step: compare relative to the output's size (5e-5 of its largest value).
    scale = ref_out.abs().max()
    torch.testing.assert_close(chk_out, ref_out, atol=5e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(chk_state, ref_state, atol=1e-5 * ref_state.abs().max(), rtol=1e-4)
    if seq_len <= 2048:  # parallel is O(T^2) memory
        par_out, par_state = retention_parallel(q, k, v, log_decay, time, state)
        torch.testing.assert_close(par_out, ref_out, atol=5e-5 * scale, rtol=1e-4)
        torch.testing.assert_close(par_state, ref_state, atol=1e-5 * ref_state.abs().max(), rtol=1e-4)


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

"""parallel == chunkwise == recurrent: outputs, final states and gradients, with and without padding."""

import pytest
import torch

from hf_retnet import RetNetConfig, RetNetForCausalLM
from hf_retnet.modeling_retnet import retention_chunkwise, retention_parallel, retention_recurrent

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
    log_decay = torch.log(1 - 2.0 ** (-5.0 - torch.arange(h, dtype=torch.float32)))
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
        for a, b in zip(outs[mode].past_key_values.states, outs["parallel"].past_key_values.states):
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
    assert all(s.dtype == torch.float32 for s in out.past_key_values.states)


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 16))
    ref = model(ids).logits
    low = model.to(torch.bfloat16)(ids).logits.float()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()

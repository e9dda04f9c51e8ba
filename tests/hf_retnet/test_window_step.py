"""The hybrid's one-token decoding step (`WindowStep`, `RetNetHybridAttention._window_step`): token by token after a
prefill it must give what one forward over the whole row gives, while the window fills, once tokens leave it into the
sink slots and then into the retention state, with grouped k/v heads, and with padded steps (a hole in the mask
changes nothing)."""

import pytest
import torch

from hf_retnet import RetNetConfig, RetNetForCausalLM
from hf_retnet.modeling_retnet import CACHE_FIELD

TOL = 1e-4  # fp32, as tests/hf_retnet/test_retention_modes.py


def decode_mask(batch, seq_len, padding):
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if padding == "left":
        for row in range(batch):
            mask[row, : 3 * row] = 0
    elif padding == "holes":  # padded tokens in the middle of decoding, different per row
        for row in range(batch):
            mask[row, 4 + row :: 5] = 0
    return mask


@pytest.mark.parametrize("window, sinks", [(1, 0), (3, 0), (3, 2), (4, 1), (2, 5)])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("padding", ["none", "left", "holes"])
@pytest.mark.parametrize("prefix", [1, 4])
def test_decoding_steps_equal_one_forward(window, sinks, kv_heads, padding, prefix):
    torch.manual_seed(0)
    config = RetNetConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4, num_kv_heads=kv_heads,
                          intermediate_size=64, chunk_size=4, attention_window=window, attention_sinks=sinks,
                          initializer_range=0.2)
    model = RetNetForCausalLM(config).eval()
    length = 16
    ids = torch.randint(0, 97, (3, length))
    mask = decode_mask(3, length, padding)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, retention_mode="parallel").logits
        out = model(ids[:, :prefix], attention_mask=mask[:, :prefix], use_cache=True)
        cache, steps = out[CACHE_FIELD], [out.logits]
        for i in range(prefix, length):  # the whole mask so far, as generate() passes it
            out = model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], cache=cache, use_cache=True)
            cache = out[CACHE_FIELD]
            steps.append(out.logits)
    keep = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[keep], full[keep], atol=TOL, rtol=TOL)
    # and the cache after the steps is the cache one forward leaves
    with torch.no_grad():
        whole = model(ids, attention_mask=mask, use_cache=True)[CACHE_FIELD]
    for layer in range(config.num_hidden_layers):
        for stepped, once in zip(cache.get_state(layer), whole.get_state(layer)):
            torch.testing.assert_close(stepped, once, atol=TOL, rtol=TOL)
    assert torch.equal(cache.window_valid, whole.window_valid)
    if sinks:
        assert torch.equal(cache.doc_tokens, whole.doc_tokens)

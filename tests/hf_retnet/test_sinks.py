"""Attention sinks in the hybrid student (attention_window = W, attention_sinks = S): every query's softmax covers the
first S real tokens of its document and its last W real tokens (one softmax over the union), the sinks never enter
the retention state, and the state stays constant in the context length. Checked against a per-token reference, the
Llama teacher run with the equivalent explicit 4D attention mask, across the three modes, continuation, generation,
packed rows, save / load and remote code; and the converted hybrid starts as the window (+ sinks) teacher."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_retnet import RetNetCache, RetNetConfig, RetNetForCausalLM, retnet_from_llama
from hf_retnet.modeling_retnet import CACHE_FIELD, WindowLayout, hybrid_window_retention

TOL = 1e-4  # fp32, as tests/hf_retnet/test_retention_modes.py
MODES = ("parallel", "chunkwise", "recurrent")


def tiny_config(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4, intermediate_size=64, chunk_size=4,
                attention_window=3, attention_sinks=2)
    return RetNetConfig(**{**base, **kw})


def make_mask(batch, seq_len, padding):
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    for b in range(batch):
        if padding == "left":
            mask[b, : (b * 3) % seq_len] = 0
        elif padding == "right":
            mask[b, seq_len - (b * 2) % seq_len :] = 0
        elif padding == "holes":
            mask[b, (b + 1) :: 3] = 0
            mask[b, -1] = 1
    return mask


# ------------------------------------------------------------------------------------------------------------------
# The ops against a plain per-token reference
# ------------------------------------------------------------------------------------------------------------------


def reference(q, k, v, gammas, mask, window, sinks):
    """Per row and head over the real tokens in order (rank r): query r attends with one softmax to the ranks
    {m <= r : r - m < W or m < S}; its retention output is sum over ranks S <= m <= r - W of gamma^(r-m) (q.k_m) v_m.
    Final state: sum over S <= m <= N-1-W of gamma^(N-1-W-m) k_m^T v_m; window: the last min(N, W) keys/values,
    newest last; sink slot s: rank s's key/value if it has left the window (s < N - W), else zeros."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    f64 = dict(dtype=torch.float64)
    win_out, ret_out = torch.zeros(b, h, t, dv, **f64), torch.zeros(b, h, t, dv, **f64)
    state = torch.zeros(b, h, dk, dv, **f64)
    keys, values = torch.zeros(b, h, window, dk, **f64), torch.zeros(b, h, window, dv, **f64)
    sink_keys, sink_values = torch.zeros(b, h, sinks, dk, **f64), torch.zeros(b, h, sinks, dv, **f64)
    q, k, v = q.double(), k.double(), v.double()
    for row in range(b):
        real = mask[row].nonzero().flatten().tolist()
        n = len(real)
        for head in range(h):
            g = gammas[head]
            for r, pos in enumerate(real):
                seen = [real[m] for m in range(r + 1) if r - m < window or m < sinks]
                scores = torch.stack([q[row, head, pos] @ k[row, head, m] for m in seen])
                win_out[row, head, pos] = torch.softmax(scores, 0) @ v[row, head, seen]
                for s in range(sinks, r - window + 1):
                    m = real[s]
                    ret_out[row, head, pos] += g ** (r - s) * (q[row, head, pos] @ k[row, head, m]) * v[row, head, m]
            for s in range(sinks, n - window):
                m = real[s]
                state[row, head] += g ** (n - 1 - window - s) * torch.outer(k[row, head, m], v[row, head, m])
            for slot, m in enumerate(real[-window:][::-1]):
                keys[row, head, window - 1 - slot], values[row, head, window - 1 - slot] = k[row, head, m], v[row, head, m]
            for s in range(min(sinks, n - window)):
                sink_keys[row, head, s], sink_values[row, head, s] = k[row, head, real[s]], v[row, head, real[s]]
    return win_out, ret_out, state, keys, values, sink_keys, sink_values


def op_inputs(b, h, t, dk, dv, padding, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, h, t, dk, generator=g), torch.randn(b, h, t, dk, generator=g) * dk**-0.5
    v = torch.randn(b, h, t, dv, generator=g)
    mask = make_mask(b, t, padding)
    keep = mask[:, None, :, None].float()
    gammas = [0.5, 0.8, 0.95][:h]
    log_decay = torch.log(torch.tensor(gammas, dtype=torch.float64)).float()
    return q, k * keep, v * keep, mask, gammas, log_decay


@pytest.mark.parametrize("window, sinks", [(1, 1), (2, 3), (3, 2), (4, 1), (2, 6)])
@pytest.mark.parametrize("seq_len", [1, 3, 4, 5, 6, 9, 13])
@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("padding", ["none", "left", "right", "holes"])
def test_ops_equal_the_per_token_reference(window, sinks, seq_len, chunk_size, padding):
    q, k, v, mask, gammas, log_decay = op_inputs(2, 3, seq_len, 4, 5, padding)
    want = reference(q, k, v, gammas, mask, window, sinks)
    keep = mask.bool().unsqueeze(1).expand(-1, 3, -1)
    for mode in MODES:
        layout = WindowLayout(mask, None, window, sinks=sinks)
        got = hybrid_window_retention(q, k, v, log_decay, layout, mode=mode, chunk_size=chunk_size)
        assert len(got) == 7
        for name, a, e in zip(("window", "retention"), got[:2], want[:2]):
            torch.testing.assert_close(a.double()[keep], e[keep], atol=TOL, rtol=TOL, msg=f"{mode} {name}")
        torch.testing.assert_close(got[2].double(), want[2], atol=TOL, rtol=TOL, msg=f"{mode} state")
        valid = layout.next_window_valid
        for a, e in zip(got[3:5], want[3:5]):
            torch.testing.assert_close(a.double() * valid[:, None, :, None], e, atol=0, rtol=0)
        for a, e in zip(got[5:], want[5:]):
            torch.testing.assert_close(a.double(), e, atol=0, rtol=0, msg=f"{mode} sink slots")
        assert layout.next_doc_tokens.tolist() == mask.sum(-1).tolist()


@pytest.mark.parametrize("window, sinks", [(2, 1), (2, 3), (5, 2)])
@pytest.mark.parametrize("split", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("padding", ["none", "left", "holes"])
def test_ops_continue_from_carried_sinks_window_and_state(window, sinks, split, padding):
    """A call over tokens [0, split) then one over the rest, carrying (state, window, sinks), equals one call."""
    q, k, v, mask, gammas, log_decay = op_inputs(2, 3, 11, 4, 5, padding, seed=3)
    whole = hybrid_window_retention(q, k, v, log_decay, WindowLayout(mask, None, window, sinks=sinks), mode="parallel")
    first_layout = WindowLayout(mask[:, :split], None, window, sinks=sinks)
    first = hybrid_window_retention(q[:, :, :split], k[:, :, :split], v[:, :, :split], log_decay, first_layout,
                                    mode="chunkwise", chunk_size=2)
    keep = mask.bool().unsqueeze(1).expand(-1, 3, -1)
    for mode in MODES:
        layout = WindowLayout(mask[:, split:], first_layout.next_window_valid, window, sinks=sinks,
                              doc_tokens=first_layout.next_doc_tokens)
        rest = hybrid_window_retention(q[:, :, split:], k[:, :, split:], v[:, :, split:], log_decay, layout,
                                       *first[2:], mode=mode, chunk_size=3)
        for i in range(2):
            joined = torch.cat([first[i], rest[i]], dim=2)
            torch.testing.assert_close(joined[keep], whole[i][keep], atol=TOL, rtol=TOL, msg=f"{mode} output {i}")
        for i in range(2, 7):
            torch.testing.assert_close(rest[i], whole[i], atol=TOL, rtol=TOL, msg=f"{mode} carried {i}")


# ------------------------------------------------------------------------------------------------------------------
# The model: modes, padding, continuation, generation, state size
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window, sinks", [(1, 1), (3, 2), (4, 4), (5, 1)])
@pytest.mark.parametrize("seq_len", [3, 5, 7, 8, 9, 12])
@pytest.mark.parametrize("chunk_size", [4, 5])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_model_modes_agree_on_outputs_and_final_state(window, sinks, seq_len, chunk_size, kv_heads):
    torch.manual_seed(0)
    config = tiny_config(attention_window=window, attention_sinks=sinks, chunk_size=chunk_size, num_kv_heads=kv_heads)
    model = RetNetForCausalLM(config).eval()
    ids = torch.randint(0, 97, (2, seq_len))
    mask = make_mask(2, seq_len, "left")
    outs = {m: model(ids, attention_mask=mask, retention_mode=m, use_cache=True) for m in MODES}
    keep = mask.bool()
    for mode in ("chunkwise", "recurrent"):
        torch.testing.assert_close(outs[mode].logits[keep], outs["parallel"].logits[keep], atol=TOL, rtol=TOL)
        got, want = outs[mode][CACHE_FIELD], outs["parallel"][CACHE_FIELD]
        assert torch.equal(got.window_valid, want.window_valid) and torch.equal(got.doc_tokens, want.doc_tokens)
        for name in ("states", "window_keys", "window_values", "sink_keys", "sink_values"):
            for a, b in zip(getattr(got, name), getattr(want, name)):
                torch.testing.assert_close(a, b, atol=TOL, rtol=TOL, msg=name)
    cache = outs["parallel"][CACHE_FIELD]
    assert cache.sink_keys[0].shape == (2, kv_heads, sinks, 8)
    assert cache.sink_values[0].shape == (2, kv_heads, sinks, 16)
    assert cache.doc_tokens.tolist() == mask.sum(-1).tolist()


@pytest.mark.parametrize("padding", ["left", "right", "holes"])
def test_padding_is_invisible(padding):
    """The sinks are each row's first real tokens, after its padding: each row gives the logits it gives alone."""
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(initializer_range=0.2)).eval()
    ids = torch.randint(0, 97, (3, 12))
    mask = make_mask(3, 12, padding)
    batched = model(ids, attention_mask=mask).logits
    for row in range(3):
        real = mask[row].bool()
        torch.testing.assert_close(batched[row, real], model(ids[row, real][None]).logits[0], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("window, sinks", [(2, 1), (3, 4), (6, 2)])
@pytest.mark.parametrize("prefix", [1, 3, 5, 9])
def test_prefill_then_recurrent_decoding_equals_one_forward(window, sinks, prefix):
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(attention_window=window, attention_sinks=sinks, num_kv_heads=2)).eval()
    ids = torch.randint(0, 97, (2, 14))
    mask = make_mask(2, 14, "left")
    full = model(ids, attention_mask=mask, retention_mode="parallel").logits
    out = model(ids[:, :prefix], attention_mask=mask[:, :prefix], retention_mode="chunkwise", use_cache=True)
    cache, steps = out[CACHE_FIELD], [out.logits]
    for i in range(prefix, 14):
        out = model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], cache=cache, retention_mode="recurrent",
                    use_cache=True)
        cache, _ = out[CACHE_FIELD], steps.append(out.logits)
    keep = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[keep], full[keep], atol=TOL, rtol=TOL)


def test_state_is_constant_in_the_context_length():
    torch.manual_seed(0)
    config = tiny_config(attention_window=6, attention_sinks=3, num_kv_heads=2)
    model = RetNetForCausalLM(config).eval()
    sizes = {}
    for length in (20, 200):
        sizes[length] = model(torch.randint(0, 97, (1, length)), use_cache=True)[CACHE_FIELD].nbytes()
    per_layer = 2 * (8 * 16 + (6 + 3) * (8 + 16)) * 4  # retention state + window and sink keys/values, fp32, 2 kv heads
    assert sizes[20] == sizes[200] == config.num_hidden_layers * per_layer + 6 + 8  # + [1, W] flags + [1] doc count


@pytest.fixture(scope="module")
def sharp_model():
    torch.manual_seed(0)
    config = tiny_config(attention_window=3, attention_sinks=2, num_kv_heads=2, initializer_range=0.3, pad_token_id=0,
                         eos_token_id=1)
    return RetNetForCausalLM(config).eval()


def test_greedy_generate_equals_a_full_forward_argmax_loop(sharp_model):
    ids = torch.randint(3, 97, (2, 4))
    out = sharp_model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None,
                               return_dict_in_generate=True, output_logits=True)
    seq = ids
    for _ in range(10):
        seq = torch.cat([seq, sharp_model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, seq)
    full = sharp_model(seq, use_cache=False).logits[:, 3:-1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, atol=TOL, rtol=TOL)
    cache = out[CACHE_FIELD] if CACHE_FIELD in out else out.past_key_values
    assert isinstance(cache, RetNetCache) and cache.sink_keys[0].shape[2] == 2 and cache.doc_tokens.tolist() == [13, 13]


def test_left_padded_batch_generates_what_each_prompt_generates_alone(sharp_model):
    prompts = [torch.randint(3, 97, (n,)) for n in (2, 7, 4)]
    width = max(len(p) for p in prompts)
    ids, mask = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    batched = sharp_model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    for i, p in enumerate(prompts):
        alone = sharp_model.generate(p[None], max_new_tokens=8, do_sample=False, eos_token_id=None)
        assert torch.equal(batched[i, width:], alone[0, len(p) :]), f"prompt {i}"


def test_beam_search_scores_equal_rescoring_from_scratch(sharp_model):
    """Beam search reorders the cache, sink slots and document counts included."""
    ids = torch.randint(3, 97, (2, 4))
    out = sharp_model.generate(ids, max_new_tokens=7, num_beams=3, num_return_sequences=3, do_sample=False,
                               eos_token_id=None, length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    logp = torch.log_softmax(sharp_model(out.sequences, use_cache=False).logits.double(), -1)
    rescored = logp[:, 3:-1].gather(-1, out.sequences[:, 4:, None]).sum((1, 2))
    torch.testing.assert_close(out.sequences_scores.double(), rescored, atol=1e-4, rtol=0)


def test_sinks_matter_and_zero_sinks_is_the_window_only_hybrid():
    """Same weights: S = 0 is the existing hybrid (no sink state at all), and S > 0 changes the outputs once T > W."""
    torch.manual_seed(0)
    plain = RetNetForCausalLM(tiny_config(attention_sinks=0, initializer_range=0.2)).eval()
    with_sinks = RetNetForCausalLM(tiny_config(attention_sinks=2, initializer_range=0.2)).eval()
    with_sinks.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 97, (1, 12))
    a, b = plain(ids, use_cache=True), with_sinks(ids, use_cache=True)
    torch.testing.assert_close(a.logits[:, :3], b.logits[:, :3], atol=TOL, rtol=TOL)  # T <= W: nothing differs
    assert (a.logits[:, 4:] - b.logits[:, 4:]).abs().max() > 1e-3
    assert all(x is None for x in a[CACHE_FIELD].sink_keys) and a[CACHE_FIELD].doc_tokens is None


# ------------------------------------------------------------------------------------------------------------------
# Packed rows: every document keeps its own first S tokens
# ------------------------------------------------------------------------------------------------------------------

PACKED = {"edges": [5, 5, 8], "inside": [3, 7, 1, 6], "single_tokens": [1, 1, 7, 1]}


def packed_position_ids(lengths):
    return torch.cat([torch.arange(n) for n in lengths])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window, sinks", [(2, 1), (2, 3), (4, 2)])
@pytest.mark.parametrize("chunk_size", [2, 3])
@pytest.mark.parametrize("layout", sorted(PACKED))
def test_packed_row_equals_documents_alone(mode, window, sinks, chunk_size, layout):
    torch.manual_seed(0)
    config = tiny_config(attention_window=window, attention_sinks=sinks, chunk_size=chunk_size, num_kv_heads=2,
                         initializer_range=0.2)
    model = RetNetForCausalLM(config).eval()
    lengths = PACKED[layout]
    docs = [torch.randint(3, 97, (n,)) for n in lengths]
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], position_ids=packed_position_ids(lengths)[None], retention_mode=mode,
                       use_cache=True)
        alone = [model(d[None], retention_mode=mode, use_cache=True) for d in docs]
    torch.testing.assert_close(packed.logits[0], torch.cat([o.logits[0] for o in alone]), atol=TOL, rtol=TOL)
    got, want = packed[CACHE_FIELD], alone[-1][CACHE_FIELD]
    assert torch.equal(got.window_valid, want.window_valid) and torch.equal(got.doc_tokens, want.doc_tokens)
    for name in ("states", "window_keys", "window_values", "sink_keys", "sink_values"):
        for a, b in zip(getattr(got, name), getattr(want, name)):
            torch.testing.assert_close(a, b, atol=TOL, rtol=TOL, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_packed_rows_with_left_padding(mode):
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(attention_window=2, attention_sinks=2, chunk_size=3,
                                          initializer_range=0.2)).eval()
    rows = [[6, 3, 5], [7, 1]]
    width = max(sum(r) for r in rows) + 2
    ids, pos, mask = (torch.zeros(2, width, dtype=torch.long) for _ in range(3))
    docs = []
    for i, lengths in enumerate(rows):
        docs.append([torch.randint(3, 97, (n,)) for n in lengths])
        n = sum(lengths)
        ids[i, width - n :], pos[i, width - n :], mask[i, width - n :] = torch.cat(docs[i]), packed_position_ids(lengths), 1
    with torch.no_grad():
        packed = model(ids, attention_mask=mask, position_ids=pos, retention_mode=mode, use_cache=True)
        for i, row_docs in enumerate(docs):
            alone = torch.cat([model(d[None], retention_mode=mode).logits[0] for d in row_docs])
            torch.testing.assert_close(packed.logits[i][mask[i].bool()], alone, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("last", [1, 3, 8])
def test_decoding_after_a_packed_prompt_keeps_the_last_documents_sinks(last):
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(attention_window=3, attention_sinks=2, initializer_range=0.2)).eval()
    docs = [torch.randint(3, 97, (n,)) for n in (9, last)]
    tail = torch.randint(3, 97, (6,))
    with torch.no_grad():
        out = model(torch.cat(docs)[None], position_ids=packed_position_ids([9, last])[None], use_cache=True)
        cache, steps = out[CACHE_FIELD], []
        for token in tail:
            out = model(token.view(1, 1), cache=cache, use_cache=True)
            cache = out[CACHE_FIELD]
            steps.append(out.logits[0, -1])
        expected = model(torch.cat([docs[1], tail])[None]).logits[0, -6:]
    torch.testing.assert_close(torch.stack(steps), expected, atol=TOL, rtol=TOL)


# ------------------------------------------------------------------------------------------------------------------
# Against the Llama teacher: the converted hybrid is the teacher with its attention masked to window + sinks
# ------------------------------------------------------------------------------------------------------------------


def tiny_llama(kv_heads=2, **kw):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128, **kw)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


def window_sink_mask(mask, window, sinks):
    """[B, 1, T, T] float 0 / -inf allowing, in real-token ranks, exactly {k <= q and (q - k < W or k < S)}; padding
    keys are hidden, and a padding query sees itself (its output is never compared)."""
    rank = mask.cumsum(-1) - 1  # [B, T]
    q, k = rank[:, :, None], rank[:, None, :]
    real = mask.bool()
    allowed = (k <= q) & ((q - k < window) | (k < sinks)) & real[:, None, :] & real[:, :, None]
    allowed = allowed | torch.eye(mask.shape[1], dtype=torch.bool)
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, float("-inf"))[:, None]


def masked_teacher_logits(llama, ids, mask, window, sinks):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return llama(ids, attention_mask=window_sink_mask(mask, window, sinks), position_ids=positions).logits


@pytest.mark.parametrize("window, sinks", [(1, 1), (3, 0), (3, 1), (3, 4), (4, 2), (6, 3)])
@pytest.mark.parametrize("seq_len", [5, 7, 8, 9, 13])
@pytest.mark.parametrize("kv_heads", [2, 4, 1])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_converted_hybrid_is_the_window_and_sink_masked_teacher(window, sinks, seq_len, kv_heads, padding):
    """At conversion the retention part is silent (gate swish(0) = 0): the student is exactly the teacher whose
    attention sees {k <= q : q - k < W or k < S}, an independent implementation (eager attention, explicit mask).
    S = 0 included: the window-only hybrid used to add the retention part at full size on top of the window."""
    llama = tiny_llama(kv_heads)
    student = retnet_from_llama(llama, attention_window=window, attention_sinks=sinks, gate="constant",
                                chunk_size=4).eval()
    ids = torch.randint(0, 101, (2, seq_len), generator=torch.Generator().manual_seed(seq_len))
    mask = make_mask(2, seq_len, padding)
    want = masked_teacher_logits(llama, ids, mask, window, sinks)
    keep = mask.bool()
    if seq_len > window + sinks:  # the test can fail: the mask hides some tokens, and the sinks change the result
        assert (want[keep] - llama(ids, attention_mask=mask).logits[keep]).abs().max() > 1e-4
        if sinks:
            assert (want[keep] - masked_teacher_logits(llama, ids, mask, window, 0)[keep]).abs().max() > 1e-4
    for mode in MODES:
        got = student(ids, attention_mask=mask, retention_mode=mode).logits
        torch.testing.assert_close(got[keep], want[keep], atol=TOL, rtol=TOL, msg=mode)


@pytest.mark.parametrize("gate", ["none", "constant", "random"])
def test_every_gate_starts_with_retention_silent(gate):
    """Whatever the gate, the converted hybrid's retention part adds nothing, and something in it gets a gradient
    (stage 1 can grow it): with gate="constant" the gate itself (swish'(0) = 1/2), else the output-norm weight."""
    llama = tiny_llama()
    calib = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(1))
    student = retnet_from_llama(llama, attention_window=3, attention_sinks=2, gate=gate, decays="attention",
                                calibration_ids=calib)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(student(ids).logits, masked_teacher_logits(llama, ids, mask, 3, 2), atol=TOL, rtol=TOL)
    student(ids, labels=ids).loss.backward()
    retention = student.model.layers[0].retention
    grown = retention.g_proj.bias.grad if gate == "constant" else retention.group_norm.weight.grad
    assert grown is not None and grown.abs().max() > 0
    if gate == "constant":
        assert torch.all(retention.g_proj.weight == 0) and torch.all(retention.g_proj.bias == 0)
        assert retention.g_proj.weight.grad.abs().max() > 0
        assert torch.all(retention.group_norm.weight > 0)  # the calibrated scale waits for the gate to open
    else:
        assert torch.all(retention.group_norm.weight == 0)


def test_a_pure_retnet_conversion_is_unchanged_by_the_hybrid_init():
    """W = 0 keeps its constant gate swish(2) with the norm divided by it: the hybrid's silent start is hybrid only."""
    student = retnet_from_llama(tiny_llama(), gate="constant")
    retention = student.model.layers[0].retention
    swish = 2.0 / (1 + torch.exp(torch.tensor(-2.0)))
    assert torch.all(retention.g_proj.bias == 2.0)
    torch.testing.assert_close(retention.group_norm.weight, torch.full_like(retention.group_norm.weight, 1 / swish))


@pytest.mark.parametrize("sinks", [0, 2])
def test_a_window_longer_than_the_text_is_the_teacher(sinks):
    llama = tiny_llama()
    student = retnet_from_llama(llama, attention_window=32, attention_sinks=sinks).eval()
    ids = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = make_mask(2, 20, "left")
    want = llama(ids, attention_mask=mask).logits
    for mode in MODES:
        got = student(ids, attention_mask=mask, retention_mode=mode).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=TOL, rtol=TOL)


def test_generation_from_the_converted_hybrid_equals_the_masked_teacher():
    """Greedy decoding of the converted W + S hybrid picks, at every step, the argmax of the masked teacher."""
    llama = tiny_llama()
    student = retnet_from_llama(llama, attention_window=3, attention_sinks=2).eval()
    ids = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(4))
    out = student.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = masked_teacher_logits(llama, out, torch.ones_like(out), 3, 2)[:, 4:-1].argmax(-1)
    assert torch.equal(out[:, 5:], want)


# ------------------------------------------------------------------------------------------------------------------
# Config, save / load, remote code
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, needle", [
    (dict(attention_sinks=-1), "attention_sinks=-1 must be a non-negative"),
    (dict(attention_sinks=1.5), "must be a non-negative number of tokens"),
    (dict(attention_sinks=True), "must be a non-negative number of tokens"),
    (dict(attention_window=0, attention_sinks=4), "needs attention_window > 0"),
])
def test_bad_sinks_fail_clearly(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        tiny_config(**kwargs)


def test_a_config_saved_before_sinks_loads_without_them():
    legacy = {k: v for k, v in tiny_config().to_dict().items() if k != "attention_sinks"}
    assert RetNetConfig.from_dict(legacy).attention_sinks == 0


def test_save_and_reload_round_trip(tmp_path):
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(attention_window=4, attention_sinks=3, num_kv_heads=2)).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.attention_sinks == 3
    ids = torch.randint(0, 97, (2, 13))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_checkpoint_with_sinks_loads_as_remote_code_without_the_package(tmp_path):
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(attention_window=3, attention_sinks=2, num_kv_heads=2)).eval()
    model.save_pretrained(tmp_path / "hybrid")
    ids = torch.randint(0, 97, (2, 10))
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(model(ids).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "hf_retnet" or name.startswith("hf_retnet."):
                    raise ImportError("hf_retnet is blocked in this process")
        sys.meta_path.insert(0, Block())
        sys.path = [p for p in sys.path if p not in ("", {os.getcwd()!r})]
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "hybrid")!r}, trust_remote_code=True).eval()
        ids, expected = torch.load({str(tmp_path / "ids.pt")!r}), torch.load({str(tmp_path / "expected.pt")!r})
        for mode in ("parallel", "chunkwise", "recurrent"):
            torch.testing.assert_close(model(ids, retention_mode=mode).logits, expected, atol=1e-4, rtol=1e-4)
        out = model.generate(ids[:, :4], max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
        print("SINKS-REMOTE-OK", model.config.attention_sinks, out.shape[1])
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SINKS-REMOTE-OK 2 8" in result.stdout

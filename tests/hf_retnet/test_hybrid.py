"""The hybrid student (attention_window = W > 0, issue 25 item 4): softmax attention over the last W real tokens plus
retention over the older ones. The three modes agree (outputs and final state), the ops equal a plain per-token
reference, a converted student with W >= T is its teacher, the window is a sliding-window attention, decoding
carries a constant-size state, and W = 0 is the pure RetNet."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from hf_retnet import RetNetCache, RetNetConfig, RetNetForCausalLM, retnet_from_llama
from hf_retnet.modeling_retnet import (
    CACHE_FIELD,
    RetNetHybridAttention,
    RetNetMultiScaleRetention,
    WindowLayout,
    hybrid_window_retention,
)

TOL = 1e-4  # fp32, as tests/hf_retnet/test_retention_modes.py
MODES = ("parallel", "chunkwise", "recurrent")


def tiny_config(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4, intermediate_size=64, chunk_size=4,
                attention_window=4)
    return RetNetConfig(**{**base, **kw})


def make_mask(batch, seq_len, padding):
    """none / left / right padding, or holes (zeros between real tokens), different per row."""
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


def reference(q, k, v, gammas, mask, window):
    """Per row and head, over the real tokens in order (rank r): the output of query r is
    softmax_{window}(q.k) v over ranks r-W+1..r, plus sum_{s <= r-W} gamma^(r-s) (q.k_s) v_s; the final state is
    sum_{s <= N-1-W} gamma^(N-1-W-s) k_s^T v_s and the window the last min(N, W) keys/values, newest last."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    win_out, ret_out = torch.zeros(b, h, t, dv, dtype=torch.float64), torch.zeros(b, h, t, dv, dtype=torch.float64)
    state = torch.zeros(b, h, dk, dv, dtype=torch.float64)
    keys, values = torch.zeros(b, h, window, dk, dtype=torch.float64), torch.zeros(b, h, window, dv, dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for row in range(b):
        real = mask[row].nonzero().flatten().tolist()
        n = len(real)
        for head in range(h):
            g = gammas[head]
            for r, pos in enumerate(real):
                near = real[max(0, r - window + 1) : r + 1]
                scores = torch.stack([q[row, head, pos] @ k[row, head, m] for m in near])
                win_out[row, head, pos] = torch.softmax(scores, 0) @ v[row, head, near]
                for s in range(0, r - window + 1):
                    m = real[s]
                    ret_out[row, head, pos] += g ** (r - s) * (q[row, head, pos] @ k[row, head, m]) * v[row, head, m]
            for s in range(0, n - window):
                m = real[s]
                state[row, head] += g ** (n - 1 - window - s) * torch.outer(k[row, head, m], v[row, head, m])
            for slot, m in enumerate(real[-window:][::-1]):
                keys[row, head, window - 1 - slot], values[row, head, window - 1 - slot] = k[row, head, m], v[row, head, m]
    return win_out, ret_out, state, keys, values


def op_inputs(b, h, t, dk, dv, padding, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, h, t, dk, generator=g), torch.randn(b, h, t, dk, generator=g) * dk**-0.5
    v = torch.randn(b, h, t, dv, generator=g)
    mask = make_mask(b, t, padding)
    keep = mask[:, None, :, None].float()
    gammas = [0.5, 0.8, 0.95][:h]
    log_decay = torch.log(torch.tensor(gammas, dtype=torch.float64)).float()
    return q, k * keep, v * keep, mask, gammas, log_decay


@pytest.mark.parametrize("window", [1, 3, 4])
@pytest.mark.parametrize("seq_len", [1, 3, 4, 5, 9, 13])
@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("padding", ["none", "left", "right", "holes"])
def test_ops_equal_the_per_token_reference(window, seq_len, chunk_size, padding):
    q, k, v, mask, gammas, log_decay = op_inputs(2, 3, seq_len, 4, 5, padding)
    want = reference(q, k, v, gammas, mask, window)
    keep = mask.bool()
    for mode in MODES:
        layout = WindowLayout(mask, None, window)
        got = hybrid_window_retention(q, k, v, log_decay, layout, mode=mode, chunk_size=chunk_size)
        for name, a, e in zip(("window", "retention"), got[:2], want[:2]):
            torch.testing.assert_close(a.double()[keep.unsqueeze(1).expand(-1, 3, -1)],
                                       e[keep.unsqueeze(1).expand(-1, 3, -1)], atol=TOL, rtol=TOL, msg=f"{mode} {name}")
        torch.testing.assert_close(got[2].double(), want[2], atol=TOL, rtol=TOL, msg=f"{mode} state")
        valid = layout.next_window_valid  # [B, W]: the slots holding a real token
        for a, e in zip(got[3:], want[3:]):
            torch.testing.assert_close(a.double() * valid[:, None, :, None], e, atol=0, rtol=0)
        assert valid.sum(-1).tolist() == [min(window, n) for n in mask.sum(-1).tolist()]


@pytest.mark.parametrize("window", [2, 5])
@pytest.mark.parametrize("split", [1, 3, 7])
@pytest.mark.parametrize("padding", ["none", "left", "holes"])
def test_ops_continue_from_a_carried_window_and_state(window, split, padding):
    """A call over tokens [0, split) then one over the rest, carrying (state, window), equals one call."""
    q, k, v, mask, gammas, log_decay = op_inputs(2, 3, 11, 4, 5, padding, seed=3)
    whole = hybrid_window_retention(q, k, v, log_decay, WindowLayout(mask, None, window), mode="parallel")
    first_layout = WindowLayout(mask[:, :split], None, window)
    first = hybrid_window_retention(q[:, :, :split], k[:, :, :split], v[:, :, :split], log_decay, first_layout,
                                    mode="chunkwise", chunk_size=2)
    keep = mask.bool().unsqueeze(1).expand(-1, 3, -1)
    for mode in MODES:
        layout = WindowLayout(mask[:, split:], first_layout.next_window_valid, window)
        rest = hybrid_window_retention(q[:, :, split:], k[:, :, split:], v[:, :, split:], log_decay, layout,
                                       *first[2:], mode=mode, chunk_size=3)
        for i in range(2):
            joined = torch.cat([first[i], rest[i]], dim=2)
            torch.testing.assert_close(joined[keep], whole[i][keep], atol=TOL, rtol=TOL)
        for i in range(2, 5):
            torch.testing.assert_close(rest[i], whole[i], atol=TOL, rtol=TOL)


# ------------------------------------------------------------------------------------------------------------------
# The model: modes, continuation, generation
# ------------------------------------------------------------------------------------------------------------------


def run_modes(model, ids, mask):
    return {m: model(ids, attention_mask=mask, retention_mode=m, use_cache=True) for m in MODES}


@pytest.mark.parametrize("window", [1, 4, 5, 8])
@pytest.mark.parametrize("seq_len", [3, 4, 5, 8, 9, 12])
@pytest.mark.parametrize("chunk_size", [4, 5])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_model_modes_agree(window, seq_len, chunk_size, kv_heads):
    torch.manual_seed(0)
    config = tiny_config(attention_window=window, chunk_size=chunk_size, num_kv_heads=kv_heads)
    model = RetNetForCausalLM(config).eval()
    ids = torch.randint(0, 97, (2, seq_len))
    mask = make_mask(2, seq_len, "left")
    outs = run_modes(model, ids, mask)
    keep = mask.bool()
    for mode in ("chunkwise", "recurrent"):
        torch.testing.assert_close(outs[mode].logits[keep], outs["parallel"].logits[keep], atol=TOL, rtol=TOL)
        got, want = outs[mode][CACHE_FIELD], outs["parallel"][CACHE_FIELD]
        assert torch.equal(got.window_valid, want.window_valid)
        for name in ("states", "window_keys", "window_values"):
            for a, b in zip(getattr(got, name), getattr(want, name)):
                torch.testing.assert_close(a, b, atol=TOL, rtol=TOL, msg=name)
        assert got.states[0].shape == (2, kv_heads, 8, 16)
        assert got.window_keys[0].shape == (2, kv_heads, window, 8)
        assert got.window_values[0].shape == (2, kv_heads, window, 16)


@pytest.mark.parametrize("padding", ["none", "left", "right", "holes"])
@pytest.mark.parametrize("options", [dict(), dict(use_output_gate=False, value_factor=1, num_kv_heads=2),
                                     dict(gate_bias=True, retention_decays=[[0.3, 0.9, 0.95, 0.99], [0.6] * 4])])
def test_model_modes_agree_with_padding_and_options(padding, options):
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(attention_window=3, **options)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    ids = torch.randint(0, 97, (3, 11))
    mask = make_mask(3, 11, padding)
    outs = run_modes(model, ids, mask)
    keep = mask.bool()
    for mode in ("chunkwise", "recurrent"):
        torch.testing.assert_close(outs[mode].logits[keep], outs["parallel"].logits[keep], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("padding", ["left", "holes"])
def test_padding_is_invisible(padding):
    """Each sequence of a padded batch gives the logits it gives alone (the window counts real tokens only)."""
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(attention_window=3)).eval()
    ids = torch.randint(0, 97, (3, 12))
    mask = make_mask(3, 12, padding)
    batched = model(ids, attention_mask=mask).logits
    for row in range(3):
        real = mask[row].bool()
        alone = model(ids[row, real][None]).logits[0]
        torch.testing.assert_close(batched[row, real], alone, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("window", [2, 6])
@pytest.mark.parametrize("prefix", [1, 5, 9])
def test_prefill_then_recurrent_decoding_equals_one_forward(window, prefix):
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(attention_window=window, num_kv_heads=2)).eval()
    ids = torch.randint(0, 97, (2, 14))
    mask = make_mask(2, 14, "left")
    full = model(ids, attention_mask=mask, retention_mode="parallel").logits
    out = model(ids[:, :prefix], attention_mask=mask[:, :prefix], retention_mode="chunkwise", use_cache=True)
    cache, steps = out[CACHE_FIELD], [out.logits]
    for i in range(prefix, 14):
        out = model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], cache=cache, retention_mode="recurrent",
                    use_cache=True)
        cache = out[CACHE_FIELD]
        steps.append(out.logits)
    keep = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[keep], full[keep], atol=TOL, rtol=TOL)


def test_state_is_constant_in_the_context_length():
    torch.manual_seed(0)
    config = tiny_config(attention_window=6, num_kv_heads=2)
    model = RetNetForCausalLM(config).eval()
    sizes = {}
    for length in (20, 200):
        cache = model(torch.randint(0, 97, (1, length)), use_cache=True)[CACHE_FIELD]
        sizes[length] = cache.nbytes()
    per_layer = 2 * (8 * 16 + 6 * 8 + 6 * 16) * 4  # retention state + window keys + values, fp32, 2 k/v heads
    assert sizes[20] == sizes[200] == config.num_hidden_layers * per_layer + 6  # + the [1, W] slot flags


@pytest.fixture(scope="module")
def sharp_model():
    """Larger init: next-token distributions depend strongly on the context, so a lost window cannot hide."""
    torch.manual_seed(0)
    config = tiny_config(attention_window=3, num_kv_heads=2, initializer_range=0.3, pad_token_id=0, eos_token_id=1)
    return RetNetForCausalLM(config).eval()


def test_greedy_generate_equals_a_full_forward_argmax_loop(sharp_model):
    ids = torch.randint(3, 97, (2, 5))
    out = sharp_model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None,
                               return_dict_in_generate=True, output_logits=True)
    seq = ids
    for _ in range(10):
        nxt = sharp_model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out.sequences, seq)
    full = sharp_model(seq, use_cache=False).logits[:, 4:-1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, atol=TOL, rtol=TOL)
    cache = out[CACHE_FIELD] if CACHE_FIELD in out else out.past_key_values
    assert isinstance(cache, RetNetCache) and cache.window_keys[0].shape[2] == 3


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
    """Beam search reorders the cache, window included: the returned scores must equal a fresh forward's."""
    ids = torch.randint(3, 97, (2, 4))
    out = sharp_model.generate(ids, max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False,
                               eos_token_id=None, length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    logp = torch.log_softmax(sharp_model(out.sequences, use_cache=False).logits.double(), -1)
    rescored = logp[:, 3:-1].gather(-1, out.sequences[:, 4:, None]).sum((1, 2))
    torch.testing.assert_close(out.sequences_scores.double(), rescored, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# From the teacher
# ------------------------------------------------------------------------------------------------------------------


def tiny_llama(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(LlamaConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize("gate", ["none", "constant", "random"])
def test_a_window_longer_than_the_text_is_the_teacher(gate):
    """W >= T: no token has left the window, the retention part is exactly zero and the layer is the teacher's
    attention, whatever the decays, norm scales or gate."""
    llama = tiny_llama()
    calib = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(2))
    student = retnet_from_llama(llama, attention_window=64, gate=gate, decays="attention", calibration_ids=calib).eval()
    ids = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(3))
    teacher = llama(ids).logits
    for mode in MODES:
        torch.testing.assert_close(student(ids, retention_mode=mode).logits, teacher, atol=TOL, rtol=TOL)
    plain = retnet_from_llama(llama, gate=gate, decays="attention", calibration_ids=calib).eval()
    assert (plain(ids).logits - teacher).abs().max() > 1e-2, "the pure RetNet is not the teacher: the test can fail"


def test_a_long_window_student_left_padded_and_generating_is_the_teacher():
    llama = tiny_llama()
    student = retnet_from_llama(llama, attention_window=64).eval()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(4))
    ids[0, :3] = 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    teacher = llama(ids, attention_mask=mask).logits
    torch.testing.assert_close(student(ids, attention_mask=mask).logits[mask.bool()], teacher[mask.bool()],
                               atol=TOL, rtol=TOL)
    theirs = llama.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    ours = student.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("window", [3, 5])
def test_without_retention_the_window_is_sliding_window_attention(window):
    """T > W with the retention part switched off (its norm weights zeroed): the student is the same weights run
    as transformers' Mistral with sliding_window = W, an independent sliding-window attention."""
    llama = tiny_llama()
    student = retnet_from_llama(llama, attention_window=window).eval()
    with torch.no_grad():
        for layer in student.model.layers:
            layer.retention.group_norm.weight.zero_()
    mistral_config = MistralConfig(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, rms_norm_eps=llama.config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, sliding_window=window,
    )
    mistral_config._attn_implementation = "eager"
    mistral = MistralForCausalLM(mistral_config).eval()
    mistral.load_state_dict(llama.state_dict())
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(5))
    want = mistral(ids).logits
    assert (want - llama(ids).logits).abs().max() > 1e-3, "the window must matter at this length"
    for mode in MODES:
        torch.testing.assert_close(student(ids, retention_mode=mode).logits, want, atol=TOL, rtol=TOL)


# ------------------------------------------------------------------------------------------------------------------
# Config, save / load, dtypes, W = 0
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, needle", [
    (dict(attention_window=-1), "attention_window=-1 must be a non-negative"),
    (dict(attention_window=2.5), "must be a non-negative number of tokens"),
    (dict(attention_window=4, retention_score_normalization=True), "cannot be combined"),
])
def test_bad_windows_fail_clearly(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        tiny_config(**kwargs)


def test_window_zero_is_the_pure_retnet_with_the_same_parameters():
    torch.manual_seed(0)
    pure = RetNetForCausalLM(tiny_config(attention_window=0)).eval()
    torch.manual_seed(0)
    hybrid = RetNetForCausalLM(tiny_config(attention_window=4)).eval()
    assert type(pure.model.layers[0].retention) is RetNetMultiScaleRetention
    assert type(hybrid.model.layers[0].retention) is RetNetHybridAttention
    assert {k: v.shape for k, v in pure.state_dict().items()} == {k: v.shape for k, v in hybrid.state_dict().items()}
    for name, tensor in pure.state_dict().items():  # same init: a checkpoint moves between the two as is
        assert torch.equal(hybrid.state_dict()[name], tensor), name
    cache = pure(torch.randint(0, 97, (1, 9)), use_cache=True)[CACHE_FIELD]
    assert cache.window_valid is None and all(k is None for k in cache.window_keys)


def test_save_and_reload_round_trip(tmp_path):
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(attention_window=5, num_kv_heads=2)).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.attention_window == 5
    assert type(reloaded.model.layers[1].retention) is RetNetHybridAttention
    ids = torch.randint(0, 97, (2, 13))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_bf16_model_keeps_an_fp32_state_close_to_fp32():
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(attention_window=3)).eval()
    ids = torch.randint(0, 97, (2, 12))
    ref = model(ids).logits
    low = model.to(torch.bfloat16)
    out = low(ids, use_cache=True)
    cache = out[CACHE_FIELD]
    assert all(t.dtype == torch.float32 for t in (*cache.states, *cache.window_keys, *cache.window_values))
    assert (out.logits.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_gradients_parallel_vs_chunkwise():
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(attention_window=3, num_kv_heads=2))
    ids = torch.randint(0, 97, (2, 13))
    mask = make_mask(2, 13, "left")
    grads = {}
    for mode in ("parallel", "chunkwise"):
        model.zero_grad()
        model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), retention_mode=mode).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["parallel"].items():
        assert not math.isnan(g.abs().sum().item()), name
        torch.testing.assert_close(grads["chunkwise"][name], g, atol=TOL, rtol=1e-3, msg=name)


def test_hybrid_checkpoint_loads_as_remote_code_without_the_package(tmp_path):
    """The hybrid path lives in the self-contained modeling file: a saved checkpoint runs where hf_retnet is not
    importable (as from the Hub with trust_remote_code) and gives the same logits in every mode."""
    import os
    import subprocess
    import sys
    import textwrap

    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(attention_window=3, num_kv_heads=2)).eval()
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
        print("HYBRID-REMOTE-OK", model.config.attention_window)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HYBRID-REMOTE-OK 3" in result.stdout


# ------------------------------------------------------------------------------------------------------------------
# Packed rows (position_ids restarting at each document): the window never reaches into the previous document
# ------------------------------------------------------------------------------------------------------------------

PACKED = {"edges": [4, 4, 8], "inside": [3, 5, 1, 6], "single_tokens": [1, 1, 5, 1]}


def packed_position_ids(lengths):
    return torch.cat([torch.arange(n) for n in lengths])


def assert_same_carried_state(got, want, row=0):
    """States and the real window slots of `got` (row `row`) equal `want`'s (a batch of one)."""
    assert torch.equal(got.window_valid[row : row + 1], want.window_valid)
    for a, b in zip(got.states, want.states):
        torch.testing.assert_close(a[row : row + 1], b, atol=TOL, rtol=TOL)
    for name in ("window_keys", "window_values"):
        for a, b in zip(getattr(got, name), getattr(want, name)):
            torch.testing.assert_close(a[row : row + 1], b, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window", [2, 5])
@pytest.mark.parametrize("chunk_size", [2, 3, 4])
@pytest.mark.parametrize("layout", sorted(PACKED))
def test_packed_row_equals_documents_alone(mode, window, chunk_size, layout):
    torch.manual_seed(0)
    config = tiny_config(attention_window=window, chunk_size=chunk_size, num_kv_heads=2, initializer_range=0.2)
    model = RetNetForCausalLM(config).eval()
    lengths = PACKED[layout]
    docs = [torch.randint(3, 97, (n,)) for n in lengths]
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], position_ids=packed_position_ids(lengths)[None], retention_mode=mode,
                       use_cache=True)
        alone = [model(d[None], retention_mode=mode, use_cache=True) for d in docs]
    torch.testing.assert_close(packed.logits[0], torch.cat([o.logits[0] for o in alone]), atol=TOL, rtol=TOL)
    assert_same_carried_state(packed[CACHE_FIELD], alone[-1][CACHE_FIELD])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_packed_rows_with_padding(mode, padding):
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(attention_window=3, chunk_size=3, initializer_range=0.2)).eval()
    rows = [[4, 3, 2], [5, 1]]
    width = max(sum(r) for r in rows) + 2
    ids, pos, mask = (torch.zeros(2, width, dtype=torch.long) for _ in range(3))
    docs = []
    for i, lengths in enumerate(rows):
        docs.append([torch.randint(3, 97, (n,)) for n in lengths])
        n = sum(lengths)
        sl = slice(width - n, width) if padding == "left" else slice(0, n)
        ids[i, sl], pos[i, sl], mask[i, sl] = torch.cat(docs[i]), packed_position_ids(lengths), 1
    with torch.no_grad():
        packed = model(ids, attention_mask=mask, position_ids=pos, retention_mode=mode, use_cache=True)
        for i, row_docs in enumerate(docs):
            alone = [model(d[None], retention_mode=mode, use_cache=True) for d in row_docs]
            torch.testing.assert_close(packed.logits[i][mask[i].bool()], torch.cat([o.logits[0] for o in alone]),
                                       atol=TOL, rtol=TOL)
            assert_same_carried_state(packed[CACHE_FIELD], alone[-1][CACHE_FIELD], row=i)


@pytest.mark.parametrize("last", [2, 6])
def test_decoding_after_a_packed_prompt_continues_its_last_document(last):
    """The last document shorter or longer than the window: decoding reads its window and state only."""
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(attention_window=4, initializer_range=0.2)).eval()
    docs = [torch.randint(3, 97, (n,)) for n in (7, last)]
    tail = torch.randint(3, 97, (5,))
    with torch.no_grad():
        out = model(torch.cat(docs)[None], position_ids=packed_position_ids([7, last])[None], use_cache=True)
        cache, steps = out[CACHE_FIELD], []
        for token in tail:
            out = model(token.view(1, 1), cache=cache, use_cache=True)
            cache = out[CACHE_FIELD]
            steps.append(out.logits[0, -1])
        expected = model(torch.cat([docs[1], tail])[None]).logits[0, -5:]
    torch.testing.assert_close(torch.stack(steps), expected, atol=TOL, rtol=TOL)

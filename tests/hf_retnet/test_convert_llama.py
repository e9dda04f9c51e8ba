"""Llama -> RetNet conversion: copied tensors equal the teacher's, save / reload (also trust_remote_code in a fresh
process), the three retention modes agree, and the teacher-derived parts (decays, norm scales, gate) are sane."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_retnet import RetNetForCausalLM, retnet_from_llama
from hf_retnet.convert_llama import attention_statistics, copied_parameter_names, decays_from_distances
from hf_retnet.modeling_retnet import CACHE_FIELD

TOL = 1e-4


def tiny_llama(tie=False, **kw):
    base = dict(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**base, **kw})).eval()


def ids(batch=2, length=12, seed=1):
    return torch.randint(0, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("share_kv", [True, False])
@pytest.mark.parametrize("gate", ["none", "constant", "random"])
@pytest.mark.parametrize("tie", [False, True])
def test_every_copied_tensor_equals_the_teacher(share_kv, gate, tie):
    llama = tiny_llama(tie=tie)
    student = RetNetForCausalLM.from_llama(llama, share_kv=share_kv, gate=gate)
    theirs, ours = llama.state_dict(), student.state_dict()
    names = copied_parameter_names(student.config)
    assert len(names) == 2 + (not tie) + 9 * llama.config.num_hidden_layers
    for name, source in names.items():
        expected = theirs[source]
        if not share_kv and name.endswith(("k_proj.weight", "v_proj.weight")):  # k/v heads repeated per query head
            expected = expected.unflatten(0, (2, -1)).repeat_interleave(2, 0).flatten(0, 1)
        assert torch.equal(ours[name], expected), name
    state = student(ids(), use_cache=True)[CACHE_FIELD].states[0]
    assert state.shape[1] == (2 if share_kv else 4)  # shared k/v heads share their state
    assert student.config.num_kv_heads == (2 if share_kv else 4)
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tie
    if gate == "constant":  # starts as a constant gate whose weights still learn
        gate_proj = student.model.layers[0].retention.g_proj
        assert torch.all(gate_proj.weight == 0) and torch.all(gate_proj.bias > 0)
    assert (student.model.layers[0].retention.g_proj is None) == (gate == "none")


def test_converted_round_trip_auto_class_and_modes(tmp_path):
    llama = tiny_llama()
    calib = ids(4, 24, seed=3)
    student = retnet_from_llama(llama, decays="attention", calibration_ids=calib, gate="constant").eval()
    x = ids()
    outs = {m: student(x, retention_mode=m).logits for m in ("parallel", "chunkwise", "recurrent")}
    for mode in ("chunkwise", "recurrent"):
        torch.testing.assert_close(outs[mode], outs["parallel"], atol=TOL, rtol=TOL)
    student.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert type(reloaded) is RetNetForCausalLM
    assert reloaded.config.retention_decays == student.config.retention_decays
    for name, tensor in student.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert torch.equal(reloaded(x, retention_mode="parallel").logits, outs["parallel"])

    torch.save(x, tmp_path / "ids.pt")
    torch.save(outs["parallel"], tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        class Block:  # as on the Hub: hf_retnet is not importable
            def find_spec(self, name, path=None, target=None):
                if name == "hf_retnet" or name.startswith("hf_retnet."):
                    raise ImportError("hf_retnet is blocked in this process")
        sys.meta_path.insert(0, Block())
        sys.path = [p for p in sys.path if p not in ("", {os.getcwd()!r})]
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "student")!r}, trust_remote_code=True).eval()
        x = torch.load({str(tmp_path / "ids.pt")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        for mode in ("parallel", "chunkwise", "recurrent"):
            torch.testing.assert_close(model(x, retention_mode=mode).logits, expected, atol=1e-4, rtol=1e-4)
        print("CONVERTED-REMOTE-OK", model.config.num_kv_heads)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CONVERTED-REMOTE-OK 2" in result.stdout


def test_from_a_saved_folder_with_llama3_rope_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    llama = tiny_llama(rope_scaling=scaling, rope_theta=500000.0, head_dim=16)
    llama.save_pretrained(tmp_path / "llama")
    student = RetNetForCausalLM.from_llama(str(tmp_path / "llama"))
    assert student.config.rotary_scaling["factor"] == 32.0 and student.config.rope_theta == 500000.0
    assert student.config.head_dim == 16
    ours = student.model.rotary_emb.inv_freq
    theirs = llama.model.rotary_emb.inv_freq
    torch.testing.assert_close(ours, theirs.float())


def test_attention_decays_follow_attention_distance():
    """A head whose attention reads further back gets a slower decay; gamma = D / (1 + D)."""
    distances = torch.tensor([[0.5, 1.5, 9.0, 99.0]])
    got = decays_from_distances(distances, kv_heads=2)
    torch.testing.assert_close(torch.tensor(got), torch.tensor([[0.5, 54.0 / 55.0]]))


def uniform_attention_distance(lengths):
    """Closed form for attention that is uniform over the causal prefix: after dropping the sink (real position 0)
    and renormalising, query n >= 1 reads positions 1..n evenly, mean distance (n - 1) / 2; averaged over queries."""
    total = sum((n - 1) / 2 for length in lengths for n in range(1, length))
    return total / sum(length - 1 for length in lengths)


@pytest.mark.parametrize("pads", [(0, 0, 0), (3, 0, 5)])
def test_distances_equal_a_constructed_teacher(pads):
    """q_proj = 0 makes every score 0, so attention is uniform over each row's real prefix and the distances have a
    closed form. Keeping the sink, not renormalising, counting padding or taking column 0 as the sink all miss it."""
    llama = tiny_llama()
    with torch.no_grad():
        for layer in llama.model.layers:
            layer.self_attn.q_proj.weight.zero_()
    lengths = [16 - p for p in pads]
    x, mask = torch.zeros(3, 16, dtype=torch.long), torch.zeros(3, 16, dtype=torch.long)
    for row, p in enumerate(pads):  # left padding: row lengths 16 - pads
        x[row, p:], mask[row, p:] = ids(1, 16 - p, seed=row)[0], 1
    dist, _ = attention_statistics(llama, x, mask)
    torch.testing.assert_close(dist, torch.full((2, 4), uniform_attention_distance(lengths)), atol=1e-5, rtol=0)


def test_distances_equal_an_independent_loop_over_the_attention():
    """On a random teacher with left padding: the vectorised statistics equal a plain loop over the teacher's own
    attention probabilities (positions counted from each row's first real token, that token's column dropped)."""
    llama = tiny_llama()
    x, mask = torch.zeros(2, 14, dtype=torch.long), torch.zeros(2, 14, dtype=torch.long)
    x[0], mask[0] = ids(1, 14, seed=5)[0], 1
    x[1, 4:], mask[1, 4:] = ids(1, 10, seed=6)[0], 1
    dist, _ = attention_statistics(llama, x, mask)
    llama.set_attn_implementation("eager")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    attentions = llama(input_ids=x, attention_mask=mask, position_ids=positions, output_attentions=True).attentions
    expected = torch.zeros(2, 4)
    for layer, probs in enumerate(attentions):
        for head in range(4):
            per_query = []
            for row in range(2):
                real = mask[row].nonzero().flatten().tolist()
                for qi in range(1, len(real)):  # query at real position qi; keys at real positions 1..qi
                    weights = [probs[row, head, real[qi], real[m]].item() for m in range(1, qi + 1)]
                    per_query.append(sum(w * (qi - m) for w, m in zip(weights, range(1, qi + 1))) / sum(weights))
            expected[layer, head] = sum(per_query) / len(per_query)
    torch.testing.assert_close(dist, expected, atol=1e-5, rtol=1e-5)


def test_left_padded_calibration_gives_the_unpadded_decays():
    """Issue 22: with left padding the sink is each row's first real token, not column 0. Tolerance 1e-5: the
    padded and unpadded teacher forwards differ only by float rounding."""
    llama = tiny_llama()
    calib = ids(3, 12, seed=7)
    x, mask = torch.zeros(3, 17, dtype=torch.long), torch.zeros(3, 17, dtype=torch.long)
    for row, p in enumerate((5, 0, 2)):
        x[row, p : p + 12], mask[row, p : p + 12] = calib[row], 1
    # rows 1 and 2 also end in right padding (5 and 3 pads)
    plain = retnet_from_llama(llama, decays="attention", calibration_ids=calib)
    padded = retnet_from_llama(llama, decays="attention", calibration_ids=x, calibration_mask=mask)
    torch.testing.assert_close(torch.tensor(padded.config.retention_decays), torch.tensor(plain.config.retention_decays),
                               atol=1e-5, rtol=0)
    for a, b in zip(plain.model.layers, padded.model.layers):  # the calibrated norm scales too
        torch.testing.assert_close(b.retention.group_norm.weight, a.retention.group_norm.weight, atol=1e-5, rtol=1e-5)


def test_statistics_follow_the_teacher_device():
    """Issue 22: every tensor is built where the teacher lives. On the meta device (no data, but device checks
    are real) a CPU-built position grid or CPU calibration ids raise; the result must come back on the teacher's
    device with the right shapes."""
    llama = tiny_llama().to("meta")
    try:
        llama(torch.zeros(1, 2, dtype=torch.long, device="meta"))
    except RuntimeError as err:  # transformers 5.2 on torch 2.9: autocast knows no meta device
        pytest.skip(f"this transformers/torch pair cannot run a Llama on the meta device ({err})")
    calib, mask = ids(2, 10), torch.ones(2, 10, dtype=torch.long)  # on the CPU, as callers pass them
    mask[1, :3] = 0
    dist, rms = attention_statistics(llama, calib, mask)
    assert dist.device.type == rms.device.type == "meta"
    assert dist.shape == rms.shape == (2, 4) and dist.dtype == rms.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_statistics_on_a_cuda_teacher_equal_the_cpu_ones():
    llama = tiny_llama()
    calib, mask = ids(2, 12), torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    on_cpu = attention_statistics(llama, calib, mask)
    on_gpu = attention_statistics(llama.cuda(), calib, mask)
    for a, b in zip(on_cpu, on_gpu):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)


def test_calibrated_norm_matches_attention_head_size():
    llama = tiny_llama()
    calib = ids(4, 16)
    _, rms = attention_statistics(llama, calib)
    student = retnet_from_llama(llama, calibration_ids=calib, gate="none")
    weight = student.model.layers[1].retention.group_norm.weight.unflatten(0, (4, -1))
    torch.testing.assert_close(weight[:, 0], rms[1])


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(decays="attention"), "pass calibration_ids"),
        (dict(decays="learned"), "give one of"),
        (dict(gate="sigmoid"), "not one of"),
    ],
)
def test_bad_arguments_fail_clearly(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        retnet_from_llama(tiny_llama(), **kwargs)


def test_attention_bias_teacher_is_refused():
    with pytest.raises(ValueError, match="attention_bias"):
        retnet_from_llama(tiny_llama(attention_bias=True))

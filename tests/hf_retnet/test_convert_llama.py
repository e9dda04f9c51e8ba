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
    llama = tiny_llama()
    dist, rms = attention_statistics(llama, ids(2, 16))
    assert dist.shape == rms.shape == (2, 4)
    assert torch.all(dist >= 0) and torch.all(dist <= 15) and torch.all(rms > 0)


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

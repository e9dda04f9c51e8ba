"""Shallower students from a teacher (issue 25, item 3): from_llama(layers=...) copies exactly the chosen teacher
layers, records them, takes their decays and norm scales; select_layers drops the blocks that change their input
least, and always keeps the first and the last."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_retnet import RetNetConfig, RetNetForCausalLM, retnet_from_llama
from hf_retnet.convert_llama import (
    attention_statistics,
    copied_parameter_names,
    decays_from_distances,
    layer_importance,
    select_layers,
)


def tiny_llama(layers=6, **kw):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **kw,
    )
    return LlamaForCausalLM(config).eval()


def ids(batch=3, length=16, seed=1):
    return torch.randint(0, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


def make_identity(llama, layer):
    """Zero the block's two writes to the residual stream: it then returns its input unchanged."""
    with torch.no_grad():
        llama.model.layers[layer].self_attn.o_proj.weight.zero_()
        llama.model.layers[layer].mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("layers", [[0, 5], [0, 2, 3, 5], [1, 4], [0, 1, 2, 3, 4, 5]])
@pytest.mark.parametrize("tie", [False, True])
def test_kept_layers_are_the_teachers_chosen_layers(layers, tie):
    llama = tiny_llama(tie_word_embeddings=tie)
    student = retnet_from_llama(llama, layers=layers)
    assert student.config.num_hidden_layers == len(layers)
    assert student.config.teacher_layers == layers
    theirs, ours = llama.state_dict(), student.state_dict()
    expected = {"retention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                **{f"retention.{p}.weight": f"self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
                **{f"mlp.{p}.weight": f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}}
    for i, source in enumerate(layers):  # written out here, independently of copied_parameter_names
        for mine, teachers in expected.items():
            assert torch.equal(ours[f"model.layers.{i}.{mine}"], theirs[f"model.layers.{source}.{teachers}"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(ours[name], theirs[name])
    assert set(copied_parameter_names(student.config).values()) >= {
        f"model.layers.{source}.self_attn.q_proj.weight" for source in layers
    }


def test_teacher_layers_survive_save_and_reload(tmp_path):
    student = retnet_from_llama(tiny_llama(), layers=[0, 3, 5], attention_window=4)
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.teacher_layers == [0, 3, 5] and reloaded.config.attention_window == 4
    x = ids(2, 9)
    torch.testing.assert_close(reloaded(x).logits, student(x).logits, atol=0, rtol=0)


def test_an_identity_block_is_dropped_first():
    llama = tiny_llama()
    make_identity(llama, 3)
    calib = ids()
    scores = layer_importance(llama, calib)
    assert scores.shape == (6,)
    assert scores[3].abs() < 1e-6, "an identity block leaves its input unchanged"
    others = torch.cat([scores[:3], scores[4:]])
    assert torch.all(others > 1e-4), f"the other blocks must change their input measurably: {scores.tolist()}"
    assert select_layers(llama, calib, keep=5) == [0, 1, 2, 4, 5]
    # fewer kept: the identity block is still among the dropped, and the first and last always stay
    for keep in (2, 3, 4):
        chosen = select_layers(llama, calib, keep=keep)
        assert len(chosen) == keep and chosen[0] == 0 and chosen[-1] == 5 and 3 not in chosen
        assert chosen == sorted(chosen)
        kept_middle = [i for i in range(1, 5) if i in chosen]
        dropped_middle = [i for i in range(1, 5) if i not in chosen]
        assert min(scores[kept_middle], default=1e9) >= max(scores[dropped_middle])  # the most important stay


def test_first_and_last_layers_are_kept_even_when_they_do_nothing():
    llama = tiny_llama()
    make_identity(llama, 0)
    make_identity(llama, 5)
    assert select_layers(llama, ids(), keep=3)[::2] == [0, 5]


def test_padding_does_not_count_in_the_scores():
    """Scores average over real tokens: a left-padded batch scores like the same sequences unpadded."""
    llama = tiny_llama()
    calib = ids(2, 12)
    x, mask = torch.zeros(2, 15, dtype=torch.long), torch.zeros(2, 15, dtype=torch.long)
    x[0, 3:], mask[0, 3:] = calib[0], 1
    x[1, :12], mask[1, :12] = calib[1], 1  # and right padding on the other row
    torch.testing.assert_close(layer_importance(llama, x, mask), layer_importance(llama, calib), atol=1e-5, rtol=1e-4)


def test_decays_and_norms_of_kept_layers_come_from_those_layers():
    llama = tiny_llama()
    calib = ids()
    layers = [0, 2, 5]
    distances, head_rms = attention_statistics(llama, calib)
    student = retnet_from_llama(llama, layers=layers, decays="attention", calibration_ids=calib)
    expected = decays_from_distances(distances[layers], kv_heads=2)
    torch.testing.assert_close(torch.tensor(student.config.retention_decays), torch.tensor(expected))
    assert torch.tensor(expected).unique().numel() > 2, "layers must differ for this to test anything"
    for i, source in enumerate(layers):
        torch.testing.assert_close(student.model.layers[i].retention.log_decay.exp(), torch.tensor(expected[i]))
        scale = student.model.layers[i].retention.group_norm.weight.unflatten(0, (4, -1))[:, 0]
        torch.testing.assert_close(scale, head_rms[source])


def test_hybrid_subset_student_reproduces_the_pruned_teacher():
    """Layers kept + a window longer than the text: the student is the teacher with the other layers removed."""
    llama = tiny_llama()
    layers = [0, 1, 4, 5]
    student = retnet_from_llama(llama, layers=layers, attention_window=64).eval()
    pruned = tiny_llama(layers=len(layers))
    state = {}
    for name, tensor in llama.state_dict().items():
        if name.startswith("model.layers."):
            source = int(name.split(".")[2])
            if source not in layers:
                continue
            name = name.replace(f"model.layers.{source}.", f"model.layers.{layers.index(source)}.", 1)
        state[name] = tensor
    pruned.load_state_dict(state)
    x = ids(2, 12)
    torch.testing.assert_close(student(x).logits, pruned(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "layers, needle",
    [([], "must be distinct"), ([0, 6], "in \\[0, 6\\)"), ([3, 1], "increasing"), ([1, 1], "distinct"),
     ([0.5], "must be distinct")],
)
def test_bad_layer_lists_fail_clearly(layers, needle):
    with pytest.raises(ValueError, match=needle):
        retnet_from_llama(tiny_llama(), layers=layers)


@pytest.mark.parametrize("keep", [1, 7, 0])
def test_bad_keep_fails_clearly(keep):
    with pytest.raises(ValueError, match="keep="):
        select_layers(tiny_llama(), ids(), keep=keep)


def test_config_validates_teacher_layers():
    with pytest.raises(ValueError, match="teacher_layers"):
        RetNetConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4, teacher_layers=[0])
    with pytest.raises(ValueError, match="teacher_layers"):
        RetNetConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4, teacher_layers=[2, 1])
    config = RetNetConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4, teacher_layers=[1, 4])
    assert RetNetForCausalLM(config).config.teacher_layers == [1, 4]

"""Config: variants' sizes, Auto registration, and clear errors for bad input."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import hf_retnet
from hf_retnet import RetNetConfig, RetNetForCausalLM, RetNetModel


@pytest.mark.parametrize("name, target", [("350M", 350e6), ("500M", 500e6)])
def test_variant_parameter_counts_within_5_percent(name, target):
    config = RetNetConfig.from_variant(name)
    assert config.vocab_size == 128256
    with torch.device("meta"):
        model = RetNetForCausalLM(config)
    model.tie_weights()  # transformers 5.0 does not tie meta-device weights at construction
    count = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    print(f"RetNet {name}: {count / 1e6:.1f}M parameters ({count / target:.3f}x of the name)")
    assert abs(count / target - 1) < 0.05


def test_variant_overrides_and_unknown_variant():
    assert RetNetConfig.from_variant("500M", chunk_size=256).chunk_size == 256
    with pytest.raises(ValueError, match="350M"):
        RetNetConfig.from_variant("1B")


def test_auto_classes_registered():
    config = AutoConfig.for_model("hf_retnet", vocab_size=50, hidden_size=16, num_hidden_layers=1, num_heads=2,
                                  intermediate_size=32)
    assert isinstance(config, RetNetConfig)
    assert isinstance(AutoModel.from_config(config), RetNetModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), RetNetForCausalLM)
    assert RetNetConfig.model_type != "retnet"  # flash-linear-attention owns "retnet"


def test_hidden_size_not_divisible_by_heads():
    with pytest.raises(ValueError, match="not divisible by num_heads.*num_heads=4"):
        RetNetConfig(hidden_size=36, num_heads=5)


def test_bad_retention_mode_in_config_and_call():
    with pytest.raises(ValueError, match="retention_mode='fast'.*parallel"):
        RetNetConfig(retention_mode="fast")
    model = RetNetForCausalLM(RetNetConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_heads=2,
                                           intermediate_size=32))
    with pytest.raises(ValueError, match="retention_mode='quadratic' is not one of"):
        model(torch.zeros(1, 3, dtype=torch.long), retention_mode="quadratic")


@pytest.mark.parametrize("bad_id", [20, 1000, -1])
def test_input_ids_outside_vocabulary(bad_id):
    model = RetNetForCausalLM(RetNetConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_heads=2,
                                           intermediate_size=32))
    ids = torch.tensor([[1, 2, bad_id]])
    with pytest.raises(ValueError, match=f"input id {bad_id} is outside the vocabulary \\[0, 20\\).*tokenizer"):
        model(ids)

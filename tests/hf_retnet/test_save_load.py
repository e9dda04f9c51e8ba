"""safetensors round trip, trust_remote_code in a fresh process without hf_retnet, gradient checkpointing, LoRA."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from hf_retnet import LORA_TARGET_MODULES, RetNetConfig, RetNetForCausalLM


def tiny(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4, intermediate_size=64, chunk_size=4)
    return RetNetForCausalLM(RetNetConfig(**{**base, **kw})).eval()


def test_save_pretrained_writes_safetensors_and_code(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "modeling_retnet.py", "configuration_retnet.py"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_retnet.RetNetForCausalLM"
    assert auto_map["AutoModel"] == "modeling_retnet.RetNetModel"
    assert auto_map["AutoConfig"] == "configuration_retnet.RetNetConfig"
    reloaded = RetNetForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 9))
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_trust_remote_code_in_fresh_process_without_the_package(tmp_path):
    """The saved folder must load where `hf_retnet` cannot be imported at all (as from the Hub)."""
    torch.manual_seed(0)
    model = tiny(tie_word_embeddings=False)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    ids = torch.randint(0, 97, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(model(ids).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        class Block:  # make `import hf_retnet` impossible in this process
            def find_spec(self, name, path=None, target=None):
                if name == "hf_retnet" or name.startswith("hf_retnet."):
                    raise ImportError("hf_retnet is blocked in this process")
        sys.meta_path.insert(0, Block())
        sys.path = [p for p in sys.path if p not in ("", {os.getcwd()!r})]
        from transformers import AutoModel, AutoModelForCausalLM
        base = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(base).__name__ == "RetNetModel", type(base)
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        logits = model(torch.load({str(tmp_path / "ids.pt")!r})).logits
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert torch.equal(logits, expected), (logits - expected).abs().max()
        print("REMOTE-CODE-OK", type(model).__name__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-CODE-OK RetNetForCausalLM" in result.stdout


def enable_checkpointing(model):
    """transformers >= 5.25 names it activation checkpointing (gradient_checkpointing_enable warns FutureWarning);
    5.2 has only the older name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = tiny().train()
    ids = torch.randint(0, 97, (2, 10))
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated entry point on any supported release
        warnings.simplefilter("error", DeprecationWarning)
        enable_checkpointing(model)
        assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5, msg=n)


def test_peft_lora_attaches_to_documented_targets(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = tiny()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGET_MODULES))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    for target in LORA_TARGET_MODULES:
        assert any(f"{target}.lora_A" in n for n in trainable), target
    ids = torch.randint(0, 97, (2, 8))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)
    peft_model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tiny(), tmp_path)
    assert again.peft_config["default"].r == 4


def assert_decays_match(model, reference):
    for layer, ref in zip(model.model.layers, reference.model.layers):
        assert layer.retention.log_decay.dtype == torch.float32
        assert layer.retention.log_decay.device == ref.retention.log_decay.device
        assert torch.equal(layer.retention.log_decay, ref.retention.log_decay)
    assert torch.equal(model.model.rotary_emb.inv_freq.float(), reference.model.rotary_emb.inv_freq)


CONFIGS = {
    "default": dict(),
    "explicit_decays": dict(num_kv_heads=2, retention_decays=[[0.3, 0.95], [0.8, 0.999]]),
    "fp32_decays": dict(hidden_size=96, num_heads=24, fp32_decays=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_meta_device_init_then_to_empty_and_init_weights(name):
    """FSDP2-style init: build on the meta device, materialise with to_empty, re-initialise; the decays come back
    fp32 and equal to a normally built model's, and loading weights then gives its logits."""
    config = RetNetConfig(**{**dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4,
                                    intermediate_size=64, chunk_size=4), **CONFIGS[name]})
    torch.manual_seed(0)
    reference = RetNetForCausalLM(config).eval()
    with torch.device("meta"):
        model = RetNetForCausalLM(config)
    assert model.model.layers[0].retention.log_decay.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    assert_decays_match(model, reference)
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 97, (2, 9))
    assert torch.equal(model.eval()(ids).logits, reference(ids).logits)
    model.to(torch.bfloat16)  # a cast after materialising keeps them fp32 too
    assert_decays_match(model, reference)


def test_bf16_load_and_save_keep_fp32_decays(tmp_path):
    model = tiny(num_kv_heads=2, retention_decays=[[0.3, 0.984375 + 1e-4], [0.8, 0.999]])
    model.save_pretrained(tmp_path)
    low = RetNetForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert low.model.embed_tokens.weight.dtype == torch.bfloat16
    assert_decays_match(low, model)
    low.save_pretrained(tmp_path / "again")
    again = RetNetForCausalLM.from_pretrained(tmp_path / "again")
    assert_decays_match(again, model)

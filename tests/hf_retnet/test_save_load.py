"""safetensors round trip, trust_remote_code in a fresh process without hf_retnet, gradient checkpointing, LoRA."""

import json
import os
import subprocess
import sys
import textwrap

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


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = tiny().train()
    ids = torch.randint(0, 97, (2, 10))
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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

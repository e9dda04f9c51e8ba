"""The model card says what the model is: the recurrent state the cache really holds, the real repository (or no
link), the decays the config has, the teacher's real name and an install path that exists. No training here: tiny
models are built and saved in-test."""

import json
import os

import pytest
import torch
import yaml

from hf_retnet import RetNetCache, RetNetConfig, RetNetForCausalLM
from training.hub import model_card
from training.hub.model_card import build_card, find_placeholders, normalize_git_url, state_bytes

BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=4, intermediate_size=48, chunk_size=4)
SHAPES = {
    "plain": {},
    "grouped_kv": dict(num_kv_heads=2),
    "head_dim_and_value_width": dict(head_dim=6, value_head_dim=10, num_kv_heads=2),
    "value_factor_1": dict(value_factor=1),
    "score_normalization": dict(retention_score_normalization=True),
    "hybrid_window": dict(attention_window=3, num_kv_heads=2),
    "learned_decays": dict(num_kv_heads=2, retention_decays=[0.9, 0.99]),
}
try:  # attention sinks are counted once the model has them (S + W cached keys and values per k/v head)
    RetNetConfig(**BASE, attention_window=3, attention_sinks=2)
    import inspect

    if "attention_sinks" in inspect.signature(RetNetConfig.__init__).parameters:
        SHAPES["hybrid_window_and_sinks"] = dict(attention_window=3, attention_sinks=2, num_kv_heads=2)
except (TypeError, ValueError):
    pass


def cache_tensor_bytes(cache) -> int:
    """Every tensor the cache object holds, summed (lists of per-layer tensors included)."""
    total = 0
    for value in vars(cache).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, torch.Tensor):
                total += item.numel() * item.element_size()
    return total


def save_run(folder, config: RetNetConfig, recipe: dict | None = None):
    torch.manual_seed(0)
    RetNetForCausalLM(config).save_pretrained(folder)
    if recipe is not None:
        (folder / "training_config.json").write_text(json.dumps(recipe))
    return str(folder)


@pytest.fixture(autouse=True)
def no_git_remote(monkeypatch):
    """Cards built here see no repository unless a test gives one (the machine's checkout may have any remote)."""
    monkeypatch.setattr(model_card, "_git_remote", lambda root: None)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_card_state_size_is_what_the_cache_holds(tmp_path, shape):
    """Build a tiny model, decode past the hybrid window with a cache, sum the cache's tensor bytes: the card's
    number is that sum (num_kv_heads, head_dim, value_head_dim and the window all count)."""
    config = RetNetConfig(**BASE, **SHAPES[shape])
    model = RetNetForCausalLM(config).eval()
    cache = RetNetCache()
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:, :7], past_key_values=cache, use_cache=True)
        for t in (7, 8):  # and a recurrent step or two: the state does not grow
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    held = cache_tensor_bytes(cache)
    on_disk = json.loads(config.to_json_string())
    assert state_bytes(on_disk) == held, shape
    card = build_card(save_run(tmp_path / "run", config))
    assert f"fixed-size recurrent state ({model_card._bytes(held)} per sequence)" in " ".join(card.split())


def test_converted_llama_3_2_1b_state_is_2_mib():
    """Llama-3.2-1B's shape (16 layers, 32 query heads, 8 k/v heads of width 64) converted by from_llama: 8 k/v
    states of 64 x 64 fp32 per layer = 2 MiB, not the 8 MiB that hidden // heads and num_heads give."""
    from transformers import LlamaConfig

    from hf_retnet.convert_llama import retnet_config_from_llama

    llama = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
    config = json.loads(retnet_config_from_llama(llama).to_json_string())
    assert state_bytes(config) == 16 * 8 * 64 * 64 * 4 + 8
    assert model_card._bytes(state_bytes(config)) == "2.0 MiB"


@pytest.mark.parametrize("remote, url", [
    ("git@github.com:someone/hf-retnet.git", "https://github.com/someone/hf-retnet"),
    ("https://github.com/someone/hf-retnet.git", "https://github.com/someone/hf-retnet"),
    ("https://someone:ghp_secret@github.com/someone/hf-retnet", "https://github.com/someone/hf-retnet"),
    ("ssh://git@gitlab.example.org:2222/group/sub/hf-retnet.git", "https://gitlab.example.org/group/sub/hf-retnet"),
    ("http://github.com/someone/hf-retnet/", "https://github.com/someone/hf-retnet"),
    ("/srv/git/hf-retnet.git", None),
    ("file:///srv/git/hf-retnet.git", None),
    ("", None),
])
def test_git_remotes_become_public_https_urls(remote, url):
    assert normalize_git_url(remote) == url


def test_card_links_the_real_repository_or_none(tmp_path, monkeypatch):
    run = save_run(tmp_path / "run", RetNetConfig(**BASE))
    card = build_card(run)
    assert "github.com/hf-retnet/hf-retnet" not in card and "](http" not in card  # no origin: no link at all
    assert "with\nhf-retnet." in card or "with hf-retnet." in card
    monkeypatch.setattr(model_card, "_git_remote", lambda root: "git@github.com:someone/hf-retnet.git")
    card = build_card(run)
    assert "[hf-retnet](https://github.com/someone/hf-retnet)" in card
    assert 'pip install "git+https://github.com/someone/hf-retnet"' in card
    assert find_placeholders(card) == []


def test_project_url_reads_this_checkouts_origin(monkeypatch):
    seen = []
    monkeypatch.setattr(model_card, "_git_remote", lambda root: seen.append(root) or "git@host.org:a/b.git")
    assert model_card.project_url() == "https://host.org/a/b"
    assert os.path.isdir(os.path.join(seen[0], "training", "hub"))  # the repository this code runs from


def test_card_does_not_tell_users_to_pip_install_an_unpublished_package(tmp_path):
    card = build_card(save_run(tmp_path / "run", RetNetConfig(**BASE)))
    assert "pip install hf-retnet" not in card
    assert "not published on PyPI" in card and "trust_remote_code=True" in card
    assert "pip install -e ." in card  # without a known URL: from a clone


def test_card_says_fixed_decays_only_when_they_are(tmp_path):
    fixed = " ".join(build_card(save_run(tmp_path / "fixed", RetNetConfig(**BASE))).split())
    assert "fixed per-head decay gamma_h = 1 - 2^(-5-h)" in fixed and "fixed per-head rates" in fixed
    learned = RetNetConfig(**BASE, num_kv_heads=2, retention_decays=[[0.9, 0.99], [0.8, 0.999]])
    card = " ".join(build_card(save_run(tmp_path / "learned", learned)).split())
    assert "fixed per-head" not in card
    assert "decays per layer and head chosen for this model" in card and "`retention_decays`" in card
    assert "| k/v heads (one state each) | 2 |" in card


def _teacher_folder(path, source: dict | None = None, source_file: str | None = None, config: dict | None = None):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama",
                                                             "architectures": ["LlamaForCausalLM"]}))
    if source_file:
        (path / source_file).write_text(json.dumps(source))
    return str(path)


@pytest.mark.parametrize("kind, expected", [
    ("gguf", "`SmolLM2-135M-Instruct.Q4_1.gguf` (a GGUF file, converted with `training.convert_gguf`)"),
    ("llama2c", "`stories260K.bin` (a llama2.c checkpoint, converted with `training.convert_llama2c`)"),
    ("hub_name", "`HuggingFaceTB/SmolLM2-135M-Instruct`"),
    ("plain", "a local LlamaForCausalLM checkpoint (`teacher`)"),
])
def test_card_names_the_teacher_for_what_it_is(tmp_path, kind, expected):
    """Not "distilled from `teacher`" (the trainer's folder name) but the checkpoint the folder was converted from."""
    teacher = tmp_path / "teacher"
    if kind == "gguf":
        _teacher_folder(teacher, {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": "0" * 64},
                        "gguf_source.json")
    elif kind == "llama2c":
        _teacher_folder(teacher, {"checkpoint": "stories260K.bin", "tokenizer": "tok512.bin"}, "llama2c_source.json")
    elif kind == "hub_name":
        _teacher_folder(teacher, config={"model_type": "llama", "_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    else:
        _teacher_folder(teacher)
    recipe = {"teacher_model": str(teacher), "teacher_source": "direct", "kd_loss": "forward_kl"}
    raw = build_card(save_run(tmp_path / "run", RetNetConfig(**BASE), recipe))
    card = " ".join(raw.split())
    assert f"distilled from {expected} with" in card
    assert f"| teacher | {expected} (teacher_source: direct) |" in card
    assert str(tmp_path) not in card
    meta = yaml.safe_load(raw.split("---\n")[1])
    assert (meta.get("base_model") == "HuggingFaceTB/SmolLM2-135M-Instruct") == (kind == "hub_name")


def test_training_records_the_teacher_identity_for_the_card(tmp_path):
    """training.train writes teacher_identity into training_config.json while the teacher folder is there, so a
    card built later (elsewhere, the folder gone) still names the GGUF file."""
    import shutil

    from training.hub.push import save_training_config
    from training.trainers.distillation_config import DistillationConfig

    teacher = _teacher_folder(tmp_path / "teacher", {"gguf_file": "model.Q8_0.gguf"}, "gguf_source.json")
    config = DistillationConfig(output_dir=str(tmp_path / "run"), teacher_model=teacher, report_to="none",
                                teacher_adapter=None)
    run = save_run(tmp_path / "run", RetNetConfig(**BASE))
    save_training_config(config, run)
    recorded = json.loads((tmp_path / "run" / "training_config.json").read_text())["teacher_identity"]
    assert recorded["name"] == "model.Q8_0.gguf" and recorded["source"] == "GGUF file"
    shutil.rmtree(teacher)
    card = " ".join(build_card(run).split())
    assert "distilled from `model.Q8_0.gguf` (a GGUF file, converted with `training.convert_gguf`)" in card

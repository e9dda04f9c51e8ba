"""Publishing: the Hub folder of a tiny distilled student (built without network), loaded in a fresh process that
cannot import hf_retnet; the generated model card; a push without a token fails before anything is written."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from training.hub.model_card import build_card, find_placeholders
from tests.training.distilled_student import REPO, TINY_CONFIG, distilled_run
from training.evaluation.evaluator import evaluate
from training.hub.push import build_hub_folder

EXPECTED = {"README.md", "config.json", "model.safetensors", "modeling_retnet.py", "configuration_retnet.py",
            "tokenizer.json", "tokenizer_config.json", "generation_config.json", "loss_curves.png",
            "trainer_state.json", "training_config.json", "eval/report.json", "eval/report.md", "eval/latency.png",
            "eval/passkey.png"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    paths = distilled_run(tmp_path_factory)
    if not os.path.isfile(os.path.join(paths["run"], "eval", "report.json")):
        evaluate(paths["run"], teacher=paths["teacher"], data=paths["heldout"], progress=False,
                 passkey_lengths=(256,), passkey_depths=(0.5,), passkey_trials=1, max_new_tokens=4,
                 latency_lengths=(16, 64), decode_tokens=2, prompts=("the cat reads",))
    return paths


@pytest.fixture(scope="module")
def hub_folder(run, tmp_path_factory):
    dest = tmp_path_factory.mktemp("hub") / "folder"
    written = build_hub_folder(run["run"], dest, repo_id="someone/tiny-retnet", base_model="meta-llama/Llama-3.2-1B-Instruct",
                               license="llama3.2")
    return dest, written


def test_hub_folder_holds_the_publishable_part(hub_folder):
    dest, written = hub_folder
    on_disk = {os.path.relpath(os.path.join(root, f), dest) for root, _, files in os.walk(dest) for f in files}
    assert set(written) == on_disk
    assert EXPECTED <= on_disk
    assert "chat_template.jinja" in on_disk  # the tokenizer's chat template travels with it
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in on_disk)  # safetensors only; no training_args.bin
    config = json.loads((dest / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_retnet.RetNetForCausalLM"
    recipe = json.loads((dest / "training_config.json").read_text())
    assert recipe["kd_loss"] == "forward_kl" and "hub_token" not in recipe and "teacher_api_key" not in recipe


def test_hub_folder_generates_the_same_tokens_without_hf_retnet(run, hub_folder, tmp_path):
    """A fresh interpreter where `import hf_retnet` is impossible and the repository is off sys.path loads the
    folder through trust_remote_code and generates exactly what the trained student generates here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest, _ = hub_folder
    tok = AutoTokenizer.from_pretrained(run["run"])
    student = AutoModelForCausalLM.from_pretrained(run["run"]).eval()
    prompt = "the cat reads the number"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    expected = student.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                min_new_tokens=12, pad_token_id=tok.pad_token_id)[0].tolist()
    script = textwrap.dedent(f"""
        import json, sys, torch
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "hf_retnet" or name.startswith(("hf_retnet.", "training", "model_cards")):
                    raise ImportError(name + " is blocked in this process")
        sys.meta_path.insert(0, Block())
        sys.path = [p for p in sys.path if p not in ("", {REPO!r})]
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(dest)!r}, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained({str(dest)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = tok({prompt!r}, return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             min_new_tokens=12, pad_token_id=tok.pad_token_id)
        print("TOKENS", json.dumps(out[0].tolist()))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next((x for x in proc.stdout.splitlines() if x.startswith("TOKENS ")), proc.stdout[-2000:])
    assert json.loads(line[len("TOKENS "):]) == expected


def test_card_is_filled_from_the_run(run, hub_folder):
    dest, _ = hub_folder
    card = (dest / "README.md").read_text()
    assert find_placeholders(card) == []
    assert "{{" not in card and "TODO" not in card and "${" not in card
    header, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    import yaml

    meta = yaml.safe_load(header)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B-Instruct" and meta["license"] == "llama3.2"
    assert {"retnet", "distillation"} <= set(meta["tags"])
    report = json.load(open(os.path.join(run["run"], "eval", "report.json")))
    state = json.load(open(os.path.join(run["run"], "trainer_state.json")))
    config = json.load(open(os.path.join(run["run"], "config.json")))
    for fact in (f"| layers | {config['num_hidden_layers']} |", f"| optimizer steps | {state['global_step']} |",
                 f"{report['heldout']['student']['loss']:.4g}", f"{report['heldout']['teacher']['loss']:.4g}",
                 "top-1 agreement", "](eval/latency.png)", "](loss_curves.png)", "kd_loss: forward_kl",
                 'from_pretrained("someone/tiny-retnet", trust_remote_code=True)', "import hf_retnet",
                 "## Limitations", "tokens seen"):
        assert fact in body, fact
    recipe = json.load(open(os.path.join(run["run"], "training_config.json")))
    optimizer = (f"Muon on the hidden matrices (learning rate {recipe['muon_learning_rate']}), AdamW on the rest "
                 f"(learning rate {recipe['learning_rate']})" if recipe["optim"] == "muon"
                 else f"{recipe['optim']}, learning rate {recipe['learning_rate']}")
    assert f"| optimizer | {optimizer} |" in body
    assert os.path.basename(run["teacher"]) in body  # the teacher named in the training table...
    assert os.path.dirname(run["teacher"]) not in card  # ...without publishing the trainer's file system


def test_card_without_an_evaluation_says_so(run, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(run["run"], bare, ignore=shutil.ignore_patterns("eval", "training_config.json"))
    card = build_card(str(bare))
    assert find_placeholders(card) == []
    assert "no evaluation report" in card and "did not save its training configuration" in card
    assert "base_model" not in card.split("---\n")[1]  # a local teacher folder is not a Hub id


def test_placeholder_detector():
    assert find_placeholders("a {{ name }} b ${x} TODO <model id> ok") == ["{{", "}}", "${", "TODO", "<model id>"]
    assert find_placeholders("x < y and z > w; KL(teacher ‖ student)") == []


def _no_token_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(PYTHONPATH=REPO, HF_HOME=str(tmp_path / "empty_hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def test_push_without_a_token_is_a_clear_error_and_writes_nothing(run, tmp_path):
    before = sorted(os.listdir(run["run"]))
    proc = subprocess.run([sys.executable, "-m", "training.push", run["run"], "someone/tiny-retnet"], cwd=tmp_path,
                          env=_no_token_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "needs a token" in proc.stderr and "hf auth login" in proc.stderr
    assert sorted(os.listdir(run["run"])) == before  # no README.md written into the run


def test_train_push_to_hub_without_a_token_fails_before_training(run, tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", "--config", TINY_CONFIG, "--teacher_model", run["teacher"],
         "--train_data", run["train"], "--output_dir", str(out), "--push_to_hub", "true",
         "--hub_model_id", "someone/tiny-retnet"],
        cwd=tmp_path, env=_no_token_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "needs a token" in proc.stderr
    assert not out.exists()


def test_hub_folder_refuses_incomplete_runs(run, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(run["run"], partial, ignore=shutil.ignore_patterns("*.safetensors"))
    dest = tmp_path / "dest"
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        build_hub_folder(partial, dest)
    assert not dest.exists()
    (dest / "x").parent.mkdir()
    (dest / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        build_hub_folder(run["run"], dest)
    assert os.listdir(dest) == ["x"] and [p for p in os.listdir(tmp_path) if "staging" in p] == []


def test_card_header_takes_hub_ids_from_the_recipe(run, tmp_path):
    """A run distilled from a Hub teacher on Hub data gets base_model and datasets in its metadata header."""
    import shutil

    import yaml

    copy = tmp_path / "hub-run"
    shutil.copytree(run["run"], copy)
    recipe = json.loads((copy / "training_config.json").read_text())
    recipe.update(teacher_model="meta-llama/Llama-3.2-1B-Instruct",
                  train_data=["HuggingFaceFW/fineweb-edu:train", os.path.join(str(tmp_path), "local.jsonl")])
    (copy / "training_config.json").write_text(json.dumps(recipe))
    card = build_card(str(copy), repo_id="someone/retnet")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B-Instruct"
    assert meta["datasets"] == ["HuggingFaceFW/fineweb-edu"]  # local files are not Hub datasets
    assert "distilled from `meta-llama/Llama-3.2-1B-Instruct`" in card and str(tmp_path) not in card
    assert find_placeholders(card) == []

"""training.evaluate on a tiny distilled student and its tiny Llama teacher: every section with real numbers,
identical tokens for teacher and student, windowed scoring, and clear errors that leave nothing half-written."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.training.distilled_student import LM_EVAL_TASK, REPO, distilled_run, write_jsonl
from training.data.shards import IGNORE_INDEX
from training.evaluation.evaluator import EvalConfig, evaluate
from training.evaluation.heldout import load_documents, make_windows
from training.evaluation.passkey import build_prompt

FAST = dict(passkey_lengths=(256, 384), passkey_depths=(0.0, 0.5, 1.0), passkey_trials=2, max_new_tokens=6,
            latency_lengths=(16, 64, 256), decode_tokens=3, progress=False, prompts=("the cat reads", "a dog"))


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return distilled_run(tmp_path_factory)


@pytest.fixture(scope="module")
def report(paths, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out")
    return evaluate(paths["run"], teacher=paths["teacher"], data=paths["heldout"], output_dir=str(out), **FAST)


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_report_has_every_section_with_real_numbers(report):
    assert report["sections"] == ["heldout", "passkey", "generation", "latency"]
    held = report["heldout"]
    for name in ("student", "teacher"):
        assert held[name]["tokens"] > 100 and _finite(held[name]["loss"]) and held[name]["loss"] > 0
        assert held[name]["perplexity"] == pytest.approx(math.exp(held[name]["loss"]))
    assert held["agreement"]["kl_teacher_student"] > 0 and 0 <= held["agreement"]["top1_agreement"] <= 1
    assert held["scoring"]["mode"] == "whole" and held["scoring"]["bos_prefixed"]
    for name in ("student", "teacher"):
        cells = report["passkey"][name]["cells"]
        assert {(c["context_length"], c["depth"]) for c in cells} == {(n, d) for n in (256, 384) for d in (0.0, 0.5, 1.0)}
        assert all(0 <= c["accuracy"] <= 1 and c["prompt_tokens"] <= c["context_length"] for c in cells)
        samples = report["generation"][name]
        assert [s["prompt"] for s in samples] == ["the cat reads", "a dog"] and all(s["greedy"] for s in samples)
        rows = report["latency"][name]["rows"]
        assert [r["context_length"] for r in rows] == [16, 64, 256]
        assert all(r["ms_per_token"] > 0 and r["cache_bytes"] > 0 for r in rows)
    student_cache = [r["cache_bytes"] for r in report["latency"]["student"]["rows"]]
    teacher_cache = [r["cache_bytes"] for r in report["latency"]["teacher"]["rows"]]
    assert len(set(student_cache)) == 1  # the recurrent state does not grow with the context
    assert teacher_cache[0] < teacher_cache[1] < teacher_cache[2]  # the KV cache does

    out = report["output_dir"]
    assert sorted(os.listdir(out)) == ["latency.png", "passkey.png", "report.json", "report.md"]
    for png in ("latency.png", "passkey.png"):
        with open(os.path.join(out, png), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    on_disk = json.load(open(os.path.join(out, "report.json")))
    assert on_disk["heldout"]["student"]["loss"] == report["heldout"]["student"]["loss"]
    md = open(os.path.join(out, "report.md")).read()
    for heading in ("## Held-out loss", "## Passkey retrieval", "## Generation samples",
                    "## Decoding latency and memory", "![latency](latency.png)"):
        assert heading in md
    assert f"{report['heldout']['student']['loss']:.4g}" in md


def test_teacher_and_student_losses_are_on_identical_tokens(report, paths):
    """Each model's digest is the hash of the tokens an independent whole-document encoding of the JSONL gives
    (so "identical" is about the right tokens, not two hashes of one tensor), and that encoding gives the same
    token-weighted losses."""
    import hashlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    held = report["heldout"]
    assert held["student"]["tokens"] == held["teacher"]["tokens"] == held["agreement"]["tokens"]
    tok = AutoTokenizer.from_pretrained(paths["run"])
    texts = [json.loads(line)["text"] for line in open(paths["heldout"])]
    expected = hashlib.sha256()  # what the evaluator hashes per window: input ids, then the targets it scores
    for text in texts:
        ids = tok(text)["input_ids"] + [tok.eos_token_id]
        targets = ids[1:] + [IGNORE_INDEX]
        expected.update(torch.tensor(ids, dtype=torch.long).numpy().tobytes())
        expected.update(torch.tensor(targets, dtype=torch.long).numpy().tobytes())
    for name in ("student", "teacher"):
        assert held[name]["token_digest"] == "sha256:" + expected.hexdigest(), name
    assert held["identical_tokens"] is True
    for name, folder in (("student", paths["run"]), ("teacher", paths["teacher"])):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        nll, count = 0.0, 0
        with torch.no_grad():
            for text in texts:
                ids = tok(text)["input_ids"] + [tok.eos_token_id]
                assert ids[0] == tok.bos_token_id
                ids = torch.tensor([ids])
                logits = model(ids).logits[0, :-1].double()
                nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                count += ids.shape[1] - 1
        assert held[name]["tokens"] == count
        assert held[name]["loss"] == pytest.approx(nll / count, rel=1e-5), name


def test_a_model_agrees_with_itself(paths, tmp_path):
    rep = evaluate(paths["teacher"], teacher=paths["teacher"], data=paths["heldout"], output_dir=str(tmp_path),
                   sections=["heldout"], progress=False)
    held = rep["heldout"]
    assert held["agreement"]["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
    assert held["agreement"]["top1_agreement"] == 1.0
    assert held["student"]["loss"] == held["teacher"]["loss"]
    assert os.listdir(tmp_path / "eval") == ["report.json", "report.md"] or \
        sorted(os.listdir(tmp_path / "eval")) == ["report.json", "report.md"]


@pytest.mark.parametrize("window,stride", [(8, 4), (8, 7), (16, 1), (64, 32)])
def test_windows_score_every_token_once(window, stride):
    n = 50
    ids = list(range(100, 100 + n))
    labels = [IGNORE_INDEX if i % 7 == 3 else t for i, t in enumerate(ids)]
    windows = make_windows([{"input_ids": ids, "labels": labels}], window, stride)
    scored = []
    for w in windows:
        assert len(w.input_ids) <= window
        start = ids.index(int(w.input_ids[0]))
        for p in (w.targets != IGNORE_INDEX).nonzero().flatten().tolist():
            assert int(w.targets[p]) == ids[start + p + 1]  # the target is the next token of the document
            scored.append(start + p + 1)
    assert sorted(scored) == scored and scored == [j for j in range(1, n) if labels[j] != IGNORE_INDEX]
    assert (len(windows) == 1) == (n <= window)


def test_long_documents_are_scored_in_windows_and_said_so(paths, tmp_path):
    long_text = " ".join(json.loads(line)["text"] for line in open(paths["heldout"]))
    data = write_jsonl(tmp_path / "long.jsonl", [long_text, "the cat reads the number 3."])
    rep = evaluate(paths["run"], data=data, output_dir=str(tmp_path), sections=["heldout"], window=32, stride=16,
                   progress=False)
    scoring = rep["heldout"]["scoring"]
    assert scoring["mode"] == "windows" and scoring["documents_in_windows"] == 1 and scoring["documents"] == 2
    assert "sliding windows of 32" in open(tmp_path / "eval" / "report.md").read()
    docs = load_documents(data, __import__("transformers").AutoTokenizer.from_pretrained(paths["run"]))
    assert rep["heldout"]["student"]["tokens"] == sum(len(d["input_ids"]) - 1 for d in docs)


def test_append_eos_false_scores_one_token_less_per_document(paths, report, tmp_path):
    """For teachers that never saw EOS (llama2.c): the same documents, each without its final EOS target."""
    rep = evaluate(paths["run"], data=paths["heldout"], output_dir=str(tmp_path), sections=["heldout"],
                   append_eos=False, progress=False)
    docs = rep["heldout"]["scoring"]["documents"]
    assert docs == report["heldout"]["scoring"]["documents"]
    assert rep["heldout"]["student"]["tokens"] == report["heldout"]["student"]["tokens"] - docs


def test_shard_folder_gives_the_same_numbers_as_its_jsonl(paths, report, tmp_path):
    """Data read through the project's shard reader (training.preprocess output) scores the same tokens."""
    from transformers import AutoTokenizer

    from training.data.preprocess import preprocess

    preprocess([paths["heldout"]], tmp_path / "shards", AutoTokenizer.from_pretrained(paths["run"]), progress=False)
    rep = evaluate(paths["run"], teacher=paths["teacher"], data=str(tmp_path / "shards"), output_dir=str(tmp_path),
                   sections=["heldout"], progress=False)
    for name in ("student", "teacher"):
        assert rep["heldout"][name]["token_digest"] == report["heldout"][name]["token_digest"]
        assert rep["heldout"][name]["loss"] == pytest.approx(report["heldout"][name]["loss"], rel=1e-6)


def test_batched_scoring_matches_one_window_at_a_time(paths, report, tmp_path):
    """Right-padded batches of windows give the same token-weighted numbers as batch size 1 (fp32, 1e-5)."""
    rep = evaluate(paths["run"], teacher=paths["teacher"], data=paths["heldout"], output_dir=str(tmp_path),
                   sections=["heldout"], batch_size=5, progress=False)
    for name in ("student", "teacher"):
        assert rep["heldout"][name]["token_digest"] == report["heldout"][name]["token_digest"]
        assert rep["heldout"][name]["loss"] == pytest.approx(report["heldout"][name]["loss"], rel=1e-5)
    for key in ("kl_teacher_student", "top1_agreement"):
        assert rep["heldout"]["agreement"][key] == pytest.approx(report["heldout"]["agreement"][key], rel=1e-4)


def test_sampled_generation_is_seeded(paths):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.evaluation.generation import generation_samples

    model = AutoModelForCausalLM.from_pretrained(paths["run"]).eval()
    tok = AutoTokenizer.from_pretrained(paths["run"])
    first = generation_samples(model, tok, ("the cat",), max_new_tokens=10, seed=3, temperature=1.5)
    again = generation_samples(model, tok, ("the cat",), max_new_tokens=10, seed=3, temperature=1.5)
    other = [generation_samples(model, tok, ("the cat",), max_new_tokens=10, seed=s, temperature=1.5)[0]["sampled"]
             for s in (4, 5, 6)]
    assert first == again
    assert any(o != first[0]["sampled"] for o in other)  # the seed, not a fixed sequence, decides the sample


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_prompt_hides_the_key_at_the_depth(paths, depth):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["run"])
    ids = build_prompt(tok, 512, depth, 48213)
    text = tok.decode(ids, skip_special_tokens=True)
    assert len(ids) <= 512 and ids[0] == tok.bos_token_id and text.count("48213") == 2
    before = text[: text.index("The pass key is 48213")].count("The grass is green")
    assert before == round(depth * text.count("The grass is green"))  # filler sentences ahead of the key
    assert build_prompt(tok, 60, depth, 48213) is None  # does not fit: reported as skipped, never truncated


def test_lm_eval_task_runs_offline_through_the_cli(paths, tmp_path):
    """The shipped YAML task (dataset_path: json, local data_files) through `python -m training.evaluate`, run
    from an unrelated working directory; its numbers land in report.json and report.md."""
    pytest.importorskip("lm_eval")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "ds-cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "training.evaluate", "--model", paths["run"], "--data", paths["heldout"],
           "--output", str(out), "--sections", "heldout", "lm_eval", "--lm_eval_tasks", LM_EVAL_TASK,
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "student loss" in proc.stdout
    rep = json.load(open(out / "eval" / "report.json"))
    task = rep["lm_eval"]["tasks"]["hf_retnet_tiny_cloze"]
    assert 0 <= task["acc,none"] <= 1 and 0 <= task["acc_norm,none"] <= 1
    assert rep["lm_eval"]["n_samples"]["hf_retnet_tiny_cloze"]["effective"] == 8
    assert rep["sections"] == ["heldout", "lm_eval"]
    md = open(out / "eval" / "report.md").read()
    assert "## lm-evaluation-harness" in md and "hf_retnet_tiny_cloze" in md


# ----------------------------------------------------------------------------- bad input


def _no_output(out):
    return not os.path.exists(out) or os.listdir(out) == []


def test_folder_that_is_not_a_causal_lm(paths, tmp_path):
    from transformers import T5Config, ViTConfig

    vit, t5 = tmp_path / "vit", tmp_path / "t5"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(vit)
    T5Config(vocab_size=100, d_model=32, num_layers=1, num_heads=2, d_ff=64).save_pretrained(t5)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="not a causal language model.*ViTConfig"):
        evaluate(str(vit), data=paths["heldout"], output_dir=str(out), **FAST)
    with pytest.raises(ValueError, match="not a causal language model.*T5Config"):
        evaluate(str(t5), data=paths["heldout"], output_dir=str(out), **FAST)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        evaluate(str(empty), data=paths["heldout"], output_dir=str(out), **FAST)
    with pytest.raises(ValueError, match="teacher .*not a causal language model"):
        evaluate(paths["run"], teacher=str(vit), data=paths["heldout"], output_dir=str(out), **FAST)
    assert _no_output(out)


def test_teacher_with_another_tokenizer(paths, tmp_path):
    from tests.tiny_models import save_tiny_teacher

    other = save_tiny_teacher(tmp_path / "other", texts=[f"completely different words {i} zebra" for i in range(50)])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="teacher's tokenizer .* differs from the student's"):
        evaluate(paths["run"], teacher=other, data=paths["heldout"], output_dir=str(out), **FAST)
    assert _no_output(out)


@pytest.mark.parametrize("content", ['{"text": ""}\n{"text": "   "}\n', "\n\n"])
def test_data_with_no_text(paths, tmp_path, content):
    data = tmp_path / "empty.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no text to evaluate on"):
        evaluate(paths["run"], data=str(data), output_dir=str(out), **FAST)
    assert _no_output(out)


def test_a_failure_mid_run_keeps_the_previous_report(paths, tmp_path):
    evaluate(paths["run"], data=paths["heldout"], output_dir=str(tmp_path), sections=["heldout"], progress=False)
    before = open(tmp_path / "eval" / "report.json").read()
    with pytest.raises(FileNotFoundError, match="no_such_task.yaml"):  # lm-eval fails after the held-out section
        evaluate(paths["run"], data=paths["heldout"], output_dir=str(tmp_path), sections=["heldout", "lm_eval"],
                 lm_eval_tasks=("no_such_task.yaml",), progress=False)
    assert open(tmp_path / "eval" / "report.json").read() == before
    assert sorted(os.listdir(tmp_path)) == ["eval"]  # no staging folder left behind


def test_config_and_section_errors_name_the_fix():
    with pytest.raises(ValueError, match="stride"):
        EvalConfig(window=16, stride=16)
    with pytest.raises(ValueError, match="heldout.*needs data"):
        evaluate("unused", sections=["heldout"], output_dir="unused")
    with pytest.raises(ValueError, match="unknown section"):
        evaluate("unused", sections=["bleu"], output_dir="unused")
    with pytest.raises(TypeError, match="unknown option"):
        evaluate("unused", output_dir="unused", windw=3)


def test_evaluation_stays_out_of_the_training_import_path(tmp_path):
    code = ("import sys, training.train, training.trainers.distillation, training.trainers.distillation_trainer\n"
            "import training.push, training.hub.push\n"
            "bad = [m for m in sys.modules\n"
            "       if m.startswith(('training.evaluat', 'lm_eval', 'model_cards', 'training.hub.model_card'))]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

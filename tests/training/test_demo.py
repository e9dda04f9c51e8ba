"""The demo end to end on a tiny budget (every stage, the real stories260K teacher), its report, and resume."""

import json
import re
from pathlib import Path

import pytest

from training.demo.pipeline import main, plan, read_stories, run_demo
from training.demo.config import load_demo_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "configs" / "demo_tiny.yaml"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    cfg = load_demo_config(str(TINY), ["--output_dir", str(out)])
    return cfg, run_demo(cfg)


@pytest.mark.slow
def test_tiny_demo_report(demo_run):
    cfg, ctx = demo_run
    out = Path(cfg.output_dir)
    report = (out / "report.md").read_text(encoding="utf-8")
    for section in ("## Teacher against students", "## Loss against tokens", "## Stories from the same prompts",
                    "## The student", "## Stage times"):
        assert section in report, section
    # One table row per model with real numbers; the teacher's own KL is 0 and it agrees with itself.
    table = report.split("## Teacher against students")[1].split("\n\n")[1]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| (\w+) \|.*\|$", table, re.M)}
    assert re.search(r"\| teacher \| - \| \d+\.\d{3} \| [\d.]+ \| 1\.00x \| [\d.]+x \| 0\.000 \| 100\.0% \|",
                     rows["teacher"])
    assert re.search(r"\| ce_only \| [\dK.M]+ \| \d+\.\d{3} \| [\d.]+ \| [\d.]+x \| 1\.00x \|", rows["ce_only"])
    scores = ctx["evaluate"]["models"]
    for name in ("random_kd", "ce_only"):
        assert name in rows and scores[name]["tokens_scored"] == scores["teacher"]["tokens_scored"] > 0
        assert scores[name]["kl"] > 0 and scores[name]["loss"] > scores["teacher"]["loss"]
    assert (out / "loss_vs_tokens.png").stat().st_size > 1000
    assert "*teacher*: Once upon a time" in report
    # Students got the same distillation tokens (same data order and steps), and a held-out curve every step.
    trained = ctx["students"]
    assert len({r["distill_tokens"] for r in trained.values()}) == 1
    for r in trained.values():
        curve = r["heldout_curve"]
        assert [p["step"] for p in curve] == list(range(cfg.train["max_steps"] + 1))
        assert curve[-1]["tokens"] == r["tokens"] and curve[0]["tokens"] == r["align_tokens"]
    random_curve = trained["ce_only"]["heldout_curve"]
    assert random_curve[-1]["loss"] < random_curve[0]["loss"]  # a random init learns from its first steps
    # One sequence per story, BOS first and no EOS (the llama2.c teacher never saw one).
    from training.data.shards import PretokenizedShardDataset

    shards = PretokenizedShardDataset(ctx["shards"]["shards"], shuffle=False)
    assert len(shards) == ctx["teacher"]["num_train"]
    assert all(shards[i]["input_ids"][0] == 1 and 2 not in shards[i]["input_ids"] for i in range(len(shards)))
    # The teacher is a real converted Llama that tells its story.
    assert ctx["teacher"]["vocab_size"] == 512 and (out / "teacher" / "model.safetensors").is_file()


@pytest.mark.slow
def test_student_folder_loads_with_auto_classes(demo_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, ctx = demo_run
    path = ctx["report"]["best"] and ctx["students"][ctx["report"]["best"]]["path"]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert ids[0, 0].item() == 1
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.slow
def test_rerun_resumes_every_finished_stage(demo_run, capsys):
    cfg, ctx = demo_run
    markers = sorted(p.name for p in (Path(cfg.output_dir) / ".stages").glob("*.json"))
    before = {m: (Path(cfg.output_dir) / ".stages" / m).read_text() for m in markers}
    assert main(["--config", str(TINY), "--output_dir", cfg.output_dir]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done earlier") == len(plan(cfg))
    assert {m: (Path(cfg.output_dir) / ".stages" / m).read_text() for m in markers} == before


def test_changed_settings_invalidate_later_stages():
    cfg = load_demo_config(str(TINY))
    other = load_demo_config(str(TINY), ["--teacher_topk", "8"])
    deps = {k: d for k, _, _, d in plan(cfg)}
    deps2 = {k: d for k, _, _, d in plan(other)}
    assert deps["shards"] == deps2["shards"] and deps["cache"] != deps2["cache"]
    assert deps["student:ce_only"] != deps2["student:ce_only"]


def test_config_errors_name_the_key(tmp_path, capsys):
    assert main(["--config", str(TINY), "--tacher", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'tacher'" in err and "did you mean '--teacher'" in err and len(err.splitlines()) == 1
    # mappings on the command line are YAML and merge into the file's; a non-mapping is refused naming the flag
    cfg, base = load_demo_config(str(TINY), ["--train", "{max_steps: 3}"]), load_demo_config(str(TINY))
    assert cfg.train == {**base.train, "max_steps": 3} and len(base.train) > 1
    with pytest.raises(ValueError, match="--train must be a mapping"):
        load_demo_config(str(TINY), ["--train", "[1, 2]"])
    with pytest.raises(ValueError, match="students\\[0\\]"):
        load_demo_config(str(TINY), ["--students", json.dumps([{"init": "random"}])])
    with pytest.raises(ValueError, match="heldout_stories"):
        load_demo_config(str(TINY), ["--heldout_stories", "0"])
    bad = tmp_path / "empty.txt"
    bad.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="holds no text"):
        read_stories(str(bad))


def test_embedded_card_links_point_into_the_student_folder():
    from training.demo.report import _embed_card

    card = "---\nlibrary_name: transformers\n---\n# s\n\n## Eval\n![lat](eval/latency.png) [hub](https://x.y/z)\n"
    out = _embed_card(card, "students/s")
    assert "library_name" not in out and out.startswith("### s")
    assert "![lat](students/s/eval/latency.png)" in out and "(https://x.y/z)" in out and "#### Eval" in out


@pytest.mark.parametrize("name", ["demo.yaml", "demo_real.yaml", "demo_smollm.yaml", "demo_tiny.yaml"])
def test_shipped_demo_configs_name_only_real_keys(name):
    """Every `train` key of the shipped demo configs (shared and per student) is a DistillationConfig field, every
    `align` key an AlignConfig field, every `synthesize` key a SynthesizeArguments field: a misspelt key in a
    10-minute run must not wait until its stage to fail."""
    from dataclasses import fields

    from training.teachers.synthesize import SynthesizeArguments
    from training.trainers.alignment import AlignConfig
    from training.trainers.distillation_config import DistillationConfig

    cfg = load_demo_config(str(ROOT / "examples" / "configs" / name))
    train_keys, align_keys = {f.name for f in fields(DistillationConfig)}, {f.name for f in fields(AlignConfig)}
    for recipe in cfg.students:
        assert set(cfg.train) | set(recipe.train) <= train_keys, recipe.name
        assert set(recipe.align) <= align_keys, recipe.name
    assert set(cfg.synthesize) <= {f.name for f in fields(SynthesizeArguments)} - {"model", "output"}

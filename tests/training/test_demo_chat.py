"""The chat demo (`make demo-smollm`'s path) end to end on a tiny budget: a real GGUF instruct teacher writes its
own conversations, students (hybrid, half-depth hybrid, random) learn the assistant turns, are scored on held-out
assistant tokens only, and the best one answers held-out requests next to the teacher; then a rerun resumes."""

import json
from pathlib import Path

import pytest
import yaml

from tests.training.tiny_gguf import SYSTEM_DEFAULT, write_tiny_chat_gguf
from training.converters.gguf import CACHE_ENV
from training.data.records import IGNORE_INDEX, encode_record, normalize_record
from training.demo.config import load_demo_config
from training.demo.pipeline import main, plan, run_demo

pytest.importorskip("gguf")

STUDENTS = ("hybrid", "half_hybrid", "random_kd")


def tiny_smollm_config(teacher: str, out: str) -> dict:
    """demo_smollm.yaml's shape (synthesized chat data, hybrid / half-depth / random students, answers in the
    report) at budgets of seconds, for a 4-layer teacher."""
    align = {"max_tokens": 600, "batch_size": 4, "calibration_sequences": 8, "eval_sequences": 4, "eval_steps": 2,
             "attention_window": 4, "attention_sinks": 1}
    return {
        "output_dir": out,
        "teacher": teacher,
        "teacher_tokenizer": None,
        "synthesize": {"n": 24, "batch_size": 8, "max_request_tokens": 16, "max_answer_tokens": 24,
                       "keep_unfinished_answers": True, "temperature": 1.0, "min_request_chars": 4, "seed": 7,
                       "dtype": "float32", "device": "cpu", "progress": False},
        "heldout_stories": 8,
        "max_seq_length": 96,
        "append_eos": False,
        "teacher_topk": 16,
        "cache_encoding": "compact:mass=0.999,bits=8",
        "student": "350M",
        "student_overrides": {"hidden_size": 64, "num_hidden_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                              "intermediate_size": 128, "chunk_size": 32},
        "train": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 3.0e-3, "optim": "adamw_torch",
                  "logging_steps": 1, "disable_tqdm": True, "train_sampling_strategy": "group_by_length",
                  "distill_alpha": 0.5},
        "students": [
            {"name": "hybrid", "init": "teacher", "description": "hybrid, all layers", "align": align,
             "eval": {"sections": ["heldout", "latency"]}},
            {"name": "half_hybrid", "init": "teacher", "description": "hybrid, half the layers",
             "align": {**align, "keep_layers": 2}},
            {"name": "random_kd", "init": "random", "description": "random init, KD only",
             "train": {"distill_alpha": 0.0}},
        ],
        "curve_stories": 4,
        "curve_every": 1,
        "eval": {"sections": ["heldout"], "latency_lengths": [16, 32], "decode_tokens": 2},
        "chat_requests": 2,
        "sample_tokens": 12,
        "threads": 1,
        "seed": 0,
    }


@pytest.fixture(scope="module")
def chat_demo(tmp_path_factory):
    """(config file, DemoConfig, the run's context)."""
    root = tmp_path_factory.mktemp("chat_demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root / "gguf_cache"))  # the converted teacher stays in this test's folder
        teacher, _, _ = write_tiny_chat_gguf(root / "tiny-chat.gguf", chatty=True, layers=4)
        config = root / "demo_chat.yaml"
        config.write_text(yaml.safe_dump(tiny_smollm_config(str(teacher), str(root / "run"))), encoding="utf-8")
        cfg = load_demo_config(str(config))
        yield config, cfg, run_demo(cfg)


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def encoded(records, tokenizer):
    """(input_ids, labels) of each record, as training.preprocess and the held-out scorer encode chat records."""
    return [encode_record(normalize_record(r, f"record {i}"), tokenizer, f"record {i}", append_eos=False)
            for i, r in enumerate(records)]


@pytest.mark.slow
def test_chat_demo_data_scores_and_answers(chat_demo):
    from transformers import AutoTokenizer

    from training.data.shards import PretokenizedShardDataset

    _, cfg, ctx = chat_demo
    t = ctx["teacher"]
    train, heldout = read_jsonl(t["train_data"]), read_jsonl(t["heldout_data"])
    # The teacher wrote chat records: a user request and an assistant answer each, none repeated across the split.
    assert len(train) == t["num_train"] == cfg.synthesize["n"] - cfg.heldout_stories and len(heldout) == 8
    for r in train + heldout:
        roles = [m["role"] for m in r["messages"]]
        assert roles[-2:] == ["user", "assistant"] and all(m["content"].strip() for m in r["messages"][-2:])
    request = lambda r: r["messages"][-2]["content"]  # noqa: E731
    assert not {request(r) for r in heldout} & {request(r) for r in train}

    # The shards are the training conversations, assistant tokens labelled only; no held-out conversation in them.
    tokenizer = AutoTokenizer.from_pretrained(t["teacher"])
    shards = PretokenizedShardDataset(ctx["shards"]["shards"], shuffle=False)
    rows = [(shards[i]["input_ids"].tolist(), shards[i]["labels"].tolist()) for i in range(len(shards))]
    n = cfg.max_seq_length
    assert rows == [(ids[:n], labels[:n]) for ids, labels in encoded(train, tokenizer)]
    assert all(any(lab == IGNORE_INDEX for lab in labels) and any(lab != IGNORE_INDEX for lab in labels)
               for _, labels in rows)
    held_ids = [ids for ids, _ in encoded(heldout, tokenizer)]
    assert not any(ids[:n] == row for ids in held_ids for row, _ in rows)

    # Every model scored on the same held-out tokens: exactly the assistant tokens of the held-out conversations.
    scores = ctx["evaluate"]["models"]
    assistant_tokens = sum(lab != IGNORE_INDEX for _, labels in encoded(heldout, tokenizer) for lab in labels[1:])
    assert set(scores) == {"teacher", *STUDENTS}
    assert {s["tokens_scored"] for s in scores.values()} == {assistant_tokens}
    assert assistant_tokens < sum(len(ids) for ids in held_ids)  # system prompt and requests are not scored
    # (Students may beat this teacher: its sampled bytes are decoded to text with replacement characters and
    # encoded again, so the held-out tokens are not its own samples.)
    for name in STUDENTS:
        assert scores[name]["kl"] > 0 and 0 < scores[name]["top1"] < 1 and scores[name]["loss"] > 0
    assert ctx["students"]["half_hybrid"]["parameters"] < ctx["students"]["hybrid"]["parameters"]

    report = Path(cfg.output_dir, "report.md").read_text(encoding="utf-8")
    table = report.split("## Teacher against students (held-out conversations, assistant tokens)")[1]
    table = table.split("\n\n")[1]
    for name in ("teacher", *STUDENTS):
        assert f"\n| {name} |" in "\n" + table, name
    assert f"Scored on {assistant_tokens} held-out tokens" in report
    assert "latency" in ctx["evaluate"]["plots"]["hybrid"]

    # The teacher's and the best student's answers to the first held-out requests, side by side.
    best = ctx["report"]["best"]
    assert best == min(STUDENTS, key=lambda s: scores[s]["loss"])
    answers = ctx["report"]["answers"]
    assert answers["requests"] == [request(r) for r in heldout[: cfg.chat_requests]]
    assert len(answers["teacher"]) == len(answers[best]) == cfg.chat_requests
    section = report.split(f"## Answers to held-out requests: teacher and `{best}`")[1].split("\n## ")[0]
    for i, req in enumerate(answers["requests"]):
        assert f"**Request:** {req}" in section
        assert f"- *teacher*: {answers['teacher'][i]}" in section and f"- *{best}*: {answers[best][i]}" in section
    assert "## Stories from the same prompts" not in report


REMOTE_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
assert "hf_retnet" not in sys.modules  # the modeling code saved with the weights, not this checkout's
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(**ids).logits, sys.argv[3])
"""


@pytest.mark.slow
def test_best_student_loads_and_chats(chat_demo, tmp_path):
    import os
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    import hf_retnet

    _, cfg, ctx = chat_demo
    best = ctx["report"]["best"]
    path = ctx["students"][best]["path"]
    user = read_jsonl(ctx["teacher"]["heldout_data"])[0]["messages"][-2]
    # The template's own system prompt, given explicitly: the prompt the report's answer was generated from.
    request = [{"role": "system", "content": SYSTEM_DEFAULT}, user]
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template(request, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    # Without hf_retnet (a fresh process, trust_remote_code) and with it (registered, no remote code): same logits.
    torch.save(dict(ids), tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", REMOTE_LOAD, path, str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
                   check=True, env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    local = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(local, hf_retnet.RetNetForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), local(**ids).logits)

    # What a user of the pipeline sees is the answer the report shows, for the student and for the teacher.
    answers = ctx["report"]["answers"]
    assert answers[best][0]  # (this tiny teacher's greedy answers are empty: it ends its turn at once)
    for who, folder in ((best, path), ("teacher", ctx["teacher"]["teacher"])):
        chat = pipeline("text-generation", model=folder)
        messages = chat(request, max_new_tokens=cfg.sample_tokens, do_sample=False)[0]["generated_text"]
        assert messages[:-1] == request and messages[-1]["role"] == "assistant"
        assert messages[-1]["content"].strip() == answers[who][0], who


@pytest.mark.slow
def test_chat_demo_rerun_resumes_every_finished_stage(chat_demo, capsys):
    config, cfg, _ = chat_demo
    stages = Path(cfg.output_dir) / ".stages"
    before = {p.name: p.read_text() for p in stages.glob("*.json")}
    assert len(before) == len(plan(cfg))
    capsys.readouterr()
    assert main(["--config", str(config)]) == 0
    assert capsys.readouterr().out.count("done earlier") == len(plan(cfg))
    assert {p.name: p.read_text() for p in stages.glob("*.json")} == before

"""training.synthetic: deterministic, well-formed, and structured enough to be learnable."""

import json
import re

import pytest

from training.data.preprocess import normalize_record
from training.data.synthetic import corpus_texts, main, synthetic_corpus


@pytest.mark.parametrize("kind", ["text", "chat", "mixed"])
def test_deterministic_by_seed(kind):
    a, b, c = synthetic_corpus(50, 0, kind), synthetic_corpus(50, 0, kind), synthetic_corpus(50, 1, kind)
    assert a == b != c
    assert synthetic_corpus(20, 0, kind) == a[:20]  # a longer corpus extends a shorter one


def test_records_have_the_shapes_preprocess_reads():
    chats = synthetic_corpus(200, 3, "chat")
    for i, rec in enumerate(chats):
        kind, messages = normalize_record(rec, f"rec {i}")
        roles = [m["role"] for m in messages if m["role"] != "system"]
        assert kind == "chat" and roles == ["user", "assistant"] * (len(roles) // 2) and roles
    assert {len(r["messages"]) for r in chats} >= {2, 4, 6}  # single and multi-turn
    mixed = synthetic_corpus(10, 0, "mixed")
    assert ["text" in r for r in mixed] == [True, False] * 5


def test_arithmetic_is_correct_and_facts_are_consistent():
    """The structure a small teacher can learn: right sums/differences, and each question always
    gets the same answer, whatever the seed."""
    records = [r for seed in range(4) for r in synthetic_corpus(300, seed, "chat")]
    texts = corpus_texts(synthetic_corpus(300, 9, "text"))
    checked = 0
    for text in texts + corpus_texts(records):
        for a, op, b, c in re.findall(r"(\d+) (plus|minus) (\d+) (?:is|equals) (\d+)", text):
            assert int(c) == (int(a) + int(b) if op == "plus" else int(a) - int(b))
            checked += 1
    assert checked > 500
    answers: dict[str, set] = {}
    for rec in records:
        msgs = [m for m in rec["messages"] if m["role"] != "system"]
        for q, a in zip(msgs[::2], msgs[1::2]):
            if "capital" in q["content"] or "favorite" in q["content"] or "job" in q["content"]:
                answers.setdefault(q["content"], set()).add(a["content"])
    assert len(answers) > 20 and all(len(v) == 1 for v in answers.values())


def test_cli_writes_jsonl(tmp_path, capsys):
    assert main(["--output", str(tmp_path / "s.jsonl"), "--n", "7", "--kind", "text", "--seed", "2"]) == 0
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == synthetic_corpus(7, 2, "text")
    with pytest.raises(ValueError, match="kind must be one of"):
        synthetic_corpus(3, 0, "poetry")

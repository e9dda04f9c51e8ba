"""training.data.records is the one reader of raw records: every consumer reads a file into the same records."""

from __future__ import annotations

import json
import os
import sys

import pytest

from training.data import records

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def mixed(tmp_path):
    rows = [{"text": "the cat sat"}, {"text": ""}, {"prompt": "hi", "response": "hello there"},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c"}]}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "stories.txt").write_text("one story\nstill one\n\nanother story\n")
    return tmp_path


def test_every_consumer_reads_the_same_records(mixed, tiny_tokenizer):
    from training.data.shards import build_dataset
    from training.evaluation.heldout import load_documents
    from training.trainers.teacher_sft import load_records

    spec = str(mixed / "mixed.jsonl")
    raw = records.read_records(spec)
    assert [w for w, _ in raw] == [f"{spec}:{i}" for i in range(1, 5)]
    assert load_records(spec) == raw  # teacher finetuning
    assert list(records.iter_records(spec)) == raw
    normalized = records.read_normalized(spec)  # the TRL examples
    assert [kind for _, (kind, _) in normalized] == ["text", "chat", "chat"]

    sys.path.insert(0, os.path.join(REPO, "examples", "trl"))
    try:
        import trl_example_utils
    finally:
        sys.path.pop(0)
    assert trl_example_utils.read_records(spec) == [r for _, r in normalized]

    dataset = build_dataset(spec, tiny_tokenizer, None, shuffle=False)  # the student's on-the-fly reader
    docs = load_documents(spec, tiny_tokenizer)  # held-out evaluation (BOS-prefixed, empty text left out)
    expected = [records.encode_record(r, tiny_tokenizer, w) for w, r in normalized]
    assert [dataset[i]["input_ids"].tolist() for i in (0, 2, 3)] == [ids for ids, _ in expected]
    bos = tiny_tokenizer.bos_token_id
    assert [d["input_ids"] for d in docs] == [ids if ids[0] == bos else [bos] + ids for ids, _ in expected]


def test_folders_text_paragraphs_and_home_paths(mixed, monkeypatch):
    monkeypatch.setenv("HOME", str(mixed))
    got = records.read_records("~/stories.txt")
    assert [r["text"] for _, r in got] == ["one story\nstill one", "another story"]
    assert len(records.read_records(str(mixed))) == 6  # both files, sorted by name


def test_options_of_the_sequence_reader(mixed, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert records.read_records(str(empty)) == []
    with pytest.raises(ValueError, match="empty.jsonl: no records"):
        records.read_records(str(empty), require_records=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: record has no field"):
        records.read_records(str(bad), validate=True)
    with pytest.raises(ValueError, match="mix of a datasets id and local files"):
        records.read_records([str(mixed / "stories.txt"), "owner/dataset"], lazy_hub=True)

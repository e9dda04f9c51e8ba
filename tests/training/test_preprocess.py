"""training.preprocess: round trips to batches, assistant-only masking, crash + resume, bad input."""

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from training.data.records import IGNORE_INDEX
from training.data.shards import PaddingCollator, PretokenizedShardDataset
from training.utils.io import sha256_file
from training.data.preprocess import encode_record, main, normalize_record, preprocess
from training.data.synthetic import synthetic_corpus, write_jsonl
from tests.tiny_models import CHAT_TEMPLATE, EOT, build_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
        {"role": "user", "content": "And 4 plus 4?"},
        {"role": "assistant", "content": "4 plus 4 is 8."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]
}


def _runs(labels):
    """Contiguous runs of trained positions as lists of token ids."""
    runs, cur = [], []
    for lab in labels:
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(lab)
    return runs + ([cur] if cur else [])


def _check_chat(tok, messages, ids, labels):
    """Independent check of assistant-only labels: the ids are the chat template's, every trained
    run decodes to exactly one assistant message + end-of-turn, in order, and nothing else is trained."""
    assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert all(lab in (IGNORE_INDEX, t) for lab, t in zip(labels, ids))
    assistant = [m["content"].strip() + EOT for m in messages if m["role"] == "assistant"]
    assert [tok.decode(run) for run in _runs(labels)] == assistant
    untrained = tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert all(m["content"].strip() in untrained for m in messages if m["role"] != "assistant")


def _unpad(batch):
    out = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any() and (labels[n:] == IGNORE_INDEX).all()
        out.append((ids[:n].tolist(), labels[:n].tolist()))
    return out


def _read_back(folder, batch_size=4):
    ds = PretokenizedShardDataset(folder, shuffle=False, cache_dir=os.path.join(folder, "cache"))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=PaddingCollator(pad_token_id=3))
    return [pair for batch in loader for pair in _unpad(batch)]


def test_round_trip_text_and_chat_to_batches(tmp_path, tiny_tokenizer):
    """JSONL -> shards -> dataset -> padded batches returns exactly the tokens and labels."""
    tok = tiny_tokenizer
    records = synthetic_corpus(12, seed=3, kind="mixed") + [MULTI_TURN]
    write_jsonl(records, tmp_path / "in.jsonl")
    manifest = preprocess([str(tmp_path / "in.jsonl")], tmp_path / "out", tok, shard_size=2, progress=False)
    assert manifest["totals"]["num_shards"] == 7 and manifest["totals"]["num_sequences"] == 13

    got = _read_back(str(tmp_path / "out"))
    assert len(got) == len(records)
    for rec, (ids, labels) in zip(records, got):
        if "text" in rec:
            expected = tok(rec["text"])["input_ids"] + [tok.eos_token_id]
            assert ids == expected and labels == expected
        else:
            _check_chat(tok, rec["messages"], ids, labels)
    # the multi-turn chat: three assistant turns trained, system/user turns not
    assert len(_runs(got[-1][1])) == 3
    totals = manifest["totals"]
    assert totals["num_tokens"] == sum(len(i) for i, _ in got)
    assert totals["num_label_tokens"] == sum(sum(lab != IGNORE_INDEX for lab in labels) for _, labels in got)
    for entry in manifest["shards"]:
        assert sha256_file(str(tmp_path / "out" / entry["file"])) == entry["sha256"]


def test_pack_cuts_the_concatenation_into_blocks(tmp_path, tiny_tokenizer):
    records = synthetic_corpus(20, seed=1, kind="mixed")
    write_jsonl(records, tmp_path / "in.jsonl")
    preprocess([str(tmp_path / "in.jsonl")], tmp_path / "out", tiny_tokenizer, max_seq_length=32, pack=True,
               shard_size=10, progress=False)
    got = _read_back(str(tmp_path / "out"))
    expected_ids, expected_labels = [], []
    for i, rec in enumerate(records):
        ids, labels = encode_record(normalize_record(rec, f"rec {i}"), tiny_tokenizer, f"rec {i}")
        expected_ids += ids
        expected_labels += labels
    assert [t for ids, _ in got for t in ids] == expected_ids
    # the shards keep every label; the collator leaves out each document's first token after a row's first one
    items = PretokenizedShardDataset(str(tmp_path / "out"), shuffle=False)
    assert [t for i in range(len(items)) for t in items[i]["labels"].tolist()] == expected_labels
    collated = [t for _, labels in got for t in labels]
    starts = [i for i, (a, b) in enumerate(zip(expected_labels, collated)) if a != b]
    flat_positions = [p for i in range(len(items)) for p in items[i]["position_ids"].tolist()]
    assert starts and all(collated[i] == IGNORE_INDEX and flat_positions[i] == 0 for i in starts)
    lengths = [len(ids) for ids, _ in got]
    assert all(n <= 32 for n in lengths) and lengths.count(32) >= len(lengths) - 2  # one short tail per shard


@pytest.mark.parametrize("pack", [False, True])
def test_append_eos_false_leaves_records_bos_separated(tmp_path, tiny_tokenizer, pack):
    records = [{"text": f"story number {i} is short"} for i in range(6)]
    write_jsonl(records, tmp_path / "in.jsonl")
    manifest = preprocess([str(tmp_path / "in.jsonl")], tmp_path / "out", tiny_tokenizer, max_seq_length=24,
                          pack=pack, append_eos=False, progress=False)
    assert manifest["options"]["append_eos"] is False
    flat = [t for ids, _ in _read_back(str(tmp_path / "out")) for t in ids]
    with_eos = [t for i, r in enumerate(records) for t in encode_record(normalize_record(r, "r"), tiny_tokenizer, "r")[0]]
    assert tiny_tokenizer.eos_token_id not in flat
    assert len(with_eos) - len(flat) == len(records)  # exactly one EOS per record left out, nothing else
    assert flat.count(tiny_tokenizer.bos_token_id) == len(records)
    with pytest.raises(ValueError, match="was made with append_eos=False, not True"):
        preprocess([str(tmp_path / "in.jsonl")], tmp_path / "out", tiny_tokenizer, max_seq_length=24, pack=pack,
                   progress=False)


def test_truncation_counts_and_drops_chats_left_without_labels(tmp_path, tiny_tokenizer):
    long_user = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    long_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes " * 100}]}
    write_jsonl([{"text": "a b c " * 50}, long_user, long_answer], tmp_path / "in.jsonl")
    manifest = preprocess([str(tmp_path / "in.jsonl")], tmp_path / "out", tiny_tokenizer, max_seq_length=48,
                          progress=False)
    t = manifest["totals"]
    assert (t["num_records"], t["num_truncated"], t["num_dropped_no_labels"], t["num_sequences"]) == (3, 3, 1, 2)
    assert all(len(ids) == 48 for ids, _ in _read_back(str(tmp_path / "out")))


def test_template_without_generation_markers_masks_the_same_tokens(tiny_tokenizer):
    """Fallback for chat templates without {% generation %}: same labels as the marker path."""
    plain = build_tiny_tokenizer()
    plain.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    marked = build_tiny_tokenizer()
    records = [MULTI_TURN] + synthetic_corpus(10, seed=5, kind="chat")
    for i, rec in enumerate(records):
        norm = normalize_record(rec, f"rec {i}")
        assert encode_record(norm, plain, "x") == encode_record(norm, marked, "x")
        _check_chat(plain, norm[1], *encode_record(norm, plain, "x"))


def test_folders_text_and_parquet_inputs(tmp_path, tiny_tokenizer):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text("first paragraph\nstill first\n\nsecond one\n\n\nthird\n")
    write_jsonl(synthetic_corpus(3, seed=0, kind="chat"), tmp_path / "in" / "sub" / "b.jsonl")
    pq.write_table(pa.table({"prompt": ["Say hi", "Say bye"], "response": ["hi", "bye"]}), tmp_path / "in" / "c.parquet")
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    write_jsonl([{"text": "x"}], tmp_path / "nested" / "deeper" / "d.jsonl")
    with pytest.raises(ValueError, match=r"nested: no .* files in this folder \(add --recursive"):
        preprocess([str(tmp_path / "nested")], tmp_path / "x", tiny_tokenizer, progress=False)
    out = tmp_path / "in" / "shards"  # an output folder inside the input: its shards are not inputs
    preprocess([str(tmp_path / "in")], out, tiny_tokenizer, recursive=True, progress=False)
    manifest = preprocess([str(tmp_path / "in")], out, tiny_tokenizer, recursive=True, progress=False)
    assert [os.path.basename(i["path"]) for i in manifest["inputs"]] == ["a.txt", "c.parquet", "b.jsonl"]
    assert manifest["totals"]["num_records"] == 3 + 2 + 3
    got = _read_back(str(out))
    assert tiny_tokenizer.decode(got[0][0], skip_special_tokens=True) == "first paragraph\nstill first"
    assert manifest["shards"][0]["source"] == {"path": str(tmp_path / "in" / "a.txt"), "first_line": 1, "last_line": 7}
    _check_chat(tiny_tokenizer, [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
                *got[3])


# ----------------------------------------------------------------------------- crash + resume


def _snapshot(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_sigkill_mid_run_then_rerun_gives_identical_shards_and_manifest(tmp_path, tiny_teacher_dir):
    write_jsonl(synthetic_corpus(3000, seed=7, kind="mixed"), tmp_path / "in.jsonl")
    args = ["--input", str(tmp_path / "in.jsonl"), "--tokenizer", tiny_teacher_dir, "--shard-size", "50"]
    out = tmp_path / "crashed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.preprocess", *args, "--output", str(out), "--num-proc", "2"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.is_dir() and sum(n.startswith("shard-") for n in os.listdir(out)) >= 2:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "preprocess finished before it could be killed; make the input larger"
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes, mid-flight
    finally:
        proc.wait(timeout=30)
    finished = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if n.startswith("shard-")}
    assert "manifest.json" not in os.listdir(out)
    assert 2 <= len(finished) < 60

    main([*args, "--output", str(out)])  # resume, in one process this time
    assert all(os.stat(out / n).st_mtime_ns == t for n, t in finished.items()), "finished shards were redone"
    main([*args, "--output", str(tmp_path / "clean")])
    crashed, clean = _snapshot(out), _snapshot(tmp_path / "clean")
    assert list(crashed) == list(clean) == ["manifest.json"] + [f"shard-{i:05d}.parquet" for i in range(60)]
    assert crashed == clean  # byte-identical, no temp files left behind

    mtimes = {n: os.stat(out / n).st_mtime_ns for n in crashed}
    main([*args, "--output", str(out)])  # a finished folder: nothing is redone
    assert _snapshot(out) == clean
    assert {n: os.stat(out / n).st_mtime_ns for n in crashed if n != "manifest.json"} == {
        n: t for n, t in mtimes.items() if n != "manifest.json"
    }


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"empty\.jsonl: no records \(the file is empty\)"),
        ("\n\n", r"empty\.jsonl: no records \(the file has only blank lines\)"),
        ('{"text": "fine"}\nthis is not json\n', r"empty\.jsonl:2: not valid JSON"),
        ("text,label\nhello,1\n", r"empty\.jsonl:1: not valid JSON"),
        ('{"text": "ok"}\n\n[1, 2]\n', r"empty\.jsonl:3: expected a JSON object, got list"),
        ('{"title": "x"}\n', r"empty\.jsonl:1: record has no field this reader understands \(keys: title\)"),
        (
            '{"text": "ok"}\n{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "?"}]}\n',
            r"empty\.jsonl:2: conversation has no assistant turn \(roles: user, user\)",
        ),
        ('{"messages": [{"role": "user", "content": ["a"]}]}\n', r"empty\.jsonl:1: message 0 content is list"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, tiny_tokenizer, content, message):
    (tmp_path / "empty.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        preprocess([str(tmp_path / "empty.jsonl")], tmp_path / "out", tiny_tokenizer, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_input_and_bad_options(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        preprocess([str(tmp_path / "nope.jsonl")], tmp_path / "out", tiny_tokenizer)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"x\.csv: unsupported file type"):
        preprocess([str(tmp_path / "x.csv")], tmp_path / "out", tiny_tokenizer)
    with pytest.raises(ValueError, match="--pack needs --max-seq-length"):
        preprocess([str(tmp_path / "x.csv")], tmp_path / "out", tiny_tokenizer, pack=True)


def test_tokenizer_differing_from_the_manifest_is_refused(tmp_path, tiny_tokenizer):
    write_jsonl(synthetic_corpus(5, seed=0, kind="chat"), tmp_path / "in.jsonl")
    preprocess([str(tmp_path / "in.jsonl")], tmp_path / "out", tiny_tokenizer, progress=False)
    other = build_tiny_tokenizer(texts=[f"other words {i} here" for i in range(50)], vocab_size=300)
    with pytest.raises(ValueError, match=r"out/manifest\.json: .* already holds shards made with tokenizer"):
        preprocess([str(tmp_path / "in.jsonl")], tmp_path / "out", other, progress=False)
    with pytest.raises(ValueError, match=r"out/manifest\.json: these shards were tokenized with .*fingerprint"):
        PretokenizedShardDataset(tmp_path / "out", tokenizer=other)
    with pytest.raises(ValueError, match="was made with max_seq_length=None"):
        preprocess([str(tmp_path / "in.jsonl")], tmp_path / "out", tiny_tokenizer, max_seq_length=16, progress=False)
    manifest = preprocess([str(tmp_path / "in.jsonl")], tmp_path / "out", other, overwrite=True, progress=False)
    assert manifest["tokenizer"]["vocab_size"] == len(other)


def test_a_pad_token_set_at_load_time_still_matches_the_shards(tmp_path, tiny_teacher_dir):
    """Llama-3 base tokenizers ship without a pad token and training sets pad = EOS: the shards stay valid."""
    from transformers import AutoTokenizer

    shipped = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    shipped.pad_token = None
    write_jsonl(synthetic_corpus(5, seed=0, kind="text"), tmp_path / "in.jsonl")
    preprocess([str(tmp_path / "in.jsonl")], tmp_path / "out", shipped, progress=False)
    padded = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    padded.pad_token = padded.eos_token
    assert len(PretokenizedShardDataset(tmp_path / "out", tokenizer=padded)) == 5


def test_cli_help_and_error_exit_code(tmp_path, tiny_teacher_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--max-seq-length" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text("nope\n")
    code = main(["--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o"), "--tokenizer", tiny_teacher_dir])
    assert code == 2 and "bad.jsonl:1: not valid JSON" in capsys.readouterr().err

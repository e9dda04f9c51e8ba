"""training.synthesize on a tiny chat model (gibberish text, real machinery): the Magpie prefix from any template,
determinism by seed, resume after a kill with the very same records, dedup, every filter, and the assistant-only
mask through preprocess and the held-out scorer."""

import json
import os

import pytest
import torch

from tests.training.tiny_gguf import SYSTEM_DEFAULT, write_tiny_chat_gguf
from training.converters import gguf as cg
from training.teachers import synthesize as sy

pytest.importorskip("gguf")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cg.CACHE_ENV, str(tmp_path / "hf_retnet_cache"))


@pytest.fixture(scope="module")
def chatty(tmp_path_factory):
    """(gguf file, converted folder, tokenizer) of a tiny Llama whose turns end with <|im_end|> now and then."""
    root = tmp_path_factory.mktemp("chatty")
    path, tokenizer, _ = write_tiny_chat_gguf(root / "chatty.gguf", "F32", chatty=True)
    folder = cg.resolve_pretrained(path, cache_dir=str(root / "cache"), log=lambda m: None)
    return path, folder, tokenizer


def args(model, output, **overrides):
    values = dict(model=model, output=str(output), n=12, batch_size=4, max_request_tokens=24, max_answer_tokens=24,
                  temperature=1.0, min_request_chars=4, device="cpu", dtype="float32", progress=False)
    values.update(overrides)
    return sy.SynthesizeArguments(**values)


def read(path):
    return open(path, "rb").read()


# ----------------------------------------------------------------------------------------------- pure functions


def test_filters_reject_what_they_should():
    ok = "Can you explain how rainbows form after the rain?"
    assert sy.check_request(ok) is None
    assert sy.check_request(ok, finished=False) == "unfinished_request"
    assert sy.check_request(ok, has_special=True) == "not_a_request"  # e.g. it opened an assistant turn
    assert sy.check_request("assistant\nSure! Here is a poem.") == "not_a_request"
    assert sy.check_request("User: what is 2+2?") == "not_a_request"
    assert sy.check_request("") == sy.check_request("   ") == sy.check_request("Hi?") == "short_request"
    assert sy.check_request("Hi?", min_chars=2) is None
    loop = "tell me more, tell me more, tell me more, tell me more, tell me more"
    assert sy.check_request(loop) == "repetitive_request"
    assert sy.check_answer("Rainbows form when sunlight is refracted by droplets.") is None
    assert sy.check_answer("Rainbows", finished=False) == "unfinished_answer"
    assert sy.check_answer("Rainbows form.", has_special=True) == "answer_leaves_turn"
    assert sy.check_answer(" ") == "short_answer"
    assert sy.check_answer("the sky is blue. " * 10) == "repetitive_answer"
    assert sy.check_answer("the sky is blue. " * 10, max_repeat_ratio=1.0) is None

    assert sy.repeat_ratio("a b c d e f g h") == 0.0 and sy.repeat_ratio("a a") == 0.0
    assert sy.repeat_ratio("a a a a a a a a a a") > 0.8
    assert sy.normalize_request("  Hello,   World! ") == sy.normalize_request("hello world") == "hello world"


def test_chat_prefix_comes_from_the_template_not_a_hard_coded_format(chatty):
    from tests.tiny_models import build_tiny_tokenizer

    tokenizer = chatty[2]
    prefix, suffix = sy.chat_prefix(tokenizer)
    assert prefix == f"<|im_start|>system\n{SYSTEM_DEFAULT}<|im_end|>\n<|im_start|>user\n"
    assert suffix.startswith("<|im_end|>")
    assert sy.chat_prefix(tokenizer, "Be brief.")[0] == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    assert sy.end_of_turn_ids(tokenizer, suffix) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    llama3 = build_tiny_tokenizer()  # a Llama-3 style template: BOS, header ids, <|eot_id|>
    prefix, suffix = sy.chat_prefix(llama3)
    assert prefix == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    assert sy.end_of_turn_ids(llama3, suffix)[0] == llama3.convert_tokens_to_ids("<|eot_id|>")

    llama3.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        sy.chat_prefix(llama3)


# ----------------------------------------------------------------------------------------------- runs


def test_same_seed_same_file_from_gguf_or_folder_other_seed_other_file(tmp_path, chatty):
    gguf_path, folder, _ = chatty
    a = sy.synthesize(args(gguf_path, tmp_path / "a.jsonl"))  # the .gguf file itself: converted on the fly
    sy.synthesize(args(folder, tmp_path / "b.jsonl"))
    sy.synthesize(args(folder, tmp_path / "c.jsonl", seed=1))
    assert read(tmp_path / "a.jsonl") == read(tmp_path / "b.jsonl") != read(tmp_path / "c.jsonl")
    records = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    assert len(records) == a["records"] == 12 and len({r["id"] for r in records}) == 12
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["seed"] == 0
        assert sy.check_request(r["messages"][0]["content"], min_chars=4) is None
        assert sy.check_answer(r["messages"][1]["content"]) is None
    keys = [sy.normalize_request(r["messages"][0]["content"]) for r in records]
    assert len(set(keys)) == len(keys)  # no duplicate requests

    stats = json.load(open(tmp_path / "a.stats.json"))
    assert stats["records"] == 12 and stats["generated_tokens"] > 0 and stats["tokens_per_second"] > 0
    assert set(stats["rejected"]) == set(sy.FILTERS)
    assert stats["records"] + stats["rejected_total"] <= stats["candidates"] == 4 * stats["batches"]
    assert stats["rejected"]["unfinished_request"] > 0 and stats["rejected"]["short_request"] > 0


def test_a_killed_run_resumes_to_the_records_of_an_uninterrupted_one(tmp_path, chatty):
    folder = chatty[1]
    full = tmp_path / "full.jsonl"
    sy.synthesize(args(folder, full))
    want = read(full)
    assert want.count(b"\n") == 12

    out = tmp_path / "out.jsonl"
    progress = sy.progress_path(str(out))
    for cut_at in (len(want) // 2, len(want) // 3 + 7, 1, len(want) - 5):  # mid-line cuts: a partial last line
        sy.synthesize(args(folder, out, overwrite=True))
        with open(out, "r+b") as handle:
            handle.truncate(cut_at)
        stats = sy.synthesize(args(folder, out))
        assert read(out) == want, cut_at
        assert stats["records"] == 12

    # killed after the batch reached the output but before its progress entry: the batch is redone, not duplicated
    lines = open(progress, "rb").read().splitlines(keepends=True)
    open(progress, "wb").write(b"".join(lines[:-2]) + lines[-2][:10])
    sy.synthesize(args(folder, out))
    assert read(out) == want

    # a finished file is left alone; a larger --n continues it as one longer run would have written it
    sy.synthesize(args(folder, out))
    assert read(out) == want
    sy.synthesize(args(folder, out, n=20))
    sy.synthesize(args(folder, tmp_path / "twenty.jsonl", n=20))
    assert read(out) == read(tmp_path / "twenty.jsonl") and read(out).startswith(want)

    with pytest.raises(ValueError, match=r"other settings \(temperature\)"):
        sy.synthesize(args(folder, out, temperature=0.5))
    with pytest.raises(FileExistsError, match="not written by training.synthesize"):
        open(tmp_path / "foreign.jsonl", "w").write('{"text": "x"}\n')
        sy.synthesize(args(folder, tmp_path / "foreign.jsonl"))


def test_prompts_file_dedup_short_and_system(tmp_path, chatty):
    folder = chatty[1]
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "Write a poem about the river."},
             {"prompt": "write a POEM about the river!"},  # a duplicate once normalised
             {"prompt": "  "},  # empty
             {"messages": [{"role": "user", "content": "What is the capital?"},
                           {"role": "assistant", "content": "An old answer, regenerated."}]},
             {"messages": [{"role": "system", "content": "Answer in French."},
                           {"role": "user", "content": "Describe the weather."}]}]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    stats = sy.synthesize(args(folder, tmp_path / "ans.jsonl", prompts=str(prompts), n=10, batch_size=3,
                               max_answer_tokens=64, system="Be brief."))
    assert stats["rejected"]["duplicate_request"] == 1 and stats["rejected"]["short_request"] == 1
    assert stats["candidates"] == 5 and stats["stopped"] == "prompts exhausted"
    records = [json.loads(line) for line in open(tmp_path / "ans.jsonl")]
    asked = {r["messages"][-2]["content"] for r in records}
    assert asked <= {"Write a poem about the river.", "What is the capital?", "Describe the weather."}
    assert len(records) == stats["records"] == 3 - sum(stats["rejected"][k] for k in sy.FILTERS if "answer" in k)
    for r in records:
        assert r["messages"][0]["role"] == "system" and r["messages"][-1]["role"] == "assistant"
        assert "An old answer" not in json.dumps(r)
        if r["messages"][-2]["content"] == "Describe the weather.":
            assert r["messages"][0]["content"] == "Answer in French."  # its own system message is kept
        else:
            assert r["messages"][0]["content"] == "Be brief."

    text = tmp_path / "prompts.txt"
    text.write_text("First question here?\n\nSecond question here?\n")
    assert [c[-1]["content"] for c in sy.read_prompts(str(text))] == ["First question here?", "Second question here?"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected an object with a 'prompt'"):
        sy.read_prompts(str(bad))


def test_output_trains_assistant_turns_only_through_preprocess_and_evaluation(tmp_path, chatty):
    import pyarrow.parquet as pq

    from training.evaluation.heldout import load_documents, make_windows
    from training.data.preprocess import preprocess

    folder, tokenizer = chatty[1], chatty[2]
    out = tmp_path / "synth" / "train.jsonl"
    sy.synthesize(args(folder, out, system="Be brief."))
    records = [json.loads(line) for line in open(out)]
    manifest = preprocess([str(out)], str(tmp_path / "shards"), str(cg.resolve_pretrained(chatty[0])), progress=False)
    assert manifest["totals"]["num_sequences"] == len(records) == 12
    table = pq.read_table(tmp_path / "shards" / "shard-00000.parquet").to_pylist()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for record, row in zip(records, table):
        ids, labels = row["input_ids"], row["labels"]
        assert ids == tokenizer.apply_chat_template(record["messages"], return_dict=True)["input_ids"]
        trained = [t for t, label in zip(ids, labels) if label != -100]
        assert all(label in (-100, t) for t, label in zip(ids, labels))
        # exactly the answer and its end of turn; system, user and the headers are masked
        assert tokenizer.decode(trained) == record["messages"][-1]["content"] + "<|im_end|>\n"
        assert trained.count(im_end) == 1
        first = labels.index(next(label for label in labels if label != -100))
        assert tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")

    docs = load_documents(str(out), tokenizer)  # training.evaluate's held-out scorer reads the same masks
    for doc, row in zip(docs, table):
        assert doc["input_ids"] == row["input_ids"] and doc["labels"] == row["labels"]  # ChatML starts with BOS
        windows = make_windows([doc], window=4096, stride=2048)
        scored = torch.cat([w.targets for w in windows])
        assert int((scored != -100).sum()) == sum(label != -100 for label in row["labels"])


def test_cli_help_and_dash_spellings(tmp_path, chatty, capsys):
    with pytest.raises(SystemExit) as exit_:
        sy.main(["--help"])
    assert exit_.value.code == 0 and "--max_request_tokens" in capsys.readouterr().out
    code = sy.main(["--model", chatty[1], "--output", str(tmp_path / "o.jsonl"), "--n", "3", "--batch-size", "4",
                    "--max-request-tokens", "24", "--max-answer-tokens", "24", "--temperature", "1.0",
                    "--min-request-chars", "4", "--device", "cpu", "--progress", "false"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "synthesize: 3 conversations" in printed and "tokens/s" in printed
    assert sy.main(["--model", chatty[1], "--output", str(tmp_path / "p.jsonl"), "--top_p", "0"]) == 2
    assert "--top_p must be in (0, 1]" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "o.stats.json")

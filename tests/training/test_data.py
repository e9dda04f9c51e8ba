"""training.data: shard dataset ordering, filtering, sharding, workers, Trainer resume; collator;
build_dataset; and the curriculum downloader (local mirror, offline failure)."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from training.data.shards import (
    IGNORE_INDEX,
    PaddingCollator,
    PretokenizedShardDataset,
    TokenizedRecordsDataset,
    build_dataset,
)
from training.data.preprocess import preprocess
from training.data.synthetic import synthetic_corpus, write_jsonl
from tests.tiny_models import build_tiny_llama, build_tiny_tokenizer

N_RECORDS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    """(jsonl path, shard folder) for a small mixed text/chat corpus, 4 shards."""
    root = tmp_path_factory.mktemp("data")
    path = write_jsonl(synthetic_corpus(N_RECORDS, seed=11, kind="mixed"), root / "in.jsonl")
    preprocess([path], root / "shards", tiny_tokenizer, shard_size=10, progress=False)
    return path, str(root / "shards")


def _ids(ds, n=None):
    return [tuple(ds[i]["input_ids"].tolist()) for i in range(n or len(ds))]


# ----------------------------------------------------------------------------- collator


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("multiple", [None, 8])
def test_collator_pads_masks_and_keeps_labels(side, multiple):
    items = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": torch.tensor([1, 2, 3, 4, 9]), "labels": torch.tensor([1, 2, 3, 4, 9])},
        {"input_ids": [8], "labels": [8]},
    ]
    batch = PaddingCollator(pad_token_id=0, padding_side=side, pad_to_multiple_of=multiple)(items)
    width = 8 if multiple else 5
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        k: ((3, width), torch.int64) for k in ("input_ids", "attention_mask", "labels")
    }
    for row, item in enumerate(items):
        ids = list(map(int, item["input_ids"]))
        n = len(ids)
        real = slice(0, n) if side == "right" else slice(width - n, width)
        pad = torch.ones(width, dtype=torch.bool)
        pad[real] = False
        assert batch["input_ids"][row, real].tolist() == ids
        assert batch["labels"][row, real].tolist() == list(map(int, item["labels"]))
        assert batch["attention_mask"][row, real].eq(1).all() and batch["attention_mask"][row, pad].eq(0).all()
        assert batch["labels"][row, pad].eq(IGNORE_INDEX).all() and batch["input_ids"][row, pad].eq(0).all()


def test_collator_rejects_bad_input():
    with pytest.raises(ValueError, match="pad_token_id is None"):
        PaddingCollator(None)
    with pytest.raises(ValueError, match="padding_side"):
        PaddingCollator(0, padding_side="middle")
    with pytest.raises(ValueError, match="must be equal 1-D"):
        PaddingCollator(0)([{"input_ids": [1, 2], "labels": [1]}])


# ----------------------------------------------------------------------------- shard dataset


def test_shuffle_is_deterministic_by_seed_and_epoch(corpus):
    _, folder = corpus
    a, b = PretokenizedShardDataset(folder, seed=0), PretokenizedShardDataset(folder, seed=0)
    c, plain = PretokenizedShardDataset(folder, seed=1), PretokenizedShardDataset(folder, shuffle=False)
    assert len(a) == N_RECORDS
    assert _ids(a) == _ids(b) != _ids(c)
    assert sorted(_ids(a)) == sorted(_ids(c)) == sorted(_ids(plain))
    assert _ids(plain) == [tuple(plain.read_row(i)["input_ids"].tolist()) for i in range(N_RECORDS)]
    epoch0 = _ids(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert _ids(a) == _ids(b) != epoch0 and sorted(_ids(a)) == sorted(epoch0)


def test_length_filter_and_truncation(corpus):
    _, folder = corpus
    full = PretokenizedShardDataset(folder, shuffle=False)
    lengths = [len(x) for x in _ids(full)]
    cut = int(np.median(lengths))
    filtered = PretokenizedShardDataset(folder, min_length=cut, max_seq_length=cut - 5, shuffle=False)
    assert len(filtered) == sum(n >= cut for n in lengths) < len(full)
    assert all(len(x) == cut - 5 for x in _ids(filtered))
    assert filtered.lengths.tolist() == [cut - 5] * len(filtered)
    assert full.lengths.tolist() == lengths
    with pytest.raises(ValueError, match="no sequence has at least min_length=100000"):
        PretokenizedShardDataset(folder, min_length=100_000)


def test_distributed_sampler_shards_disjointly(corpus):
    """Multi-process sharding: each rank gets its own half, together exactly the dataset."""
    _, folder = corpus
    ds = PretokenizedShardDataset(folder, seed=3)
    parts = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        parts.append([ds[i]["input_ids"].tolist() for i in sampler])
    assert len(parts[0]) == len(parts[1]) == N_RECORDS // 2
    assert sorted(map(tuple, parts[0] + parts[1])) == sorted(_ids(ds))


def test_dataloader_workers_give_the_same_batches(corpus, tiny_tokenizer):
    _, folder = corpus
    ds = PretokenizedShardDataset(folder, seed=5, max_mapped_bytes=1 << 20)
    assert len(pickle.dumps(ds)) < 50_000  # workers get a handle, not the data
    collate = PaddingCollator(tiny_tokenizer.pad_token_id)
    batches = [list(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=w)) for w in (0, 2)]
    assert len(batches[0]) == len(batches[1]) == N_RECORDS // 4
    for x, y in zip(*batches):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_maps_are_reopened_within_the_byte_budget(corpus):
    _, folder = corpus
    """A zero budget drops the resident pages at every check (every 8 reads); items must not change."""
    ds = PretokenizedShardDataset(folder, max_mapped_bytes=0)
    reference = _ids(PretokenizedShardDataset(folder))
    assert _ids(ds) == reference and ds.num_releases >= N_RECORDS // 8 - 1


def test_resume_mid_epoch_with_trainer_sees_the_same_batches(corpus, tiny_tokenizer, tmp_path):
    """Train 8 steps straight, or resume from the step-3 checkpoint: steps 4..8 get identical batches."""
    from transformers import Trainer, TrainingArguments

    _, folder = corpus

    def run(out, resume=None):
        seen = []
        collate = PaddingCollator(tiny_tokenizer.pad_token_id)

        def record(items):
            batch = collate(items)
            seen.append(batch["input_ids"].clone())
            return batch

        args = TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=8, max_steps=8, save_steps=3, logging_steps=100,
            report_to=[], use_cpu=True, seed=0, learning_rate=1e-3, dataloader_num_workers=0, disable_tqdm=True,
        )
        model = build_tiny_llama(len(tiny_tokenizer), hidden_size=32, num_layers=1)
        trainer = Trainer(model=model, args=args, train_dataset=PretokenizedShardDataset(folder, max_seq_length=48),
                          data_collator=record)
        trainer.train(resume_from_checkpoint=resume)
        return seen

    # 5 batches per epoch: the resume lands mid-epoch 0 and the run crosses into epoch 1 (reshuffled).
    # The Trainer may collate one batch ahead, so compare the batches of steps 4..8.
    # Resuming from the straight run's step-3 checkpoint is exactly what a crash after step 3 leaves.
    straight = run(tmp_path / "a")
    assert len(straight) >= 8
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert len(resumed) >= 5 and all(torch.equal(x, y) for x, y in zip(resumed[:5], straight[3:8]))
    assert not torch.equal(straight[0], straight[5])  # epoch 1 is a different order


def test_shard_folder_problems_are_reported(corpus, tmp_path):
    import shutil

    _, folder = corpus
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns(".arrow_cache"))
    with open(broken / "shard-00002.parquet", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match=r"shard-00002\.parquet: \d+ bytes but the manifest says"):
        PretokenizedShardDataset(broken)
    os.unlink(broken / "shard-00002.parquet")
    with pytest.raises(FileNotFoundError, match=r"shard-00002\.parquet: listed in .*manifest\.json but missing"):
        PretokenizedShardDataset(broken)
    os.unlink(broken / "manifest.json")
    with pytest.raises(FileNotFoundError, match="has shards but no manifest: preprocessing did not finish"):
        PretokenizedShardDataset(broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json:1: manifest is not valid JSON"):
        PretokenizedShardDataset(broken)


# ----------------------------------------------------------------------------- build_dataset


def test_build_dataset_from_shards_and_from_a_file_agree(corpus, tiny_tokenizer, tiny_teacher_dir):
    path, folder = corpus
    shards = build_dataset(folder, tiny_tokenizer, max_seq_length=40, seed=2)
    on_the_fly = build_dataset(path, tiny_teacher_dir, max_seq_length=40, seed=2)
    assert isinstance(shards, PretokenizedShardDataset) and isinstance(on_the_fly, TokenizedRecordsDataset)
    assert len(shards) == len(on_the_fly) == N_RECORDS
    for i in range(N_RECORDS):
        assert all(torch.equal(shards[i][k], on_the_fly[i][k]) for k in ("input_ids", "labels"))
    other = build_tiny_tokenizer(texts=[f"different corpus {i}" for i in range(40)], vocab_size=300)
    with pytest.raises(ValueError, match="these shards were tokenized with"):
        build_dataset(folder, other, max_seq_length=40)


def test_build_dataset_reports_bad_records_and_unreachable_ids(tmp_path, tiny_tokenizer):
    write_jsonl([{"text": "fine"}, {"messages": [{"role": "user", "content": "hi"}]}], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: conversation has no assistant turn"):
        build_dataset(str(tmp_path / "bad.jsonl"), tiny_tokenizer, 32)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no records"):
        build_dataset(str(tmp_path / "empty.jsonl"), tiny_tokenizer, 32)
    with pytest.raises(ValueError, match="someone/no-such-dataset: could not load split 'train'"):
        build_dataset("someone/no-such-dataset", tiny_tokenizer, 32)


# ----------------------------------------------------------------------------- curriculum downloader


def test_download_from_a_local_mirror_feeds_preprocess(tmp_path, tiny_tokenizer):
    from training.data.download import main as download_main

    mirror = tmp_path / "mirror" / "openai" / "gsm8k"
    mirror.mkdir(parents=True)
    rows = [{"question": f"What is {i} plus 1?", "answer": f"It is {i + 1}."} for i in range(7)]
    write_jsonl(rows, mirror / "train.jsonl")
    out = tmp_path / "data"
    code = download_main(["--category", "math_reasoning", "--sources", "gsm8k", "--local-root",
                          str(tmp_path / "mirror"), "--output", str(out), "--max-samples", "5"])
    assert code == 0
    lines = [json.loads(x) for x in (out / "math_reasoning" / "gsm8k.jsonl").read_text().splitlines()]
    assert len(lines) == 5
    assert lines[2]["messages"] == [{"role": "user", "content": "What is 2 plus 1?"},
                                    {"role": "assistant", "content": "It is 3."}]
    manifest = preprocess([str(out)], tmp_path / "shards", tiny_tokenizer, recursive=True, progress=False)
    assert manifest["totals"]["num_sequences"] == 5


def test_download_offline_fails_fast_naming_what_is_unreachable(tmp_path, capsys, monkeypatch):
    import time

    from training.data.download import CATEGORIES, main as download_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    code = download_main(["--category", "instruction_chat", "--output", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == 2 and time.time() - start < 30
    assert "could not reach" in err and "HF_HUB_OFFLINE" in err
    for source in CATEGORIES["instruction_chat"]:
        assert source.path in err
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.jsonl"))

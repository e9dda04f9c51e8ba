"""Packed rows through training (issue 22): `training.preprocess --pack` records where documents start
(`position_ids`), the collator hands them on, and the trainer, the direct / cached / network teachers and the cache
builder read every document alone, so a packed step computes what the same documents give unpacked.

Tolerances: fp32 throughout; a packed and an unpacked forward differ only in summation order (a block-diagonal mask
or restarted retention state against separate rows), measured at <= 1e-6 on log-probabilities, hence rel 1e-5 on the
losses (token means) and atol 1e-5 on top-k log-probabilities; token ids compared exactly where the next log-prob is
more than 1e-4 below (no near-tie can swap them)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_retnet import RetNetConfig, RetNetForCausalLM
from training.data.format import MANIFEST_NAME
from training.data.preprocess import encode_record, normalize_record, preprocess
from training.data.records import IGNORE_INDEX
from training.data.shards import PaddingCollator, PretokenizedShardDataset, document_starts
from training.teachers import TeacherSource
from training.teachers.direct import DirectTeacher
from training.trainers.distillation_config import DistillationConfig
from training.trainers.distillation_trainer import _TRAIN, DistillationTrainer
from training.utils.io import sha256_file
from tests.tiny_models import default_texts

BLOCK = 48
LOSS_REL = 1e-5
LOGPROB_ATOL = 1e-5


@pytest.fixture(scope="module")
def texts():
    return default_texts(40)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_tokenizer, texts):
    root = tmp_path_factory.mktemp("packed")
    (root / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    packed = preprocess([str(root / "in.jsonl")], root / "packed", tiny_tokenizer, max_seq_length=BLOCK, pack=True,
                        shard_size=25, progress=False)
    unpacked = preprocess([str(root / "in.jsonl")], root / "unpacked", tiny_tokenizer, max_seq_length=BLOCK,
                          progress=False)
    return {"root": root, "packed": str(root / "packed"), "unpacked": str(root / "unpacked"),
            "packed_manifest": packed, "unpacked_manifest": unpacked}


def split_documents(item: dict) -> list[dict]:
    """The documents (or parts of one) of a packed item as items of their own, without position_ids."""
    starts = [0, *document_starts(item["position_ids"]).nonzero().squeeze(1).tolist(), len(item["input_ids"])]
    return [{"input_ids": item["input_ids"][a:b], "labels": item["labels"][a:b]} for a, b in zip(starts, starts[1:])]


def clear_ids_equal(got_ids, got_lps, want_ids, want_lps):
    """Top-k ids equal wherever the reference has no near-tie; log-probs within LOGPROB_ATOL."""
    torch.testing.assert_close(got_lps, want_lps, rtol=0, atol=LOGPROB_ATOL)
    clear = ((want_lps[..., :-1] - want_lps[..., 1:]) > 1e-4).all(-1)
    assert bool(clear.float().mean() > 0.5)
    torch.testing.assert_close(got_ids[clear], want_ids[clear], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- the shards


def test_packed_shards_carry_positions_that_restart_at_every_document_and_block(folders, tiny_tokenizer, texts):
    ds = PretokenizedShardDataset(folders["packed"], shuffle=False)
    assert ds.has_position_ids
    items = [ds[i] for i in range(len(ds))]
    manifest = folders["packed_manifest"]
    assert manifest["format_version"] == 2 and manifest["options"]["document_positions"] == "restart"
    assert "position_ids" in manifest["columns"]
    # Expected, shard by shard (25 records each): positions 0.. in every record, and again from 0 where a record
    # continues into the next block ("start over").
    expected_ids, expected_pos = [], []
    for first in range(0, len(texts), 25):
        stream, pos = [], []
        for i, text in enumerate(texts[first:first + 25]):
            ids, _ = encode_record(normalize_record({"text": text}, "r"), tiny_tokenizer, "r")
            stream += ids
            pos += list(range(len(ids)))
        for b in range(0, len(stream), BLOCK):
            block = pos[b:b + BLOCK]
            if block[0] != 0:  # a record cut at the block boundary: its rest starts over
                head = next((j for j, p in enumerate(block) if p == 0), len(block))
                block[:head] = range(head)
            expected_ids.append(stream[b:b + BLOCK])
            expected_pos.append(block)
    assert [it["input_ids"].tolist() for it in items] == expected_ids
    assert [it["position_ids"].tolist() for it in items] == expected_pos
    assert any(p[0] == 0 and 0 in p[1:] for p in expected_pos)  # rows hold several documents
    # the training max_seq_length truncates the positions with the tokens
    short = PretokenizedShardDataset(folders["packed"], max_seq_length=10, shuffle=False)[0]
    assert short["position_ids"].tolist() == expected_pos[0][:10]


def test_unpacked_shards_are_unchanged_version_1_without_positions(folders):
    manifest = folders["unpacked_manifest"]
    assert manifest["format_version"] == 1 and "document_positions" not in manifest["options"]
    assert set(manifest["columns"]) == {"input_ids", "labels", "length"}
    ds = PretokenizedShardDataset(folders["unpacked"], shuffle=False)
    assert not ds.has_position_ids and set(ds[0]) == {"input_ids", "labels"}
    assert "position_ids" not in PaddingCollator(0)([ds[0], ds[1]])


def test_packed_shards_written_before_positions_still_read(folders, tmp_path, tiny_tokenizer, caplog):
    """A version-1 packed folder (no position_ids column) reads as before, one sequence per row, with a warning;
    preprocessing into it again asks for a new folder or --overwrite instead of mixing shard versions."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(folders["packed"], old, ignore=shutil.ignore_patterns(".arrow_cache"))
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    for entry in manifest["shards"]:
        path = old / entry["file"]
        table = pq.read_table(path)
        table = table.drop(["position_ids"]).replace_schema_metadata(table.schema.metadata)
        pq.write_table(table, path)
        entry["num_bytes"], entry["sha256"] = path.stat().st_size, sha256_file(str(path))
    manifest["format_version"] = 1
    del manifest["options"]["document_positions"], manifest["columns"]["position_ids"]
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="training.data.shards"):
        ds = PretokenizedShardDataset(str(old), shuffle=False, tokenizer=tiny_tokenizer)
    assert "without document boundaries" in caplog.text
    new = PretokenizedShardDataset(folders["packed"], shuffle=False)
    assert not ds.has_position_ids and set(ds[0]) == {"input_ids", "labels"}
    assert ds[3]["input_ids"].tolist() == new[3]["input_ids"].tolist()
    with pytest.raises(ValueError, match="document_positions=None, not 'restart'"):
        preprocess([str(folders["root"] / "in.jsonl")], old, tiny_tokenizer, max_seq_length=BLOCK, pack=True,
                   shard_size=25, progress=False)


def test_collator_emits_position_ids_and_masks_labels_at_document_starts():
    items = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "position_ids": [0, 1, 0, 1, 2]},
        {"input_ids": [3, 4, 5], "labels": [-100, 4, 5], "position_ids": [0, 0, 1]},
        {"input_ids": [1, 2], "labels": [1, 2]},  # no positions: one document
    ]
    for side in ("right", "left"):
        batch = PaddingCollator(0, padding_side=side)(items)
        mask = batch["attention_mask"].bool()
        got = [batch["position_ids"][b][mask[b]].tolist() for b in range(3)]
        labels = [batch["labels"][b][mask[b]].tolist() for b in range(3)]
        assert got == [[0, 1, 0, 1, 2], [0, 0, 1], [0, 1]]
        assert labels == [[5, 6, IGNORE_INDEX, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 5], [1, 2]]
        assert (batch["position_ids"][~mask] == 0).all()


# ---------------------------------------------------------------------------------------------------- teachers


def packed_rows(vocab, seed=0):
    """Two packed rows (three documents, then two and right padding) and the documents alone."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in (7, 5, 9, 6, 8)]
    ids = torch.zeros(2, 21, dtype=torch.long)
    pos = torch.zeros_like(ids)
    ids[0] = torch.cat(docs[:3])
    pos[0] = torch.cat([torch.arange(7), torch.arange(5), torch.arange(9)])
    ids[1, :14] = torch.cat(docs[3:])
    pos[1, :14] = torch.cat([torch.arange(6), torch.arange(8)])
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    return ids, mask, pos, docs, [(0, 0, 7), (0, 7, 12), (0, 12, 21), (1, 0, 6), (1, 6, 14)]


@pytest.mark.parametrize("attention", ["sdpa", "eager", "per_document"])
def test_direct_teacher_reads_each_document_of_a_packed_row_alone(tiny_teacher_dir, attention):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, attn_implementation=(
        "eager" if attention == "per_document" else attention))
    teacher = DirectTeacher(model)
    if attention == "per_document":  # what flash / flex attention (no 4D mask) take
        teacher.MASKED_ATTENTION = ()
    reference = DirectTeacher(tiny_teacher_dir)
    ids, mask, pos, docs, spans = packed_rows(teacher.vocab_size)
    out = teacher.topk(ids, mask, k=8, position_ids=pos)
    leaked = teacher.topk(ids, mask, k=8)  # without position_ids: the old, attending-across behaviour
    for doc, (b, start, end) in zip(docs, spans):
        alone = reference.topk(doc[None], None, k=8)
        clear_ids_equal(out.token_ids[b, start:end], out.logprobs[b, start:end], alone.token_ids[0], alone.logprobs[0])
    assert (leaked.logprobs[0, 7:12] - out.logprobs[0, 7:12]).abs().max() > 1e-2  # the test can tell them apart
    assert torch.isfinite(out.logprobs).all()  # padding positions too (never trained on)


def test_network_teacher_sends_each_document_alone(tiny_teacher_dir):
    from tests.training.test_network_teacher import ThreadServer
    from training.teachers.network import NetworkTeacher
    from training.teachers.server.app import create_app
    from training.teachers.server.hf_engine import HFEngine

    direct = DirectTeacher(tiny_teacher_dir)
    ids, mask, pos, docs, spans = packed_rows(direct.vocab_size, seed=1)
    with ThreadServer(create_app(HFEngine(direct), model_name="tiny")) as peer:
        with NetworkTeacher(peer.url, retries=0) as teacher:
            teacher.prefetch(ids, mask, k=8, position_ids=pos)
            assert teacher._key(ids, mask, 8, 1.0, pos) != teacher._key(ids, mask, 8, 1.0)
            out = teacher.topk(ids, mask, k=8, position_ids=pos)
            assert not len(teacher._prefetcher)  # the prefetch (same positions) answered it
    for doc, (b, start, end) in zip(docs, spans):
        alone = direct.topk(doc[None], None, k=8)
        clear_ids_equal(out.token_ids[b, start:end], out.logprobs[b, start:end], alone.token_ids[0], alone.logprobs[0])


# ---------------------------------------------------------------------------------------------------- training


def tiny_student(vocab_size):
    torch.manual_seed(0)
    return RetNetForCausalLM(RetNetConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_heads=4,
                                          intermediate_size=128, chunk_size=16))


def trainer_for(tmp_path, teacher_dir, teacher, tok, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), teacher_model=teacher_dir, student="350M", teacher_topk=16,
                  distill_alpha=0.5, per_device_train_batch_size=4, max_steps=1, report_to="none", use_cpu=True,
                  save_strategy="no", seed=0)
    values.update(overrides)
    return DistillationTrainer(model=tiny_student(len(tok)), args=DistillationConfig(**values), teacher=teacher,
                               train_dataset=[{"input_ids": [1, 2], "labels": [1, 2]}],
                               data_collator=PaddingCollator(tok.pad_token_id))


def step_terms(trainer, batch) -> tuple[float, float, float, int]:
    """(loss, ce, kd, trained tokens) of one training micro-batch, as compute_loss computes them."""
    trainer.model.train()
    before = trainer._window["train"].clone()
    loss = trainer.compute_loss(trainer.model, batch)
    added = trainer._window["train"] - before
    ce, kd = (float(added[_TRAIN.index(n)]) for n in ("ce", "kd"))
    tokens = int(trainer.trained_positions(batch["labels"], batch["attention_mask"], batch.get("position_ids")).sum())
    return float(loss.detach()), ce, kd, tokens


@pytest.fixture(scope="module")
def batches(folders, tiny_tokenizer):
    ds = PretokenizedShardDataset(folders["packed"], shuffle=False)
    items = [ds[i] for i in range(4)]
    collate = PaddingCollator(tiny_tokenizer.pad_token_id)
    pieces = [piece for it in items for piece in split_documents(it)]
    assert len(pieces) > 2 * len(items)
    return {"packed": collate(items), "unpacked": collate(pieces), "pieces": pieces}


def assert_packed_step_equals_unpacked(trainer, batches):
    packed = step_terms(trainer, batches["packed"])
    unpacked = step_terms(trainer, batches["unpacked"])
    assert packed[3] == unpacked[3] > 0  # the same targets: no document's first token is trained in either
    for got, want in zip(packed[:3], unpacked[:3]):
        assert got == pytest.approx(want, rel=LOSS_REL)
    # without position_ids (the old path) the student and teacher carry state across the documents
    leaky = {k: v for k, v in batches["packed"].items() if k != "position_ids"}
    assert step_terms(trainer, leaky)[1] != pytest.approx(unpacked[1], rel=1e-3)


def test_packed_step_equals_the_documents_unpacked_direct_teacher(tmp_path, tiny_teacher_dir, tiny_tokenizer, batches):
    trainer = trainer_for(tmp_path, tiny_teacher_dir, DirectTeacher(tiny_teacher_dir), tiny_tokenizer)
    assert_packed_step_equals_unpacked(trainer, batches)


def test_packed_step_equals_the_documents_unpacked_cached_teacher(tmp_path, tiny_teacher_dir, tiny_tokenizer,
                                                                  folders, batches):
    """The cache builder answers a packed shard row document by document: training from the cache on the packed
    rows equals training on the same documents as rows of their own (both cached by the same run)."""
    from training.teachers.cache.build import main as build_cache
    from training.teachers.cached import CachedTeacher

    pieces = tmp_path / "pieces.parquet"
    pq.write_table(pa.table({"input_ids": [p["input_ids"].tolist() for p in batches["pieces"]]}), pieces)
    cache = tmp_path / "cache"
    assert build_cache(["--teacher", tiny_teacher_dir, "--data", folders["packed"], str(pieces), "--output", str(cache),
                        "--topk", "16", "--dtype", "float32", "--encoding", "naive", "--batch-size", "4",
                        "--no-progress"]) == 0
    teacher = CachedTeacher(str(cache), topk=16)
    # what the cache holds for a packed row is each document alone (fp16 storage: 1e-3)
    direct = DirectTeacher(tiny_teacher_dir)
    batch = batches["packed"]
    got = teacher.topk(batch["input_ids"], batch["attention_mask"], 16, position_ids=batch["position_ids"])
    for row in range(batch["input_ids"].shape[0]):
        starts = [0, *document_starts(batch["position_ids"][row]).nonzero().squeeze(1).tolist(),
                  int(batch["attention_mask"][row].sum())]
        for a, e in zip(starts, starts[1:]):
            alone = direct.topk(batch["input_ids"][row, a:e][None], None, 16)
            torch.testing.assert_close(got.logprobs[row, a:e], alone.logprobs[0], rtol=0, atol=2e-3)
    trainer = trainer_for(tmp_path, tiny_teacher_dir, teacher, tiny_tokenizer, teacher_source="cached",
                          teacher_cache=str(cache), teacher_model=None, tokenizer=tiny_teacher_dir)
    assert_packed_step_equals_unpacked(trainer, batches)


def test_a_teacher_source_without_position_ids_is_refused_for_packed_batches(tmp_path, tiny_teacher_dir,
                                                                            tiny_tokenizer, batches):
    class OldSource(TeacherSource):
        def __init__(self, inner):
            self.inner, self.vocab_size = inner, inner.vocab_size

        def topk(self, input_ids, attention_mask, k, temperature=1.0):
            return self.inner.topk(input_ids, attention_mask, k, temperature)

    trainer = trainer_for(tmp_path, tiny_teacher_dir, OldSource(DirectTeacher(tiny_teacher_dir)), tiny_tokenizer)
    step_terms(trainer, batches["unpacked"])  # unpacked batches: any source still serves
    with pytest.raises(TypeError, match="takes no position_ids"):
        step_terms(trainer, batches["packed"])


def test_training_on_packed_shards_runs_end_to_end(tmp_path, tiny_teacher_dir, folders, monkeypatch):
    """train_data / eval_data = packed shards: every batch reaches compute_loss with the shards' position_ids."""
    from training.trainers.distillation import run

    seen = []
    original = DistillationTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append("position_ids" in inputs)
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "compute_loss", spy)
    config = DistillationConfig(output_dir=str(tmp_path / "run"), teacher_model=tiny_teacher_dir, student="350M",
                                student_overrides={"hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2,
                                                   "intermediate_size": 64},
                                train_data=folders["packed"], eval_data=folders["packed"], max_seq_length=BLOCK,
                                teacher_topk=8, per_device_train_batch_size=2, per_device_eval_batch_size=8,
                                max_steps=2, eval_strategy="steps", eval_steps=2, report_to="none", use_cpu=True,
                                save_strategy="no", logging_steps=1)
    trainer = run(config)
    assert len(seen) > 2 and all(seen)
    assert np.isfinite([h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]).all()

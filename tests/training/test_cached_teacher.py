"""CachedTeacher: trains like direct mode, looks rows up by hash whatever the padding, and refuses caches that
do not fit (other data, other tokenizer, truncated / corrupted / missing shard, k or temperature mismatch)."""

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from training.teachers.cache.format import MANIFEST_NAME, shard_name
from training.teachers.cache.build import main as cache_main
from training.teachers import TeacherSource
from training.teachers.cached import CachedTeacher
from tests.tiny_models import build_tiny_tokenizer, default_texts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CONFIG = os.path.join(REPO, "examples", "configs", "train_tiny.yaml")


@pytest.fixture(scope="module")
def rows(tiny_tokenizer):
    return [tiny_tokenizer(t)["input_ids"] for t in default_texts(24)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_teacher_dir, rows):
    """A naive k=16 cache over 24 sequences in several shards."""
    folder = tmp_path_factory.mktemp("cached-teacher")
    data = str(folder / "data.parquet")
    pq.write_table(pa.table({"input_ids": rows}), data)
    out = folder / "cache"
    assert cache_main(["--teacher", tiny_teacher_dir, "--data", data, "--output", str(out), "--topk", "16",
                       "--encoding", "naive", "--dtype", "float32", "--shard-tokens", "100", "--no-progress"]) == 0
    return str(out)


@pytest.fixture
def cache_copy(cache_dir, tmp_path):
    """A private copy to damage."""
    return shutil.copytree(cache_dir, tmp_path / "cache")


def batch(rows, side="right"):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, span], mask[i, span] = torch.tensor(r), 1
    return ids, mask


def test_is_a_teacher_source_and_reports_its_cache(cache_dir, tiny_tokenizer, rows):
    teacher = CachedTeacher(cache_dir, topk=16, temperature=1.0, tokenizer=tiny_tokenizer)
    assert isinstance(teacher, TeacherSource)
    assert teacher.vocab_size == len(tiny_tokenizer) and teacher.k == 16 and len(teacher) == len(rows)


@pytest.mark.parametrize("k", [16, 5])
def test_left_and_right_padding_give_the_same_answers(cache_dir, rows, k):
    teacher = CachedTeacher(cache_dir)
    chosen = [rows[3], rows[20], rows[11]]
    right_ids, right_mask = batch(chosen, "right")
    left_ids, left_mask = batch(chosen, "left")
    right = teacher.topk(right_ids, right_mask, k).validate(3, right_ids.shape[1], k)
    left = teacher.topk(left_ids, left_mask, k)
    for i, r in enumerate(chosen):
        n = len(r)
        assert torch.equal(right.token_ids[i, :n], left.token_ids[i, -n:])
        assert torch.equal(right.logprobs[i, :n], left.logprobs[i, -n:])
        assert torch.isfinite(right.logprobs[i]).all()  # padding positions hold a valid finite distribution
    single = teacher.topk(torch.tensor([rows[20]]), None, k)  # no mask: every position is real
    assert torch.equal(single.token_ids[0], right.token_ids[1, : len(rows[20])])


def test_prefetch_returns_the_same_answer(cache_dir, rows):
    teacher = CachedTeacher(cache_dir)
    ids, mask = batch(rows[:4])
    teacher.prefetch(ids, mask, 16, 1.0)
    ahead = teacher.topk(ids, mask, 16, 1.0)
    again = teacher.topk(ids, mask, 16, 1.0)
    assert torch.equal(ahead.token_ids, again.token_ids) and torch.equal(ahead.logprobs, again.logprobs)
    teacher.close()


def test_a_sequence_not_in_the_cache_is_refused(cache_dir, rows, tiny_tokenizer):
    teacher = CachedTeacher(cache_dir)
    other = tiny_tokenizer("a sentence that was never cached at all")["input_ids"]
    with pytest.raises(ValueError, match=f"batch row 1 .* not in the teacher cache {cache_dir}"):
        teacher.topk(*batch([rows[0], other]), 16)
    with pytest.raises(ValueError, match="not in the teacher cache"):  # a truncated version of a cached row
        teacher.topk(*batch([rows[0][:-1]]), 16)


def test_other_data_and_other_tokenizer_are_refused(cache_dir, tmp_path, tiny_teacher_dir):
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2, 3]]}), str(other))
    with pytest.raises(ValueError, match=f"not data the cache was made from .*{MANIFEST_NAME}"):
        CachedTeacher(cache_dir, data=str(other))
    manifest = json.load(open(os.path.join(cache_dir, MANIFEST_NAME)))
    CachedTeacher(cache_dir, data=manifest["data"]["sources"][0]["path"])  # the right data passes
    other_tok = build_tiny_tokenizer(["completely different words make another vocabulary"] * 50, vocab_size=300)
    with pytest.raises(ValueError, match=f"tokenizer .* not the one the cache was made with .*{MANIFEST_NAME}"):
        CachedTeacher(cache_dir, tokenizer=other_tok)
    CachedTeacher(cache_dir, tokenizer=tiny_teacher_dir)  # the teacher's own tokenizer passes


def test_k_or_temperature_beyond_the_cache_is_refused(cache_dir, rows):
    with pytest.raises(ValueError, match=f"teacher_topk=32 is larger than the cache's k=16 .*{MANIFEST_NAME}"):
        CachedTeacher(cache_dir, topk=32)
    teacher = CachedTeacher(cache_dir)
    with pytest.raises(ValueError, match="larger than the cache's k=16"):
        teacher.topk(*batch(rows[:1]), 17)
    with pytest.raises(ValueError, match="temperature=2.0 differs from the cache's temperature=1.0"):
        teacher.topk(*batch(rows[:1]), 16, temperature=2.0)


def test_truncated_corrupted_and_missing_shards_are_named(cache_copy):
    path = os.path.join(cache_copy, shard_name(1))
    original = open(path, "rb").read()
    open(path, "wb").write(original[:-100])
    with pytest.raises(ValueError, match=f"{path} is truncated"):
        CachedTeacher(str(cache_copy))
    with pytest.raises(ValueError, match=f"{path} is truncated"):  # even without the manifest's size check
        CachedTeacher(str(cache_copy), verify="none")
    corrupted = bytearray(original)
    corrupted[-7] ^= 0x55  # one flipped byte in the data
    open(path, "wb").write(bytes(corrupted))
    with pytest.raises(ValueError, match=f"{path} is corrupted"):
        CachedTeacher(str(cache_copy))
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=f"{path} listed in .* is missing"):
        CachedTeacher(str(cache_copy))
    os.remove(os.path.join(cache_copy, MANIFEST_NAME))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        CachedTeacher(str(cache_copy))


# ------------------------------------------------------------------------------------------------------------
# Training from the cache = training in direct mode.


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("text-data") / "train.jsonl"
    with open(path, "w") as handle:
        for text in default_texts(32):
            handle.write(json.dumps({"text": text}) + "\n")
    return str(path)


def train_losses(out, teacher_dir, data, *extra):
    from training.trainers.distillation import main as train_main

    args = ["--config", TINY_CONFIG, "--teacher_model", teacher_dir, "--tokenizer", teacher_dir,
            "--train_data", data, "--output_dir", str(out), "--max_steps", "4", "--teacher_topk", "32",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", *extra]
    assert train_main(args) == 0
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    return [(h["step"], h["loss"], h.get("loss/kd")) for h in state["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def sharp_teacher_dir(tmp_path_factory):
    """A tiny Llama with a peaked next-token distribution, so the KD term is large enough to compare."""
    from tests.tiny_models import save_tiny_teacher

    return save_tiny_teacher(tmp_path_factory.mktemp("sharp-teacher"), initializer_range=0.2)


@pytest.fixture(scope="module")
def direct_losses(tmp_path_factory, sharp_teacher_dir, text_data):
    return train_losses(tmp_path_factory.mktemp("direct-run"), sharp_teacher_dir, text_data)


@pytest.mark.parametrize("encoding,rel", [("naive", 1e-3), ("compact", 2e-2)])
def test_training_from_the_cache_matches_direct_mode(tmp_path, sharp_teacher_dir, text_data, direct_losses,
                                                     encoding, rel):
    """Same data, same student init, same k: naive gives direct mode's losses up to fp16 rounding; compact
    (entries holding 99% of the top-k mass, 4-bit log-probs) stays within 2%."""
    cache = tmp_path / "cache"
    assert cache_main(["--teacher", sharp_teacher_dir, "--data", text_data, "--output", str(cache), "--topk", "32",
                       "--encoding", encoding, "--dtype", "float32", "--max-seq-length", "64",
                       "--no-progress"]) == 0
    cached = train_losses(tmp_path / "cached", sharp_teacher_dir, text_data, "--teacher_source", "cached",
                          "--teacher_cache", str(cache))
    assert [s for s, _, _ in direct_losses] == [s for s, _, _ in cached] == [1, 2, 3, 4]
    for (_, d_loss, d_kd), (_, c_loss, c_kd) in zip(direct_losses, cached):
        assert d_kd > 0.1  # the KD term really takes part
        assert c_loss == pytest.approx(d_loss, rel=rel)
        assert c_kd == pytest.approx(d_kd, rel=2 * rel)


def test_a_cache_of_preprocessed_shards_answers_the_shard_dataset(tmp_path, tiny_teacher_dir, text_data):
    """The data pipeline's own folder format: preprocess -> cache -> every dataset item is found."""
    from training.data.shards import PaddingCollator, PretokenizedShardDataset
    from training.data.preprocess import main as preprocess_main

    shards = tmp_path / "shards"
    preprocess_main(["--input", text_data, "--output", str(shards), "--tokenizer", tiny_teacher_dir,
                     "--max_seq_length", "32"])
    cache = tmp_path / "cache"
    assert cache_main(["--teacher", tiny_teacher_dir, "--data", str(shards), "--output", str(cache), "--topk", "8",
                       "--dtype", "float32", "--max-seq-length", "16", "--no-progress"]) == 0
    teacher = CachedTeacher(str(cache), topk=8, tokenizer=tiny_teacher_dir, data=str(shards))
    dataset = PretokenizedShardDataset(str(shards), max_seq_length=16, seed=3)  # shuffled, as in training
    collate = PaddingCollator(0)
    items = [dataset[i] for i in range(len(dataset))]
    for start in range(0, len(items), 8):
        batch = collate(items[start : start + 8])
        out = teacher.topk(batch["input_ids"], batch["attention_mask"], 8)
        assert torch.isfinite(out.logprobs[batch["attention_mask"].bool()][:, 0]).all()
    with pytest.raises(ValueError, match="not in the teacher cache"):  # other truncation than the cache's
        long = PretokenizedShardDataset(str(shards), max_seq_length=32, shuffle=False)
        batch = collate([long[i] for i in range(len(long)) if len(long[i]["input_ids"]) > 16][:2])
        teacher.topk(batch["input_ids"], batch["attention_mask"], 8)


def test_train_cached_yaml_trains_without_a_teacher_model(tmp_path, sharp_teacher_dir, text_data):
    """examples/configs/train_cached.yaml (tiny overrides): no teacher_model is configured, none is loaded."""
    from training.trainers.distillation_config import load_config
    from training.trainers.distillation import main as train_main

    cache = tmp_path / "cache"
    assert cache_main(["--teacher", sharp_teacher_dir, "--data", text_data, "--output", str(cache), "--topk", "32",
                       "--dtype", "float32", "--max-seq-length", "64", "--no-progress"]) == 0
    overrides = [
        "--teacher_cache", str(cache), "--tokenizer", sharp_teacher_dir, "--train_data", text_data,
        "--student", "350M", "--student_overrides",
        json.dumps({"vocab_size": 468, "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 4,
                    "intermediate_size": 128, "chunk_size": 16}),
        "--teacher_topk", "32", "--max_seq_length", "64", "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "1", "--warmup_steps", "0", "--bf16", "false", "--use_cpu", "true",
        "--output_dir", str(tmp_path / "run"), "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
    ]
    config = load_config(os.path.join(REPO, "examples", "configs", "train_cached.yaml"), overrides)
    assert config.teacher_source == "cached" and config.teacher_model is None
    assert train_main(["--config", os.path.join(REPO, "examples", "configs", "train_cached.yaml"), *overrides]) == 0
    state = json.load(open(tmp_path / "run" / "trainer_state.json"))
    kd = [h["loss/kd"] for h in state["log_history"] if "loss/kd" in h]
    assert len(kd) == 3 and all(v > 0 for v in kd)


@pytest.mark.parametrize("kd", [["--kd_loss", "reverse_kl"], ["--kd_loss", "jsd"], ["--reverse_kl_warmup_steps", "2"]])
def test_reverse_kl_from_a_cache_that_dropped_entries_is_refused(tmp_path, tiny_teacher_dir, text_data, kd,
                                                                 monkeypatch):
    monkeypatch.setenv("HF_RETNET_DEBUG", "1")  # the exception itself, not the command's one-line report of it
    cache = tmp_path / "cache"
    assert cache_main(["--teacher", tiny_teacher_dir, "--data", text_data, "--output", str(cache), "--topk", "32",
                       "--encoding", "compact", "--dtype", "float32", "--max-seq-length", "64",
                       "--no-progress"]) == 0
    with pytest.raises(ValueError, match="kd_loss.*mass threshold.*--encoding naive"):
        train_losses(tmp_path / "run", tiny_teacher_dir, text_data, "--teacher_source", "cached",
                     "--teacher_cache", str(cache), *kd)


def test_verify_modes_check_what_they_promise(cache_copy):
    """full hashes the shards (finds a flipped byte); manifest checks sizes only (does not read the data, so the
    flipped byte passes, a truncated shard does not); the config key reaches the source."""
    from training.trainers.distillation_config import DistillationConfig
    from training.teachers import build_teacher_source

    path = os.path.join(cache_copy, shard_name(1))
    data = bytearray(open(path, "rb").read())
    data[-7] ^= 0x55
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=f"{path} is corrupted"):
        CachedTeacher(str(cache_copy), verify="full")
    assert len(CachedTeacher(str(cache_copy), verify="manifest")) == 24
    assert len(CachedTeacher(str(cache_copy), verify="none")) == 24

    def config(mode):
        return DistillationConfig(output_dir=str(cache_copy) + "-out", teacher_source="cached",
                                  teacher_cache=str(cache_copy), teacher_topk=16, student="350M", report_to="none",
                                  teacher_cache_verify=mode)

    with pytest.raises(ValueError, match="is corrupted"):
        build_teacher_source(config("full"))
    assert len(build_teacher_source(config("manifest"))) == 24
    with pytest.raises(ValueError, match="teacher_cache_verify.*'sha256' is not one of"):
        config("sha256")
    with open(path, "ab") as handle:  # now one byte longer than the manifest says
        handle.write(b"\0")
    with pytest.raises(ValueError, match=f"{path} is truncated or was replaced"):
        build_teacher_source(config("manifest"))


def test_eval_data_is_checked_against_the_cache_at_start(tmp_path, sharp_teacher_dir, text_data, monkeypatch):
    """A cache made from the training data only cannot answer the evaluation set: the run stops before the
    student is built or anything is written, naming the eval file, instead of at the first evaluation."""
    monkeypatch.setenv("HF_RETNET_DEBUG", "1")  # the exception itself, not the command's one-line report of it
    cache = tmp_path / "cache"
    assert cache_main(["--teacher", sharp_teacher_dir, "--data", text_data, "--output", str(cache), "--topk", "32",
                       "--dtype", "float32", "--max-seq-length", "64", "--no-progress"]) == 0
    eval_data = tmp_path / "heldout.jsonl"
    eval_data.write_text(json.dumps({"text": "held-out words the cache never saw"}) + "\n")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=f"{eval_data}.*is not data the cache was made from"):
        train_losses(out, sharp_teacher_dir, text_data, "--teacher_source", "cached", "--teacher_cache", str(cache),
                     "--eval_data", str(eval_data), "--eval_strategy", "steps", "--eval_steps", "2")
    assert not out.exists()

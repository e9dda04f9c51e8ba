"""The producer CLI: caches equal the teacher's answers, reruns resume to byte-identical folders (also after
kill -9), `accelerate launch` writes the same cache, and bad input fails clearly."""

import filecmp
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from training.teachers.cache.format import MANIFEST_NAME, open_shard, read_manifest, sequence_key, shard_name
from training.teachers.cache.build import main, plan_shards
from training.teachers.cached import CachedTeacher
from training.teachers.direct import DirectTeacher
from tests.tiny_models import default_texts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           PYTHONPATH=REPO, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def token_data(tmp_path_factory, tiny_tokenizer):
    """A Parquet file with an input_ids column: 60 tokenized sentences of different lengths."""
    path = str(tmp_path_factory.mktemp("cache-data") / "train.parquet")
    ids = [tiny_tokenizer(t)["input_ids"] for t in default_texts(60)]
    pq.write_table(pa.table({"input_ids": ids}), path)
    return path, ids


def cache_args(teacher, data, out, *extra):
    return ["--teacher", teacher, "--data", data, "--output", str(out), "--topk", "16", "--dtype", "float32",
            "--shard-tokens", "200", "--batch-size", "4", "--no-progress", *extra]


def padded(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


def same_folder(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert mismatch == [] and errors == [], f"files differ: {mismatch} {errors}"


def test_help_lists_the_options():
    out = subprocess.run([sys.executable, "-m", "training.cache_teacher_logits", "--help"], capture_output=True,
                         text=True, env=ENV, cwd=REPO, timeout=120)
    assert out.returncode == 0
    for option in ("--teacher", "--adapter", "--data", "--output", "--topk", "--temperature", "--batch-size",
                   "--encoding", "--teacher-url"):
        assert option in out.stdout


def test_plan_shards_cuts_by_tokens():
    assert plan_shards(np.array([5, 5, 5, 5, 5]), 10) == [(0, 2), (2, 4), (4, 5)]
    assert plan_shards(np.array([50, 1]), 10) == [(0, 1), (1, 2)]


@pytest.mark.parametrize("encoding", ["naive", "compact"])
def test_cache_matches_direct_teacher(tmp_path, tiny_teacher_dir, token_data, encoding):
    data, ids = token_data
    assert main(cache_args(tiny_teacher_dir, data, tmp_path, "--encoding", encoding)) == 0
    manifest = read_manifest(str(tmp_path))
    assert manifest["topk"] == 16 and manifest["encoding"]["name"] == encoding
    assert manifest["totals"]["num_sequences"] == 60 and manifest["totals"]["num_tokens"] == sum(map(len, ids))
    assert len(manifest["shards"]) > 3 and all(len(s["sha256"]) == 64 for s in manifest["shards"])
    cached = CachedTeacher(str(tmp_path), topk=16)
    direct = DirectTeacher(tiny_teacher_dir, dtype="float32")
    rows = [ids[7], ids[0], ids[59], ids[31]]  # across shards, in another order and batch than when cached
    x, mask = padded(rows)
    got = cached.topk(x, mask, 16).validate(4, x.shape[1], 16)
    want = direct.topk(x, mask, 16)
    real = mask.bool()[..., None].expand_as(got.logprobs)
    kept = real & torch.isfinite(got.logprobs)
    if encoding == "naive":  # every entry, in the teacher's order, log-probs rounded to fp16
        assert bool(kept.eq(real).all())
        assert torch.equal(got.token_ids[kept], want.token_ids[kept])
        torch.testing.assert_close(got.logprobs[kept], want.logprobs[kept], atol=2e-3, rtol=0)
    else:  # the teacher's top-m ids (m per position), each with its own log-prob within a quantization step
        full = torch.log_softmax(direct.logits(x, mask).float(), -1)  # [B, T, V]
        torch.testing.assert_close(full.gather(-1, got.token_ids)[kept], got.logprobs[kept], atol=0.2, rtol=0)
        m = kept.sum(-1)  # [B, T]
        for b, t in zip(*torch.nonzero(mask, as_tuple=True)):
            n = int(m[b, t])
            assert set(got.token_ids[b, t, :n].tolist()) == set(want.token_ids[b, t, :n].tolist())
            assert len(set(got.token_ids[b, t].tolist())) == 16
    # a smaller k is the prefix of the answer
    small = cached.topk(x, mask, 4)
    finite = torch.isfinite(small.logprobs)
    assert torch.equal(small.token_ids[finite], got.token_ids[..., :4][finite])


def test_kill_9_then_rerun_is_byte_identical(tmp_path, tiny_teacher_dir, token_data):
    data, _ = token_data
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    args = cache_args(tiny_teacher_dir, data, reference, "--shard-tokens", "30", "--batch-size", "1")
    assert main(args) == 0
    total = len(read_manifest(str(reference))["shards"])
    assert total >= 20

    cmd = [sys.executable, "-m", "training.cache_teacher_logits",
           *cache_args(tiny_teacher_dir, data, crashed, "--shard-tokens", "30", "--batch-size", "1")]
    for attempt in range(3):  # kill while shards are being written (retry if the run finished first)
        proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            done = [n for n in os.listdir(crashed) if n.startswith("shard-")] if crashed.exists() else []
            if len(done) >= 3 + attempt * 3:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            break
    assert proc.returncode == -signal.SIGKILL, "the producer finished before it could be killed"
    assert not (crashed / MANIFEST_NAME).exists()
    finished = sorted(n for n in os.listdir(crashed) if n.startswith("shard-"))
    assert 0 < len(finished) < total
    with pytest.raises(FileNotFoundError, match="incomplete"):
        CachedTeacher(str(crashed))
    before = {n: os.stat(crashed / n).st_mtime_ns for n in finished}

    rerun = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert {n: os.stat(crashed / n).st_mtime_ns for n in finished} == before  # finished shards were skipped
    same_folder(reference, crashed)  # no temp files left, every byte equal


def test_rerun_of_a_finished_cache_changes_nothing_and_other_settings_are_refused(tmp_path, tiny_teacher_dir,
                                                                                   token_data):
    data, _ = token_data
    out = tmp_path / "cache"
    assert main(cache_args(tiny_teacher_dir, data, out)) == 0
    stamp = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if n.startswith("shard-")}
    assert main(cache_args(tiny_teacher_dir, data, out)) == 0
    assert {n: os.stat(out / n).st_mtime_ns for n in stamp} == stamp
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_RETNET_DEBUG", "1")  # the exception itself, not the command's one-line report of it
        with pytest.raises(ValueError, match=r"shard-00000\.safetensors was made with other settings"):
            main(cache_args(tiny_teacher_dir, data, out, "--temperature", "2.0"))


def test_a_missing_shard_is_rebuilt_by_a_rerun(tmp_path, tiny_teacher_dir, token_data):
    data, _ = token_data
    out = tmp_path / "cache"
    assert main(cache_args(tiny_teacher_dir, data, out)) == 0
    original = (out / shard_name(2)).read_bytes()
    os.remove(out / shard_name(2))
    with pytest.raises(FileNotFoundError, match=r"shard-00002\.safetensors"):
        CachedTeacher(str(out))
    assert main(cache_args(tiny_teacher_dir, data, out)) == 0
    assert (out / shard_name(2)).read_bytes() == original


@pytest.mark.slow
def test_accelerate_launch_two_processes_writes_the_same_cache(tmp_path, tiny_teacher_dir, token_data):
    data, _ = token_data
    single, multi = tmp_path / "single", tmp_path / "multi"
    env = dict(ENV)
    assert subprocess.run([sys.executable, "-m", "training.cache_teacher_logits",
                           *cache_args(tiny_teacher_dir, data, single)], env=env, cwd=REPO, timeout=300,
                          capture_output=True).returncode == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "training.cache_teacher_logits", *cache_args(tiny_teacher_dir, data, multi)]
    out = subprocess.run(launch, env=env, cwd=REPO, timeout=300, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    same_folder(single, multi)


def test_a_teacher_server_as_producer_gives_the_same_cache(tmp_path, tiny_teacher_dir, token_data):
    """--teacher-url: a real `training.serve_teacher` subprocess on 127.0.0.1 produces the cache."""
    from tests.servers import ServerProcess

    data, ids = token_data
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert main(cache_args(tiny_teacher_dir, data, local, "--encoding", "naive")) == 0
    with ServerProcess(["--model", tiny_teacher_dir, "--dtype", "float32", "--device", "cpu"],
                       log_path=str(tmp_path / "server.log"), env={"OMP_NUM_THREADS": "1"}) as server:
        args = cache_args(tiny_teacher_dir, data, remote, "--encoding", "naive")
        args[args.index("--teacher")] = "--tokenizer"  # no local teacher: the server is the producer
        assert main(args + ["--teacher-url", server.url]) == 0
    manifest = read_manifest(str(remote))
    assert manifest["teacher"]["url"] == server.url and manifest["totals"]["num_sequences"] == len(ids)
    x, mask = padded([ids[1], ids[40]])
    a = CachedTeacher(str(local)).topk(x, mask, 16)
    b = CachedTeacher(str(remote)).topk(x, mask, 16)
    assert torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=2e-3, rtol=0)


def test_keys_are_the_hash_of_each_sequence(tmp_path, tiny_teacher_dir, token_data):
    data, ids = token_data
    assert main(cache_args(tiny_teacher_dir, data, tmp_path, "--max-seq-length", "8")) == 0
    arrays, _ = open_shard(str(tmp_path / shard_name(0)))
    assert bytes(arrays["keys"][0]) == sequence_key(ids[0][:8])
    assert int(arrays["lengths"][0]) == min(8, len(ids[0]))


@pytest.mark.parametrize("problem,exc,match", [
    ("missing", (FileNotFoundError, ValueError), "nope.parquet"),
    ("no_input_ids", ValueError, "training.data|input_ids|record"),
    ("bad_topk", ValueError, "--topk"),
    ("bad_encoding", ValueError, "unknown cache encoding"),
])
def test_bad_input_is_refused(tmp_path, tiny_teacher_dir, token_data, problem, exc, match, monkeypatch):
    monkeypatch.setenv("HF_RETNET_DEBUG", "1")  # the exception itself, not the command's one-line report of it
    data, _ = token_data
    args = cache_args(tiny_teacher_dir, data, tmp_path / "out")
    if problem == "missing":
        args[args.index("--data") + 1] = str(tmp_path / "nope.parquet")
    elif problem == "no_input_ids":
        other = tmp_path / "other.parquet"
        pq.write_table(pa.table({"tokens": [[1, 2, 3]]}), str(other))
        args[args.index("--data") + 1] = str(other)
    elif problem == "bad_topk":
        args[args.index("--topk") + 1] = "100000"
    else:
        args += ["--encoding", "zip"]
    with pytest.raises(exc, match=match):
        main(args)

"""The `TeacherSource` base class the three sources share (declared capabilities and their defaults), the
`Prefetcher` behind the cached and network sources' `prefetch`, the padding stand-in, and the trainer's refusal of
a teacher that is not a TeacherSource."""

from __future__ import annotations

import math
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hf_retnet import RetNetConfig, RetNetForCausalLM
from tests.tiny_models import default_texts
from training.teachers import DirectTeacher, TeacherSource
from training.teachers.base import padding_answer
from training.teachers.cache.build import main as cache_main
from training.teachers.cached import CachedTeacher
from training.teachers.network import NetworkTeacher
from training.teachers.prefetch import Prefetcher
from training.trainers.distillation_config import DistillationConfig
from training.trainers.distillation_trainer import DistillationTrainer

from .test_network_teacher import ThreadServer

# ---------------------------------------------------------------- Prefetcher


def test_prefetcher_gives_back_what_was_submitted_and_none_otherwise():
    prefetcher = Prefetcher(workers=2, max_pending=4, name="test-prefetch")
    try:
        prefetcher.submit("a", pow, 2, 10)
        prefetcher.submit("b", pow, 3, 2)
        assert len(prefetcher) == 2
        assert prefetcher.take("b") == 9 and prefetcher.take("a") == 1024
        assert prefetcher.take("a") is None  # taken once
        assert prefetcher.take("never submitted") is None
    finally:
        prefetcher.close()


def test_prefetcher_resubmitting_a_pending_key_runs_nothing_new():
    calls = []
    prefetcher = Prefetcher(workers=1, max_pending=4, name="test-prefetch")
    try:
        prefetcher.submit("a", calls.append, 1)
        prefetcher.submit("a", calls.append, 2)
        assert prefetcher.take("a") is None and calls == [1]  # list.append returns None
    finally:
        prefetcher.close()


def test_prefetcher_forgets_the_oldest_over_its_bound():
    gate = threading.Event()
    prefetcher = Prefetcher(workers=1, max_pending=2, name="test-prefetch")
    try:
        prefetcher.submit("blocker", gate.wait, 30)  # holds the only worker
        prefetcher.submit("first", str, 1)
        prefetcher.submit("second", str, 2)  # three pending: "blocker" is forgotten
        assert len(prefetcher) == 2 and prefetcher.take("blocker") is None
        gate.set()
        assert prefetcher.take("first") == "1" and prefetcher.take("second") == "2"
    finally:
        gate.set()
        prefetcher.close()


def test_prefetcher_raises_the_background_error_at_take():
    prefetcher = Prefetcher(workers=1, max_pending=2, name="test-prefetch")
    try:
        prefetcher.submit("bad", int, "not a number")
        with pytest.raises(ValueError, match="not a number"):
            prefetcher.take("bad")
        assert len(prefetcher) == 0
    finally:
        prefetcher.close()


def test_prefetcher_close_cancels_what_waits_and_can_be_called_twice():
    gate, ran = threading.Event(), []
    prefetcher = Prefetcher(workers=1, max_pending=4, name="test-prefetch")
    prefetcher.submit("blocker", gate.wait, 30)
    prefetcher.submit("queued", ran.append, "queued")
    closer = threading.Thread(target=prefetcher.close)
    closer.start()
    deadline = time.monotonic() + 30
    while len(prefetcher):  # close() cancels "queued" and forgets both before it waits for "blocker"
        assert time.monotonic() < deadline, "close() did not drop the pending calls"
        time.sleep(0.01)
    gate.set()  # let the running call end so that close() can join the worker
    closer.join(30)
    assert not closer.is_alive() and len(prefetcher) == 0 and ran == []
    prefetcher.close()  # nothing left to stop
    prefetcher.submit("again", str, 3)  # a closed prefetcher starts new threads on demand
    assert prefetcher.take("again") == "3"
    prefetcher.close()


@pytest.mark.parametrize("workers,max_pending", [(0, 1), (1, 0)])
def test_prefetcher_refuses_no_workers_or_no_room(workers, max_pending):
    with pytest.raises(ValueError, match="workers >= 1 and max_pending >= 1"):
        Prefetcher(workers=workers, max_pending=max_pending, name="test-prefetch")


# ---------------------------------------------------------------- padding stand-in


def test_padding_answer_fills_only_padding_with_the_uniform_stand_in():
    real = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = padding_answer(real, k=4)
    assert out.token_ids.shape == (2, 3, 4) and out.token_ids.dtype == torch.int64
    assert out.logprobs.dtype == torch.float32
    for b, t in ((0, 2), (1, 0)):
        assert out.token_ids[b, t].tolist() == [0, 1, 2, 3]
        torch.testing.assert_close(out.logprobs[b, t], torch.full((4,), -math.log(4)))
        assert math.isclose(out.logprobs[b, t].exp().sum().item(), 1.0, rel_tol=1e-6)


# ---------------------------------------------------------------- the three sources


@pytest.fixture(scope="module")
def direct(tiny_teacher_dir):
    return DirectTeacher(tiny_teacher_dir)


@pytest.fixture(scope="module")
def rows(tiny_tokenizer):
    return [tiny_tokenizer(t)["input_ids"] for t in default_texts(6)]


def build_cache(folder, teacher_dir, rows, encoding: str) -> str:
    data = str(folder / "data.parquet")
    pq.write_table(pa.table({"input_ids": rows}), data)
    out = str(folder / "cache")
    assert cache_main(["--teacher", teacher_dir, "--data", data, "--output", out, "--topk", "8",
                       "--encoding", encoding, "--dtype", "float32", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_teacher_dir, rows):
    return build_cache(tmp_path_factory.mktemp("naive-cache"), tiny_teacher_dir, rows, "naive")


def as_batch(row: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([row])
    return ids, torch.ones_like(ids)


def test_direct_teacher_declares_its_capabilities(tiny_teacher_dir, direct):
    assert isinstance(direct, TeacherSource)
    assert direct.vocab_size == direct.model.config.vocab_size
    assert direct.drops_entries is False and direct.return_full_logits is False and direct.encoding is None
    assert direct.can_prefetch is False  # the inherited no-op: the trainer does not look ahead for it
    assert DirectTeacher(direct.model, return_full_logits=True).return_full_logits is True
    assert direct.prefetch(torch.zeros(1, 3, dtype=torch.long), None, 4) is None
    direct.close()  # the inherited no-op
    assert direct.topk(torch.zeros(1, 3, dtype=torch.long), None, 4).token_ids.shape == (1, 3, 4)


def test_cached_teacher_declares_its_capabilities_and_prefetches(cache_dir, direct, rows):
    teacher = CachedTeacher(cache_dir)
    assert isinstance(teacher, TeacherSource) and teacher.can_prefetch
    assert teacher.vocab_size == direct.vocab_size and teacher.return_full_logits is False
    assert teacher.drops_entries is False and teacher.encoding.name == "naive"
    ids, mask = as_batch(rows[2])
    teacher.prefetch(ids, mask, 8)
    assert len(teacher._prefetcher) == 1
    prefetched = teacher.topk(ids, mask, 8)
    assert len(teacher._prefetcher) == 0
    torch.testing.assert_close(prefetched.token_ids, teacher.topk(ids, mask, 8).token_ids, rtol=0, atol=0)
    unknown = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    teacher.prefetch(unknown, None, 8)  # not in the cache: the lookup error comes from topk
    with pytest.raises(ValueError, match="is not in the teacher cache"):
        teacher.topk(unknown, None, 8)
    teacher.close()
    teacher.close()
    torch.testing.assert_close(teacher.topk(ids, mask, 8).logprobs, prefetched.logprobs, rtol=0, atol=0)


def test_a_cache_that_dropped_entries_says_so_and_the_trainer_refuses_reverse_kl(tmp_path, tiny_teacher_dir, rows):
    teacher = CachedTeacher(build_cache(tmp_path, tiny_teacher_dir, rows, "compact:mass=0.5"))
    assert teacher.drops_entries is True and teacher.encoding.name == "compact"
    with pytest.raises(ValueError, match="encoding 'compact' dropped top-k entries"):
        DistillationTrainer(model=tiny_student(teacher.vocab_size), teacher=teacher,
                            args=trainer_config(tmp_path, tiny_teacher_dir, kd_loss="reverse_kl"))


def test_network_teacher_declares_its_capabilities_and_prefetches(direct):
    from training.teachers.server.app import create_app
    from training.teachers.server.hf_engine import HFEngine

    ids = torch.randint(0, direct.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with ThreadServer(create_app(HFEngine(direct), model_name="tiny")) as peer:
        with NetworkTeacher(peer.url, retries=0) as teacher:
            assert isinstance(teacher, TeacherSource) and teacher.can_prefetch
            assert teacher.vocab_size == direct.vocab_size
            assert teacher.drops_entries is False and teacher.return_full_logits is False
            assert teacher.encoding is None
            teacher.prefetch(ids, None, 4)
            out = teacher.topk(ids, None, 4)
            assert len(teacher._prefetcher) == 0
            torch.testing.assert_close(out.token_ids, direct.topk(ids, None, 4).token_ids, rtol=0, atol=0)
            too_large = direct.vocab_size + 1
            teacher.prefetch(ids, None, too_large)  # refused in the background: the error comes from topk
            with pytest.raises(ValueError, match=f"teacher_topk={too_large} must be in"):
                teacher.topk(ids, None, too_large)


# ---------------------------------------------------------------- the trainer


def tiny_student(vocab_size: int):
    torch.manual_seed(0)
    return RetNetForCausalLM(RetNetConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_heads=2,
                                          intermediate_size=64, chunk_size=16))


def trainer_config(tmp_path, teacher_dir, **overrides) -> DistillationConfig:
    values = dict(output_dir=str(tmp_path / "out"), teacher_model=teacher_dir, student="350M", teacher_topk=8,
                  max_steps=1, report_to="none", use_cpu=True, save_strategy="no")
    return DistillationConfig(**{**values, **overrides})


def test_the_trainer_refuses_a_teacher_that_is_not_a_teacher_source(tmp_path, tiny_teacher_dir, direct):
    class LooksLikeATeacher:  # the right methods, but not declared a TeacherSource
        vocab_size = direct.vocab_size

        def topk(self, input_ids, attention_mask, k, temperature=1.0, position_ids=None):
            return direct.topk(input_ids, attention_mask, k, temperature, position_ids)

    with pytest.raises(TypeError, match="is not a TeacherSource: subclass training.teachers.TeacherSource"):
        DistillationTrainer(model=tiny_student(direct.vocab_size), teacher=LooksLikeATeacher(),
                            args=trainer_config(tmp_path, tiny_teacher_dir))


def test_the_trainer_refuses_full_vocab_kd_from_a_source_without_full_logits(tmp_path, tiny_teacher_dir, direct):
    with pytest.raises(ValueError, match="does not return full logits"):
        DistillationTrainer(model=tiny_student(direct.vocab_size), teacher=direct,
                            args=trainer_config(tmp_path, tiny_teacher_dir, full_vocab_kd=True))

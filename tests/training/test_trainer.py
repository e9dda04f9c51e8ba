"""DistillationTrainer on CPU: tiny Llama teacher (real folder, DirectTeacher) + tiny RetNet student."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import transformers
from packaging.version import Version
import torch

from hf_retnet import RetNetConfig, RetNetForCausalLM
from training.trainers.distillation_config import DistillationConfig
from training.data.shards import PaddingCollator
from training.trainers.callbacks import SaddleEscapeCallback
from training.teachers import DirectTeacher, TeacherSource
from tests.tiny_models import default_texts, save_tiny_teacher
from training.trainers.distillation_trainer import DistillationTrainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def sharp_teacher_dir(tmp_path_factory):
    """A tiny Llama with a peaked (not near-uniform) next-token distribution, so KL to it is a real signal."""
    return save_tiny_teacher(tmp_path_factory.mktemp("sharp-teacher"), initializer_range=0.2)


@pytest.fixture(scope="module")
def tok(sharp_teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sharp_teacher_dir)


def make_items(tok, texts, max_len=40):
    """Variable-length items with the data contract's shape; the first two tokens of each are not trained."""
    items = []
    for text in texts:
        ids = tok(text)["input_ids"][:max_len]
        items.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return items


def collate(pad_id):
    return PaddingCollator(pad_id)


def tiny_student(vocab_size, seed=0):
    torch.manual_seed(seed)
    return RetNetForCausalLM(RetNetConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_heads=4, intermediate_size=128, chunk_size=16
    ))


def make_config(out, teacher_dir, **overrides):
    values = dict(
        output_dir=str(out), teacher_model=teacher_dir, student="350M", teacher_topk=64, distill_alpha=0.5,
        per_device_train_batch_size=4, max_steps=4, learning_rate=3e-3, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        train_sampling_strategy="sequential", dataloader_num_workers=0,
    )
    values.update(overrides)
    return DistillationConfig(**values)


def make_trainer(config, tok, items, teacher=None, student=None, **kwargs):
    student = student if student is not None else tiny_student(len(tok))
    return DistillationTrainer(
        model=student, args=config, teacher=teacher, train_dataset=items,
        data_collator=collate(tok.pad_token_id), **kwargs,
    )


def step_losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@torch.no_grad()
def heldout_kl(student, teacher_model, batches):
    """Token-mean full-vocabulary KL(teacher || student) over trained positions."""
    total, count = 0.0, 0
    student.eval()
    for batch in batches:
        keep = (batch["labels"][:, 1:] != -100) & batch["attention_mask"][:, 1:].bool()
        t = torch.log_softmax(teacher_model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
        s = torch.log_softmax(student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
        t, s = t[:, :-1][keep], s[:, :-1][keep]
        total += (t.exp() * (t - s)).sum().item()
        count += int(keep.sum())
    return total / count


def test_direct_run_lowers_heldout_kl(tmp_path, sharp_teacher_dir, tok):
    texts = default_texts(200)
    train, heldout = make_items(tok, texts[:160]), make_items(tok, texts[160:])
    fn = collate(tok.pad_token_id)
    held_batches = [fn(heldout[i:i + 8]) for i in range(0, len(heldout), 8)]
    config = make_config(tmp_path / "run", sharp_teacher_dir, max_steps=30, optim="muon", distill_alpha=0.1,
                         train_sampling_strategy="random", logging_steps=10)
    trainer = make_trainer(config, tok, train)
    teacher_model = trainer.teacher.model
    before = heldout_kl(trainer.model, teacher_model, held_batches)
    trainer.train()
    after = heldout_kl(trainer.model, teacher_model, held_batches)
    print(f"held-out KL(teacher || student): {before:.3f} -> {after:.3f}")
    assert after < 0.85 * before
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("loss/ce", "loss/kd", "loss/diversity", "alpha", "temperature", "teacher_seconds",
                "nonfinite/skipped_steps", "throughput/tokens_per_second", "memory/host_rss_gib"):
        assert key in logs[-1], key
    # the Trainer's loss is alpha * CE + (1 - alpha) * KD, averaged over the same window
    assert logs[-1]["loss"] == pytest.approx(0.1 * logs[-1]["loss/ce"] + 0.9 * logs[-1]["loss/kd"], rel=1e-4)


@pytest.mark.xfail(
    Version(transformers.__version__) < Version("5.24"), strict=True,
    reason="on transformers 5.2 the accumulated step's gradient comes out halved (grad_norm 0.90 vs 1.80), so "
    "clipping differs; found by make test-oldest, cause not yet found",
)
def test_gradient_accumulation_is_exact(tmp_path, sharp_teacher_dir, tok):
    """4 sequences of different lengths as one batch or as 2 x 2 micro-batches: same loss, same update."""
    items = make_items(tok, [t * (1 + i % 3) for i, t in enumerate(default_texts(16))], max_len=48)
    teacher = DirectTeacher(sharp_teacher_dir)
    runs = {}
    for name, (bs, ga) in {"one": (4, 1), "accumulated": (2, 2)}.items():
        config = make_config(tmp_path / name, sharp_teacher_dir, per_device_train_batch_size=bs,
                             gradient_accumulation_steps=ga, max_steps=2, optim="sgd", learning_rate=0.5)
        trainer = make_trainer(config, tok, items, teacher=teacher)
        trainer.train()
        norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
        runs[name] = (step_losses(trainer), norms, [p.detach().clone() for p in trainer.model.parameters()])
    (loss_one, norm_one, params_one), (loss_acc, norm_acc, params_acc) = runs["one"], runs["accumulated"]
    assert loss_one[1] == pytest.approx(loss_acc[1], rel=1e-5)
    assert loss_one[2] == pytest.approx(loss_acc[2], rel=1e-5)
    assert norm_one == pytest.approx(norm_acc, rel=1e-5)
    for a, b in zip(params_one, params_acc):  # SGD: the update is the gradient, so equal params = equal gradients
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_alpha_temperature_schedules_are_logged(tmp_path, sharp_teacher_dir, tok):
    config = make_config(tmp_path / "sched", sharp_teacher_dir, max_steps=4, distill_alpha=0.5,
                         distill_alpha_start=0.9, alpha_schedule_steps=4, temperature=1.0, temperature_start=2.0,
                         temperature_schedule_steps=2)
    trainer = make_trainer(config, tok, make_items(tok, default_texts(16)))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # each log shows the values its step trained with: step s (1-based) uses the schedule at s - 1
    assert [round(h["alpha"], 6) for h in logs] == [0.9, 0.8, 0.7, 0.6]
    assert [h["temperature"] for h in logs] == [2.0, 1.5, 1.0, 1.0]


def first_loss(tmp_path, name, teacher_dir, tok, teacher, **overrides):
    config = make_config(tmp_path / name, teacher_dir, max_steps=1, **overrides)
    trainer = make_trainer(config, tok, make_items(tok, default_texts(8)), teacher=teacher)
    trainer.train()
    return step_losses(trainer)[1]


def test_reverse_kl_warmup_uses_reverse_kl_first(tmp_path, sharp_teacher_dir, tok):
    teacher = DirectTeacher(sharp_teacher_dir)
    warm = first_loss(tmp_path, "warm", sharp_teacher_dir, tok, teacher, kd_loss="forward_kl",
                      reverse_kl_warmup_steps=1)
    reverse = first_loss(tmp_path, "rev", sharp_teacher_dir, tok, teacher, kd_loss="reverse_kl")
    forward = first_loss(tmp_path, "fwd", sharp_teacher_dir, tok, teacher, kd_loss="forward_kl")
    assert warm == pytest.approx(reverse, rel=1e-6)
    assert abs(warm - forward) > 1e-3


def test_full_vocab_kd_in_direct_mode(tmp_path, sharp_teacher_dir, tok):
    """With k = V the sparse loss is the full-vocabulary loss, so both modes give the same first step."""
    vocab = len(tok)
    sparse = first_loss(tmp_path, "sparse", sharp_teacher_dir, tok, DirectTeacher(sharp_teacher_dir),
                        teacher_topk=vocab)
    full = first_loss(tmp_path, "full", sharp_teacher_dir, tok,
                      DirectTeacher(sharp_teacher_dir, return_full_logits=True), teacher_topk=vocab,
                      full_vocab_kd=True)
    assert sparse == pytest.approx(full, rel=1e-4)


class RecordingTeacher(TeacherSource):
    """A real DirectTeacher with a prefetch() that records the order of prefetch and topk calls."""

    def __init__(self, inner):
        self.inner, self.vocab_size, self.events = inner, inner.vocab_size, []

    def prefetch(self, input_ids, attention_mask, k, temperature=1.0):
        self.events.append(("prefetch", input_ids.clone()))

    def topk(self, input_ids, attention_mask, k, temperature=1.0):
        self.events.append(("topk", input_ids.clone()))
        return self.inner.topk(input_ids, attention_mask, k, temperature)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_prefetch_runs_one_batch_ahead(tmp_path, sharp_teacher_dir, tok, accumulation):
    teacher = RecordingTeacher(DirectTeacher(sharp_teacher_dir))
    config = make_config(tmp_path / "pf", sharp_teacher_dir, per_device_train_batch_size=2,
                         gradient_accumulation_steps=accumulation, max_steps=3)
    make_trainer(config, tok, make_items(tok, default_texts(40)), teacher=teacher).train()
    kinds = [kind for kind, _ in teacher.events]
    topks = [ids for kind, ids in teacher.events if kind == "topk"]
    prefetches = [ids for kind, ids in teacher.events if kind == "prefetch"]
    assert len(topks) == 3 * accumulation
    # every batch was prefetched before the teacher was asked for it, and the next one right after
    assert kinds[:2] == ["prefetch", "topk"]
    for i, ids in enumerate(topks):
        assert torch.equal(prefetches[i], ids)
    assert kinds[2::2] == ["prefetch"] * (len(kinds[2::2]))


def test_vocabulary_mismatch_is_a_clear_error(tmp_path, sharp_teacher_dir, tok):
    out = tmp_path / "never-written"
    config = make_config(out, sharp_teacher_dir)
    with pytest.raises(ValueError, match=r"teacher vocabulary \(\d+ tokens\) and student vocabulary \(300\)"):
        make_trainer(config, tok, make_items(tok, default_texts(8)), student=tiny_student(300))
    assert not out.exists()


def test_topk_larger_than_vocabulary_is_a_clear_error(tmp_path, sharp_teacher_dir, tok):
    out = tmp_path / "never-written"
    config = make_config(out, sharp_teacher_dir, teacher_topk=len(tok) + 1)
    with pytest.raises(ValueError, match="teacher_topk"):
        make_trainer(config, tok, make_items(tok, default_texts(8)))
    assert not out.exists()


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from transformers import AutoTokenizer, TrainerCallback
    from tests.tiny_models import default_texts
    import test_trainer as t

    class KillAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                os.kill(os.getpid(), signal.SIGKILL)  # a real crash: no cleanup, no final save

    tok = AutoTokenizer.from_pretrained({teacher!r})
    config = t.make_config({out!r}, {teacher!r}, **{config!r})
    t.make_trainer(config, tok, t.make_items(tok, default_texts(48)), callbacks=[KillAfter()]).train()
""")


def test_kill_and_resume_continues_with_the_same_losses(tmp_path, sharp_teacher_dir, tok):
    settings = dict(max_steps=6, save_strategy="steps", save_steps=3, optim="muon",
                    train_sampling_strategy="random", lr_scheduler_type="linear")
    items = make_items(tok, default_texts(48))
    whole = make_trainer(make_config(tmp_path / "whole", sharp_teacher_dir, **settings), tok, items)
    whole.train()
    expected = step_losses(whole)

    out = tmp_path / "killed"
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN.format(tests=os.path.dirname(__file__), teacher=sharp_teacher_dir, out=str(out),
                                        config=settings))
    env = dict(os.environ, PYTHONPATH=REPO, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    checkpoint = out / "checkpoint-3"
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert set(optimizer_state) == {"muon", "adamw"} and optimizer_state["muon"]["state"], "Muon state not saved"
    assert not (out / "checkpoint-6").exists()

    resumed = make_trainer(make_config(out, sharp_teacher_dir, **settings), tok, items)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = step_losses(resumed)  # steps 1-3 come back from the checkpoint's trainer_state.json
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got, expected)


def test_resumed_run_logs_the_same_distillation_terms(tmp_path, sharp_teacher_dir, tok):
    """loss/ce, loss/kd, loss/diversity after --resume_from_checkpoint are the uninterrupted run's (the first
    window after a resume used to be divided by the whole step count: ce 2.0 logged as 2.0 / 3)."""
    settings = dict(max_steps=5, save_strategy="steps", save_steps=3, diversity_weight=0.1)
    items = make_items(tok, default_texts(40))
    whole = make_trainer(make_config(tmp_path / "whole", sharp_teacher_dir, **settings), tok, items)
    whole.train()
    out = tmp_path / "resumed"
    make_trainer(make_config(out, sharp_teacher_dir, **dict(settings, max_steps=3)), tok, items).train()
    resumed = make_trainer(make_config(out, sharp_teacher_dir, **settings), tok, items)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))

    def terms(trainer):
        return {h["step"]: (h["loss/ce"], h["loss/kd"], h["loss/diversity"])
                for h in trainer.state.log_history if "loss/ce" in h}

    expected, got = terms(whole), terms(resumed)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in (4, 5):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got[step], expected[step])
        assert got[step][0] > 1.0  # a real cross-entropy, not a fraction of it


def test_eval_metrics_are_token_means_over_the_set(tmp_path, sharp_teacher_dir, tok):
    """Batches of very different token counts: every eval metric is a token mean over the whole set, so
    eval_loss = alpha * eval_ce + (1 - alpha) * eval_kd, and each equals the same mean computed by hand."""
    from training.trainers.losses import distillation_loss

    texts = default_texts(24)[16:]
    # batches of 2: three of two short rows, then one long row alone (unequal tokens and rows per batch)
    eval_items = make_items(tok, texts[1:7], max_len=5) + make_items(tok, texts[:1], max_len=40)
    config = make_config(tmp_path / "ev", sharp_teacher_dir, max_steps=1, per_device_eval_batch_size=2,
                         distill_alpha=0.3, diversity_weight=0.2)
    trainer = make_trainer(config, tok, make_items(tok, default_texts(8)), eval_dataset=eval_items)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(
        0.3 * metrics["eval_ce"] + 0.7 * metrics["eval_kd"] + 0.2 * metrics["eval_diversity"], rel=1e-5)
    assert json.dumps(metrics)  # plain floats, loggable

    # the same token means by hand, over all eval tokens at once
    batch = collate(tok.pad_token_id)(eval_items)
    keep = DistillationTrainer.trained_positions(batch["labels"], batch["attention_mask"])
    teacher = trainer.teacher.topk(batch["input_ids"], batch["attention_mask"], 64)
    student = trainer.model.eval()
    with torch.no_grad():
        hidden = student.model(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        out = distillation_loss(hidden[:, :-1][keep], student.lm_head, batch["labels"][:, 1:][keep],
                                teacher.token_ids[:, :-1][keep], teacher.logprobs[:, :-1][keep], alpha=0.3,
                                temperature=1.0, kind="forward_kl", diversity_weight=0.2)
    assert metrics["eval_ce"] == pytest.approx(float(out.ce), rel=1e-4)
    assert metrics["eval_kd"] == pytest.approx(float(out.kd), rel=1e-4)
    assert metrics["eval_diversity"] == pytest.approx(float(out.diversity), rel=1e-4, abs=1e-6)
    assert metrics["eval_loss"] == pytest.approx(float(out.loss), rel=1e-4)


@pytest.mark.parametrize("kd_loss,full_vocab", [("forward_kl", False), ("reverse_kl", False), ("forward_kl", True)])
def test_periodic_eval_logs_ppl_kl_top1(tmp_path, sharp_teacher_dir, tok, kd_loss, full_vocab):
    """eval_steps logs eval_ppl = exp(eval_ce), eval_kl = token-mean KL(teacher || student) and eval_top1; with
    k = V (or full-vocab mode) both equal the full-vocabulary values computed by hand on the same tokens, whatever
    divergence the run trains with."""
    vocab = len(tok)
    eval_items = make_items(tok, default_texts(30)[20:])
    config = make_config(tmp_path / "pe", sharp_teacher_dir, max_steps=4, eval_strategy="steps", eval_steps=2,
                         per_device_eval_batch_size=4, teacher_topk=vocab, kd_loss=kd_loss,
                         full_vocab_kd=full_vocab)
    teacher = DirectTeacher(sharp_teacher_dir, return_full_logits=full_vocab)
    trainer = make_trainer(config, tok, make_items(tok, default_texts(16)), teacher=teacher,
                           eval_dataset=eval_items)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    for h in evals:
        assert h["eval_ppl"] == pytest.approx(math.exp(h["eval_ce"]), rel=1e-6)
        assert 0.0 <= h["eval_top1"] <= 1.0 and h["eval_kl"] > 0
    assert evals[1]["eval_kl"] < evals[0]["eval_kl"]  # the student moves towards the teacher

    batch = collate(tok.pad_token_id)(eval_items)
    keep = DistillationTrainer.trained_positions(batch["labels"], batch["attention_mask"])
    with torch.no_grad():
        t = torch.log_softmax(teacher.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
        s = torch.log_softmax(trainer.model.eval()(batch["input_ids"],
                                                  attention_mask=batch["attention_mask"]).logits, -1)
    t, s = t[:, :-1][keep].double(), s[:, :-1][keep].double()
    kl = float((t.exp() * (t - s)).sum(-1).mean())
    top1 = float((t.argmax(-1) == s.argmax(-1)).double().mean())
    assert evals[1]["eval_kl"] == pytest.approx(kl, rel=1e-3)
    assert evals[1]["eval_top1"] == pytest.approx(top1, abs=1e-9)


def test_saddle_escape_from_the_config_boosts_and_restores_the_lr(tmp_path, sharp_teacher_dir, tok):
    """A learning rate too small to move the loss is a plateau: the callback named in the config boosts the LR,
    logs the saddle keys, and afterwards the logged LR is the scheduler's again, exactly."""
    saddle = {"window": 4, "min_steps": 4, "grad_norm_threshold": None, "boost_factor": 3.0, "boost_steps": 2,
              "judge_steps": 2, "cooldown_steps": 2, "min_relative_improvement": 0.5}
    config = make_config(tmp_path / "saddle", sharp_teacher_dir, max_steps=12, learning_rate=1e-9,
                         saddle_escape=True, saddle_escape_config=json.dumps(saddle))
    trainer = make_trainer(config, tok, make_items(tok, default_texts(64)))
    assert any(isinstance(cb, SaddleEscapeCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert max(h["saddle/detected"] for h in logs) >= 1
    boosted = [h for h in logs if h["saddle/intervention"] == 1.0]
    assert boosted and boosted[0]["saddle/factor"] == 3.0  # escalates on a repeated detection
    assert max(h["saddle/factor"] for h in boosted) == 3.0 * 1.5
    assert all(h["learning_rate"] == 1e-9 for h in logs)  # the scheduler's value, restored after every boost


def test_bad_saddle_escape_config_names_the_key(tmp_path, sharp_teacher_dir):
    with pytest.raises(ValueError, match="'saddle_escape_config'.*unknown keys \\['windw'\\]"):
        make_config(tmp_path / "bad", sharp_teacher_dir, saddle_escape=True, saddle_escape_config={"windw": 3})


@pytest.mark.parametrize("accumulation", [1, 2])
def test_group_by_length_batches_neighbours_and_sees_every_sequence(tmp_path, sharp_teacher_dir, tok, accumulation):
    """`train_sampling_strategy: group_by_length` over a shard folder: every sequence once per epoch, with far less
    padding than random batches (the lengths come from the shards, not from reading every item)."""
    from training.data.shards import PretokenizedShardDataset
    from training.data.preprocess import preprocess
    from training.data.synthetic import write_jsonl

    texts = [" ".join(["word"] * (1 + (7 * i) % 60)) for i in range(96)]  # 2 .. 62 tokens, shuffled lengths
    write_jsonl([{"text": t} for t in texts], tmp_path / "in.jsonl")
    preprocess([str(tmp_path / "in.jsonl")], tmp_path / "shards", tok, progress=False)
    dataset = PretokenizedShardDataset(tmp_path / "shards", shuffle=False, tokenizer=tok)

    def padding_and_lengths(strategy):
        config = make_config(tmp_path / strategy, sharp_teacher_dir, train_sampling_strategy=strategy,
                             gradient_accumulation_steps=accumulation)
        loader = make_trainer(config, tok, dataset, teacher=DirectTeacher(sharp_teacher_dir)).get_train_dataloader()
        pads, seen = 0, []
        for batch in loader:
            mask = batch["attention_mask"]
            pads += int((mask == 0).sum())
            seen += mask.sum(1).tolist()
        return pads, sorted(seen)

    grouped_pads, grouped_seen = padding_and_lengths("group_by_length")
    random_pads, random_seen = padding_and_lengths("random")
    assert grouped_seen == random_seen == sorted(dataset.lengths.tolist())
    assert grouped_pads < 0.25 * random_pads


@pytest.mark.parametrize("strategy", ["group_by_length", "random"])
def test_train_dataset_keeps_one_order_for_length_grouping(tmp_path, sharp_teacher_dir, tok, strategy):
    """train.py's dataset: reshuffled each epoch, except under group_by_length, whose sampler was given the lengths
    of the first order and must find them in every epoch."""
    from training.data.preprocess import preprocess
    from training.data.synthetic import write_jsonl
    from training.trainers.distillation import build_train_dataset

    write_jsonl([{"text": " ".join(["word"] * (1 + (7 * i) % 60))} for i in range(64)], tmp_path / "in.jsonl")
    preprocess([str(tmp_path / "in.jsonl")], tmp_path / "shards", tok, progress=False)
    config = make_config(tmp_path / "out", sharp_teacher_dir, train_data=str(tmp_path / "shards"),
                         train_sampling_strategy=strategy)
    dataset = build_train_dataset(config, tok)
    first = dataset.lengths.copy()
    dataset.set_epoch(1)
    assert (dataset.lengths == first).all() == (strategy == "group_by_length")

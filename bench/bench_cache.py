"""Teacher cache: bytes per token of each encoding, the fidelity of the compact one, and read speed against the
student's training consumption, all measured side by side in one run.

1. A teacher that has actually been TRAINED: a synthetic token language (each token's class picks a Zipf
   distribution over a random support of 1..S tokens, plus a small uniform floor, so positions range from
   certain to very uncertain) and a tiny Llama trained on it with CE for a few hundred steps.
2. For k = 64, 128, 512 the teacher's exact fp32 top-k on held-out sequences is encoded with each encoding
   (shard files as the producer writes them), decoded, and the sparse forward-KL loss of two students
   (random init, and CE-trained for a while) is computed from the decoded answer and from the exact one:
   relative loss error and cosine similarity of the student's parameter gradients. The project's loss
   (`training.trainers.losses.distillation_loss`) counts -inf slots as their own (empty) buckets; the "tail-merged"
   column is the same divergence with those slots moved into the tail bucket, which is what the compact
   encoding means (they are part of the tail mass it stores).
   Goals: compact <= 0.2x naive bytes/token, loss within 1%, gradient cosine >= 0.99.
3. A cache written by `python -m training.cache_teacher_logits` (naive and compact at k = 512) is read by
   `CachedTeacher` in random batches: tokens/s against the tokens/s a RetNet student consumes in training
   steps with the sparse KD loss (goal >= 10x), and the step time of cached KD (with prefetch, as the
   trainer does it) against a CE-only step and against KD from answers already in memory (goal <= 1.05x).

    python bench/bench_cache.py            # larger corpus and teacher
    python bench/bench_cache.py --quick    # about 2 minutes on a laptop CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from training.teachers.cache.format import make_encoding, shard_bytes  # noqa: E402
from training.trainers.losses import distillation_loss  # noqa: E402

ENCODINGS = ("naive", "compact", "compact:bits=5", "compact:mass=0.995", "compact:mass=0.999,bits=8",
             "compact:mass=1.0,bits=8")


# ----------------------------------------------------------------------------------------------------------
# 1. synthetic language and a trained teacher


class Language:
    """Next-token distribution depends on the class of the current token (vocab // classes_per tokens each)."""

    def __init__(self, vocab: int, classes: int, max_support: int, seed: int = 0, floor: float = 0.002):
        rng = np.random.default_rng(seed)
        self.vocab, self.classes = vocab, classes
        self.token_class = rng.integers(0, classes, vocab)
        sizes = np.exp(rng.uniform(0, math.log(max_support), classes)).astype(int).clip(1, max_support)
        probs = np.full((classes, vocab), floor / vocab)
        for c in range(classes):
            support = rng.choice(vocab, sizes[c], replace=False)
            weights = np.arange(1, sizes[c] + 1, dtype=np.float64) ** -1.1
            probs[c, support] += (1 - floor) * weights / weights.sum()
        self.probs = probs / probs.sum(1, keepdims=True)  # [C, V]
        self.cdf = np.cumsum(self.probs, 1)

    def entropy(self) -> float:
        return float(-(self.probs * np.log(self.probs)).sum(1).mean())

    def sample(self, n: int, length: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.zeros((n, length), dtype=np.int64)
        out[:, 0] = rng.integers(0, self.vocab, n)
        for t in range(1, length):
            cdf = self.cdf[self.token_class[out[:, t - 1]]]  # [n, V]
            out[:, t] = np.minimum((cdf < rng.random(n)[:, None]).sum(1), self.vocab - 1)
        return out


def word_tokenizer(vocab: int):
    """A word-level tokenizer over "t0".."t{V-1}" so the teacher folder has the Hub layout the CLI reads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1")


def train_lm(model, data: torch.Tensor, steps: int, batch: int, lr: float, seed: int, label: str) -> list[float]:
    """Plain CE training with AdamW; returns the loss curve."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(steps):
        x = data[torch.randint(0, len(data), (batch,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    print(f"  {label}: {steps} steps in {time.perf_counter() - start:.1f}s, CE {losses[0]:.3f} -> "
          f"{np.mean(losses[-10:]):.3f}", flush=True)
    return losses


# ----------------------------------------------------------------------------------------------------------
# 2. fidelity


def encode_decode(spec: str, ids: np.ndarray, lps: np.ndarray, lengths: list[int], vocab: int, k: int):
    """Encode [N, k] answers of sequences with `lengths` into a shard (bytes as on disk), decode all tokens."""
    enc = make_encoding(spec, k, vocab)
    bounds = np.cumsum([0] + lengths)
    parts = [enc.encode(ids[a:b], lps[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    arrays, entries = enc.pack(parts)
    arrays["keys"] = np.zeros((len(lengths), 16), np.uint8)
    arrays["lengths"] = np.array(lengths, "<i4")
    arrays["token_offsets"] = bounds.astype("<i8")
    arrays["entry_offsets"] = np.concatenate([[0], np.cumsum(entries)]).astype("<i8")
    size = len(shard_bytes(arrays, {"settings_fingerprint": "0" * 64}))
    ent = arrays["entry_offsets"]
    dec_ids, dec_lp = enc.decode(arrays, list(zip(bounds[:-1], bounds[1:])), list(zip(ent[:-1], ent[1:])), k)
    return size, dec_ids, dec_lp


def tail_merged_kl(hidden, lm_head, labels, ids, lps):
    """Sparse forward KL where slots with log-prob -inf belong to the tail bucket (reference, unchunked)."""
    z = lm_head(hidden).float()  # [N, V]
    logq = torch.log_softmax(z, -1)
    valid = torch.isfinite(lps)  # [N, k]
    logq_top = logq.gather(1, ids)
    q_in = (logq_top.exp() * valid).sum(-1)
    p = torch.where(valid, lps, torch.zeros_like(lps)).exp() * valid
    p_tail = (1 - p.sum(-1)).clamp_min(1e-12)
    q_tail = (1 - q_in).clamp_min(1e-12)
    kl = (p * (torch.where(valid, lps, 0.0) - torch.where(valid, logq_top, 0.0))).sum(-1)
    kl = kl + p_tail * (p_tail.log() - q_tail.log())
    return kl.mean()


def loss_and_grad(student, x, ids, lps, kind: str, merged: bool):
    """KD loss (alpha = 0) of `student` on batch x against a top-k answer, and the flat parameter gradient."""
    student.zero_grad(set_to_none=True)
    hidden = student.model(input_ids=x).last_hidden_state[:, :-1].reshape(-1, student.config.hidden_size)
    labels = x[:, 1:].reshape(-1)
    head = student.get_output_embeddings()
    if merged:
        loss = tail_merged_kl(hidden, head, labels, ids, lps)
    else:
        loss = distillation_loss(hidden, head, labels, ids, lps, alpha=0.0, temperature=1.0, kind=kind).loss
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in student.parameters() if p.grad is not None])
    return loss.item(), grad


def fidelity(teacher, students: dict, heldout: torch.Tensor, vocab: int, ks, encodings, kinds) -> list[dict]:
    rows = []
    T = heldout.shape[1]
    with torch.no_grad():
        full = torch.log_softmax(teacher(input_ids=heldout).logits.float(), -1)  # [B, T, V]
    x = heldout
    lengths = [T - 1] * len(heldout)  # positions that have a next token
    topk_mass = {}
    for k in ks:
        lp_exact, ids_exact = full[:, :-1].topk(k, dim=-1)  # [B, T-1, k]
        ids_np = ids_exact.reshape(-1, k).numpy()
        lp_np = lp_exact.reshape(-1, k).numpy()
        topk_mass[k] = float(lp_exact.exp().sum(-1).mean())
        decoded = {}
        for spec in encodings:
            size, d_ids, d_lp = encode_decode(spec, ids_np, lp_np, lengths, vocab, k)
            decoded[spec] = (size, torch.from_numpy(d_ids), torch.from_numpy(d_lp), float(np.isfinite(d_lp).mean()))
        naive_size = decoded["naive"][0]
        for name, student in students.items():
            for kind in kinds:
                exact_loss, exact_grad = loss_and_grad(student, x, ids_exact.reshape(-1, k), lp_exact.reshape(-1, k),
                                                       kind, merged=False)
                for spec, (size, d_ids, d_lp, kept) in decoded.items():
                    row = {"k": k, "encoding": spec, "student": name, "kind": kind,
                           "bytes_per_token": size / len(ids_np), "ratio": size / naive_size, "kept": kept,
                           "exact_loss": exact_loss}
                    loss, grad = loss_and_grad(student, x, d_ids, d_lp, kind, merged=False)
                    row["rel_err"] = abs(loss - exact_loss) / abs(exact_loss)
                    row["cos"] = float(torch.nn.functional.cosine_similarity(grad, exact_grad, dim=0))
                    if kind == "forward_kl":
                        ref_loss, ref_grad = loss_and_grad(student, x, ids_exact.reshape(-1, k),
                                                           lp_exact.reshape(-1, k), kind, merged=True)
                        m_loss, m_grad = loss_and_grad(student, x, d_ids, d_lp, kind, merged=True)
                        row["merged_rel_err"] = abs(m_loss - ref_loss) / abs(ref_loss)
                        row["merged_cos"] = float(torch.nn.functional.cosine_similarity(m_grad, ref_grad, dim=0))
                    rows.append(row)
    return rows, topk_mass


def spread_vocab_bytes(teacher, heldout, vocab: int, ks, big_vocab: int) -> dict:
    """Bytes relative to naive when the teacher's ids are mapped injectively at random into a V=`big_vocab`
    vocabulary: wider ids and larger id gaps, the same probabilities (what a Llama-3 vocabulary costs)."""
    with torch.no_grad():
        full = torch.log_softmax(teacher(input_ids=heldout).logits.float(), -1)[:, :-1]
    relabel = np.random.default_rng(0).choice(big_vocab, vocab, replace=False)
    lengths = [heldout.shape[1] - 1] * len(heldout)
    out = {}
    for k in ks:
        lp, ids = full.topk(k, dim=-1)
        ids_np, lp_np = relabel[ids.reshape(-1, k).numpy()], lp.reshape(-1, k).numpy()
        sizes = {spec: encode_decode(spec, ids_np, lp_np, lengths, big_vocab, k)[0] for spec in ENCODINGS}
        out[k] = {spec: size / sizes["naive"] for spec, size in sizes.items() if spec != "naive"}
    return out


# ----------------------------------------------------------------------------------------------------------
# 3. read throughput and step time


def build_cache(teacher_dir: str, data_path: str, out: str, k: int, encoding: str) -> float:
    from training.teachers.cache.build import main

    start = time.perf_counter()
    main(["--teacher", teacher_dir, "--data", data_path, "--output", out, "--topk", str(k), "--encoding", encoding,
          "--dtype", "float32", "--batch-size", "16", "--shard-tokens", "16384", "--no-progress"])
    return time.perf_counter() - start


def read_throughput(cache, sequences: np.ndarray, batch: int, k: int, seconds: float, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x = torch.from_numpy(sequences[rng.integers(0, len(sequences), batch)])
        out = cache.topk(x, torch.ones_like(x), k)
        tokens += x.numel()
    del out
    return tokens / (time.perf_counter() - start)


def student_steps(student, batches, k: int, mode: str, cache=None, answers=None) -> float:
    """Seconds per training step: 'ce' (alpha = 1, no teacher), 'memory' (KD from answers already in memory),
    'cached' (KD from the cache, next batch prefetched like the trainer does)."""
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    head = student.get_output_embeddings()
    H = student.config.hidden_size
    start = time.perf_counter()
    for i, x in enumerate(batches):
        mask = torch.ones_like(x)
        if mode == "cached":
            if i == 0:
                cache.prefetch(x, mask, k, 1.0)
            teacher = cache.topk(x, mask, k, 1.0)
            if i + 1 < len(batches):
                cache.prefetch(batches[i + 1], torch.ones_like(batches[i + 1]), k, 1.0)
            ids, lps = teacher.token_ids[:, :-1].reshape(-1, k), teacher.logprobs[:, :-1].reshape(-1, k)
        elif mode == "memory":
            ids, lps = answers[i]
        hidden = student.model(input_ids=x).last_hidden_state[:, :-1].reshape(-1, H)
        labels = x[:, 1:].reshape(-1)
        if mode == "ce":
            loss = distillation_loss(hidden, head, labels, None, None, alpha=1.0, temperature=1.0,
                                     kind="forward_kl").loss
        else:
            loss = distillation_loss(hidden, head, labels, ids, lps, alpha=0.5, temperature=1.0,
                                     kind="forward_kl").loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / len(batches)


# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small corpus / teacher / steps (about 2 minutes)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--spread-vocab", type=int, default=128256,
                        help="also measure bytes with the teacher's ids spread at random over this vocabulary size "
                        "(default: Llama-3's 128256)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--plot", default=None, help="write a PNG: bytes/token vs loss error per encoding")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on shared CPUs, OpenMP threads that wait on each other "
                        "make small ops 10x slower)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    q = args.quick
    V = args.vocab
    seq_len = 64 if q else 128
    teacher_steps = 200 if q else 600
    student_ce_steps = 40 if q else 150
    from hf_retnet import RetNetConfig, RetNetForCausalLM
    from tests.tiny_models import build_tiny_llama

    t0 = time.perf_counter()
    print(f"== 1. trained teacher on a synthetic language (V={V})", flush=True)
    lang = Language(V, classes=128, max_support=1024, seed=0)
    train = torch.from_numpy(lang.sample(2048 if q else 8192, seq_len, seed=1))
    heldout = torch.from_numpy(lang.sample(8 if q else 32, seq_len, seed=2))
    print(f"  language entropy {lang.entropy():.3f} nats/token (the best a model can do)")
    teacher = build_tiny_llama(V, hidden_size=64 if q else 128, num_layers=2, seed=0)
    curve = train_lm(teacher, train, teacher_steps, batch=32, lr=5e-3, seed=0, label="teacher CE")
    students = {"random": build_tiny_llama(V, hidden_size=32, num_layers=1, seed=1)}
    trained = build_tiny_llama(V, hidden_size=32, num_layers=1, seed=2)
    train_lm(trained, train, student_ce_steps, batch=32, lr=5e-3, seed=1, label="student CE")
    students["ce-trained"] = trained

    print("== 2. bytes/token and fidelity of the decoded cache (forward KL, held-out "
          f"{heldout.numel()} tokens)", flush=True)
    ks = (64, 128, 512)
    kinds = ("forward_kl",) if q else ("forward_kl", "reverse_kl")
    rows, topk_mass = fidelity(teacher, students, heldout, V, ks, ENCODINGS, kinds)
    print("  mean top-k mass of the teacher: " + ", ".join(f"k={k}: {m:.4f}" for k, m in topk_mass.items()))
    spread = spread_vocab_bytes(teacher, heldout, V, ks, args.spread_vocab)
    print(f"  the same answers with ids spread over a vocabulary of V={args.spread_vocab}, bytes/token vs naive: "
          + "; ".join(f"k={k}: " + ", ".join(f"{e} {r:.3f}x" for e, r in ratios.items()) for k, ratios in spread.items()))
    header = (f"  {'k':>4} {'encoding':<28} {'student':<10} {'kind':<10} {'B/tok':>8} {'x naive':>8} {'kept':>6} "
              f"{'loss err':>9} {'grad cos':>9} {'merged err':>10} {'merged cos':>10}")
    print(header)
    for r in rows:
        merged = (f"{r['merged_rel_err']:>10.2%} {r['merged_cos']:>10.5f}" if "merged_rel_err" in r
                  else f"{'':>10} {'':>10}")
        print(f"  {r['k']:>4} {r['encoding']:<28} {r['student']:<10} {r['kind']:<10} {r['bytes_per_token']:>8.1f} "
              f"{r['ratio']:>8.3f} {r['kept']:>6.1%} {r['rel_err']:>9.3%} {r['cos']:>9.5f} {merged}")

    print("== 3. read throughput vs the student's consumption (k=512)", flush=True)
    results = {"fidelity": rows, "topk_mass": topk_mass, "spread_vocab_ratio": spread, "teacher_curve_end": float(np.mean(curve[-10:])),
               "language_entropy": lang.entropy()}
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = os.path.join(tmp, "teacher")
        teacher.save_pretrained(teacher_dir)
        word_tokenizer(V).save_pretrained(teacher_dir)
        import pyarrow as pa
        import pyarrow.parquet as pq

        corpus = lang.sample(256 if q else 1024, seq_len, seed=3)
        data_path = os.path.join(tmp, "corpus.parquet")
        pq.write_table(pa.table({"input_ids": corpus.tolist()}), data_path)
        from training.teachers.cached import CachedTeacher

        k, batch = 512, 8
        student = RetNetForCausalLM(RetNetConfig(vocab_size=V, hidden_size=128 if q else 256,
                                                 num_hidden_layers=2 if q else 4, num_heads=4,
                                                 intermediate_size=256 if q else 512, chunk_size=32))
        rng = np.random.default_rng(5)
        batches = [torch.from_numpy(corpus[rng.integers(0, len(corpus), batch)]) for _ in range(6 if q else 20)]
        throughput = {}
        for spec in ("naive", "compact"):
            out = os.path.join(tmp, f"cache-{spec}")
            seconds = build_cache(teacher_dir, data_path, out, k, spec)
            cache = CachedTeacher(out, topk=k)
            size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
            read = read_throughput(cache, corpus, batch, k, seconds=3 if q else 10)
            throughput[spec] = {"write_seconds": seconds, "read_tokens_per_s": read,
                                "disk_bytes_per_token": size / corpus.size}
            answers = []
            for x in batches:
                t = cache.topk(x, torch.ones_like(x), k)
                answers.append((t.token_ids[:, :-1].reshape(-1, k), t.logprobs[:, :-1].reshape(-1, k)))
            student_steps(student, batches[:2], k, "ce")  # warm-up
            timing = {}
            for rep in range(2):  # interleaved, best of 2: these machines are noisy
                for mode in ("ce", "memory", "cached"):
                    sec = student_steps(student, batches, k, mode, cache=cache, answers=answers)
                    timing[mode] = min(timing.get(mode, float("inf")), sec)
            cache.close()
            consume = batch * seq_len / timing["cached"]
            throughput[spec].update(step_seconds=timing, student_tokens_per_s=consume)
            print(f"  {spec:<8} disk {size / corpus.size:7.1f} B/token | read {read:9.0f} tokens/s | student "
                  f"consumes {consume:7.0f} tokens/s -> read/consume {read / consume:6.1f}x | step: CE "
                  f"{timing['ce'] * 1e3:6.1f} ms, KD from memory {timing['memory'] * 1e3:6.1f} ms, KD cached "
                  f"{timing['cached'] * 1e3:6.1f} ms -> cached/CE {timing['cached'] / timing['ce']:.3f}x, "
                  f"cached/memory {timing['cached'] / timing['memory']:.3f}x", flush=True)
        results["throughput"] = throughput

    print("== summary (goals: compact <= 0.2x naive with loss err <= 1% and grad cos >= 0.99; read >= 10x "
          "consumption; cached step <= 1.05x)")
    for k in ks:
        best = [r for r in rows if r["k"] == k and r["encoding"] == "compact" and r["kind"] == "forward_kl"]
        worst_err = max(r["rel_err"] for r in best)
        worst_cos = min(r["cos"] for r in best)
        merged_err = max(r["merged_rel_err"] for r in best)
        merged_cos = min(r["merged_cos"] for r in best)
        print(f"  k={k:<4} compact {best[0]['ratio']:.3f}x naive ({best[0]['bytes_per_token']:.1f} vs "
              f"{6 * k} B/token payload), {spread[k]['compact']:.3f}x with ids spread over V={args.spread_vocab}; "
              f"worst over students: loss err {worst_err:.3%}, grad cos {worst_cos:.5f}; "
              f"tail-merged loss err {merged_err:.3%}, cos {merged_cos:.5f}")
    for spec, t in results["throughput"].items():
        s = t["step_seconds"]
        print(f"  {spec}: read/consume {t['read_tokens_per_s'] / t['student_tokens_per_s']:.1f}x, cached step "
              f"{s['cached'] / s['ce']:.3f}x CE-only, {s['cached'] / s['memory']:.3f}x KD-from-memory")
    print(f"  total {time.perf_counter() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    if args.plot:
        plot(rows, args.plot)
    return 0


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec in ENCODINGS:
        pts = [(r["ratio"], max(r["merged_rel_err"], 1e-6)) for r in rows
               if r["encoding"] == spec and r["student"] == "random" and "merged_rel_err" in r]
        ax.scatter(*zip(*pts), label=spec)
    ax.axvline(0.2, ls="--", c="grey")
    ax.axhline(0.01, ls="--", c="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes/token relative to naive (int32 + fp16)")
    ax.set_ylabel("relative KD loss error (tail-merged)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

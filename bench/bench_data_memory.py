"""Resident memory while iterating >= 1 GiB of tokens through PretokenizedShardDataset.

Writes synthetic shards directly (random Llama-3-sized token ids as int32, the same writer and
manifest as `training.preprocess`), builds the dataset (one-time Parquet -> Arrow conversion by
`datasets`), then iterates a full shuffled epoch through a DataLoader + PaddingCollator and
samples RSS (and its anonymous / file-backed parts from /proc/self/status).

Side by side in the same run: the default bounded mapping (resident pages dropped past
`max_mapped_bytes`) against plain memory mapping (never dropped), which shows why the bound
exists: touched pages of a memory map count as resident memory.

    python bench/bench_data_memory.py --quick          # 1 GiB of input_ids, < ~2 min
    python bench/bench_data_memory.py --gib 4 --plot rss.png
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MIB = 1 << 20


def memory() -> dict[str, float]:
    """RSS and its parts in MiB (Linux /proc; falls back to psutil's RSS elsewhere)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(line.split()[1]) / 1024
    except OSError:
        import psutil

        out["VmRSS"] = psutil.Process().memory_info().rss / MIB
    return out


def write_synthetic_shards(folder: str, gib: float, seq_len: int, seqs_per_shard: int, seed: int = 0) -> dict:
    """Shards + manifest holding `gib` GiB of int32 input_ids (labels are a copy, with the first
    quarter of each sequence masked as if it were a prompt)."""
    from training.data.preprocess import write_manifest, write_shard

    total_tokens = int(gib * (1 << 30)) // 4
    num_seqs = -(-total_tokens // seq_len)
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    num_shards = 0
    for start in range(0, num_seqs, seqs_per_shard):
        n = min(seqs_per_shard, num_seqs - start)
        ids = rng.integers(0, 128256, size=(n, seq_len), dtype=np.int32)  # [n, T]
        labels = ids.copy()
        labels[:, : seq_len // 4] = -100
        stats = {"num_records": n, "num_sequences": n, "num_tokens": n * seq_len,
                 "num_label_tokens": n * (seq_len - seq_len // 4), "source": {"path": "synthetic"}}
        write_shard(os.path.join(folder, f"shard-{num_shards:05d}.parquet"), ids.reshape(-1), labels.reshape(-1),
                    np.full(n, seq_len, dtype=np.int32), {"key": {"bench": start}, "stats": stats})
        num_shards += 1
    info = {"name_or_path": "synthetic-bench", "fingerprint": "sha256:synthetic-bench", "vocab_size": 128256,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}
    return write_manifest(folder, info, {"max_seq_length": seq_len, "pack": True, "shard_size": seqs_per_shard},
                          [{"kind": "synthetic", "path": "synthetic"}], num_shards)


def iterate(ds, batch_size: int, limit: int | None, samples: list) -> tuple[float, int, float]:
    """One pass in dataset order through a DataLoader; returns (seconds, tokens, peak RSS MiB)."""
    import torch

    from training.data.shards import PaddingCollator

    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=PaddingCollator(0), num_workers=0)
    start, tokens, peak = time.perf_counter(), 0, memory()["VmRSS"]
    for step, batch in enumerate(loader):
        tokens += int(batch["attention_mask"].sum())
        if step % 64 == 0:
            m = memory()
            peak = max(peak, m["VmRSS"])
            samples.append((tokens, m["VmRSS"]))
        if limit is not None and tokens >= limit:
            break
    return time.perf_counter() - start, tokens, max(peak, memory()["VmRSS"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 GiB; the plain-mmap comparison reads an eighth of an epoch")
    parser.add_argument("--gib", type=float, default=None, help="GiB of input_ids (default 1; labels add as much)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="where to write shards (default: a temp folder, removed)")
    parser.add_argument("--plot", default=None, help="write an RSS-vs-tokens PNG here")
    args = parser.parse_args(argv)
    gib = args.gib or 1.0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from training.data.shards import PretokenizedShardDataset

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-data-memory-")
    folder = os.path.join(workdir, "shards")
    try:
        t0 = time.perf_counter()
        manifest = write_synthetic_shards(folder, gib, args.seq_len, seqs_per_shard=4096)
        t_write = time.perf_counter() - t0
        total = manifest["totals"]["num_tokens"]
        print(f"shards: {manifest['totals']['num_shards']} files, {total:,} tokens = {total * 4 / (1 << 30):.2f} GiB "
              f"of input_ids (+ labels), written in {t_write:.1f}s")

        gc.collect()
        before_build = memory()
        t0 = time.perf_counter()
        bounded = PretokenizedShardDataset(folder, seed=0)
        t_build = time.perf_counter() - t0
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
        gc.collect()
        base = memory()
        print(f"dataset built in {t_build:.1f}s (one-time Parquet->Arrow conversion); RSS {before_build['VmRSS']:.0f}"
              f" -> {base['VmRSS']:.0f} MiB")

        samples_b: list = []
        secs_b, tok_b, peak_b = iterate(bounded, args.batch_size, None, samples_b)
        end_b = memory()
        growth_b = peak_b - base["VmRSS"]
        print(f"bounded maps (default, max_mapped_bytes={bounded.max_mapped_bytes // MIB} MiB): {tok_b:,} tokens in "
              f"{secs_b:.1f}s, {tok_b / secs_b / 1e6:.2f} M tok/s, {bounded.num_releases} page releases; RSS growth peak "
              f"{growth_b:.0f} MiB (anon {end_b['RssAnon'] - base['RssAnon']:+.0f}, "
              f"file {end_b['RssFile'] - base['RssFile']:+.0f} MiB at the end)")
        del bounded
        gc.collect()

        limit = total // 8 if args.quick else None
        plain = PretokenizedShardDataset(folder, seed=0, max_mapped_bytes=None)
        base_p = memory()
        samples_p: list = []
        secs_p, tok_p, peak_p = iterate(plain, args.batch_size, limit, samples_p)
        growth_p = peak_p - base_p["VmRSS"]
        span = "an eighth of an epoch" if limit else "a full epoch"
        print(f"plain maps (pages never dropped), {span}: {tok_p:,} tokens in {secs_p:.1f}s, "
              f"{tok_p / secs_p / 1e6:.2f} M tok/s; RSS growth peak {growth_p:.0f} MiB")
        print(f"ratios: RSS growth bounded/plain = {growth_b / max(growth_p, 1):.3f} "
              f"(plain covered {tok_p / tok_b:.2f} of the tokens); throughput bounded/plain = "
              f"{(tok_b / secs_b) / (tok_p / secs_p):.2f}")
        verdict = "PASS" if growth_b < 200 else "FAIL"
        print(f"{verdict}: iterating {total * 4 / (1 << 30):.2f} GiB of tokens grew RSS by {growth_b:.0f} MiB "
              "(target < 200 MiB)")
        if args.plot:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(7, 4))
            for name, s, b in (("bounded (default)", samples_b, base), ("plain mmap", samples_p, base_p)):
                if s:
                    ax.plot([t / 1e6 for t, _ in s], [r - b["VmRSS"] for _, r in s], label=name)
            ax.axhline(200, color="grey", linestyle="--", label="200 MiB target")
            ax.set_xlabel("tokens read (M)")
            ax.set_ylabel("RSS growth (MiB)")
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.plot, dpi=120)
            print(f"plot: {args.plot}")
        return 0 if verdict == "PASS" else 1
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

"""PNG plots of the report: decoding latency and memory against context length, passkey accuracy grids."""

from __future__ import annotations


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    from training.utils.io import save_figure

    return save_figure(fig, path, dpi=120)


def plot_latency(latency: dict, path: str) -> str | None:
    """Two panels: median ms per decoded token, and bytes carried between steps (state / KV cache)."""
    models = {name: sec["rows"] for name, sec in latency.items() if isinstance(sec, dict) and sec.get("rows")}
    if not models:
        return None
    plt = _plt()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"student": "student (recurrent state)", "teacher": "teacher (KV cache)"}
    for name, rows in models.items():
        x = [r["context_length"] for r in rows]
        ax_t.plot(x, [r["ms_per_token"] for r in rows], marker="o", label=labels.get(name, name))
        ax_m.plot(x, [r["cache_bytes"] / 2**20 for r in rows], marker="o", label=labels.get(name, name))
    for ax, title, unit in ((ax_t, "Decoding latency", "ms / token (median)"),
                            (ax_m, "Memory carried between steps", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_passkey(passkey: dict, path: str) -> str | None:
    """One accuracy grid (context length x depth) per model."""
    models = {name: sec["cells"] for name, sec in passkey.items() if isinstance(sec, dict) and sec.get("cells")}
    if not models:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, (name, cells) in zip(axes[0], models.items()):
        lengths = sorted({c["context_length"] for c in cells})
        depths = sorted({c["depth"] for c in cells})
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for c in cells:
            grid[depths.index(c["depth"])][lengths.index(c["context_length"])] = c["accuracy"]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        for c in cells:
            ax.text(lengths.index(c["context_length"]), depths.index(c["depth"]), f"{c['accuracy']:.2f}",
                    ha="center", va="center", color="white" if c["accuracy"] < 0.6 else "black")
        ax.set_xticks(range(len(lengths)), [str(v) for v in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("pass key depth")
        ax.set_title(f"Passkey retrieval: {name}")
        fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    return _save(fig, path)

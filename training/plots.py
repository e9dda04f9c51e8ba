"""Loss curves of a finished run as a PNG, because people would rather see them than read log_history."""

from __future__ import annotations

import os

CURVES = ("loss", "loss/ce", "loss/kd", "loss/diversity", "eval_loss", "eval_kd")


def plot_loss_curves(log_history: list[dict], path: str) -> str | None:
    """Plot every key of CURVES present in `log_history` (the Trainer's state) against the step; None if empty."""
    series = {key: [(h["step"], h[key]) for h in log_history if key in h and "step" in h] for key in CURVES}
    series = {key: points for key, points in series.items() if points}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, points in series.items():
        ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token mean)")
    ax.set_title("Distillation losses")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path

"""Loss curves of a finished run as a PNG, because people would rather see them than read log_history.

One panel of losses (training terms and the periodic evaluation's token means, all in nats per token) and, when
the run evaluated, a second panel of the student's agreement with the teacher (`eval_top1`), whose scale is a
fraction, not nats.
"""

from __future__ import annotations

CURVES = ("loss", "loss/ce", "loss/kd", "loss/diversity", "eval_loss", "eval_ce", "eval_kd", "eval_kl")
AGREEMENT = ("eval_top1",)
FIGSIZE, DPI = (7, 4), 120  # the PNG is 840 x 480 pixels (one panel) or 840 x 720 (two)


def _series(log_history: list[dict], keys) -> dict[str, list[tuple[float, float]]]:
    series = {key: [(h["step"], h[key]) for h in log_history if key in h and "step" in h] for key in keys}
    return {key: points for key, points in series.items() if points}


def loss_curves_figure(log_history: list[dict]):
    """A matplotlib Figure of every key of CURVES (and AGREEMENT, in its own panel) present in `log_history`,
    against the optimizer step; None when there is nothing to plot."""
    losses, agreement = _series(log_history, CURVES), _series(log_history, AGREEMENT)
    if not losses and not agreement:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    panels = [(losses, "loss (nats per token)", "Distillation losses"),
              (agreement, "fraction of tokens", "Agreement with the teacher (top-1)")]
    panels = [panel for panel in panels if panel[0]]
    width, height = FIGSIZE
    fig = Figure(figsize=(width, height * (1 + 0.5 * (len(panels) - 1))))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (series, ylabel, title) in zip(axes, panels):
        for key, points in series.items():
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_loss_curves(log_history: list[dict], path: str) -> str | None:
    """Write `loss_curves_figure(log_history)` to `path` (atomically, via a temporary file); None if empty."""
    fig = loss_curves_figure(log_history)
    if fig is None:
        return None
    from .io import save_figure

    return save_figure(fig, path, dpi=DPI)

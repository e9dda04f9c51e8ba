"""loss_curves.png: the curves in it are the run's logged values, one panel per scale, and the PNG is a real,
non-blank image of the stated size."""

import json
import os

import numpy as np
import pytest

from training.utils.plots import DPI, FIGSIZE, loss_curves_figure, plot_loss_curves
from training.data.synthetic import synthetic_corpus
from training.trainers.distillation import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "configs", "train_tiny.yaml")


def fake_history(evaluate: bool):
    history = [{"step": s, "loss": 5.0 - s, "loss/ce": 6.0 - s, "loss/kd": 4.0 - s / 2} for s in (1, 2, 3, 4)]
    if evaluate:
        history += [{"step": s, "eval_loss": 4.5 - s, "eval_kl": 3.0 - s / 2, "eval_top1": 0.1 * s} for s in (2, 4)]
    return history + [{"step": 4, "train_runtime": 1.0}]


def read_png(path):
    import matplotlib.image

    return matplotlib.image.imread(path)  # [H, W, 4] floats in [0, 1]


@pytest.mark.parametrize("evaluate", [False, True])
def test_figure_holds_the_logged_curves(evaluate):
    fig = loss_curves_figure(fake_history(evaluate))
    axes = fig.get_axes()
    assert len(axes) == (2 if evaluate else 1)
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes[0].get_lines()}
    expected = {"loss": ([1, 2, 3, 4], [4.0, 3.0, 2.0, 1.0]), "loss/ce": ([1, 2, 3, 4], [5.0, 4.0, 3.0, 2.0]),
                "loss/kd": ([1, 2, 3, 4], [3.5, 3.0, 2.5, 2.0])}
    if evaluate:
        expected.update({"eval_loss": ([2, 4], [2.5, 0.5]), "eval_kl": ([2, 4], [2.0, 1.0])})
        top1 = {line.get_label(): list(line.get_ydata()) for line in axes[1].get_lines()}
        assert top1 == {"eval_top1": pytest.approx([0.2, 0.4])}
    assert curves == expected
    assert {t.get_text() for t in axes[0].get_legend().get_texts()} == set(expected)


@pytest.mark.parametrize("evaluate", [False, True])
def test_png_is_the_figure_not_a_blank_image(tmp_path, evaluate):
    path = str(tmp_path / "curves.png")
    assert plot_loss_curves(fake_history(evaluate), path) == path
    image = read_png(path)
    width, height = FIGSIZE[0] * DPI, FIGSIZE[1] * DPI * (1.5 if evaluate else 1)
    assert image.shape[:2] == (height, width)
    rgb = image[..., :3]
    assert (rgb.min(-1) < 0.9).mean() > 0.01  # lines, text and axes cover a real part of the image
    # matplotlib's first colour (C0, #1f77b4) draws the first curve: its pixels are there
    c0 = np.abs(rgb - np.array([0x1F, 0x77, 0xB4]) / 255).max(-1) < 0.05
    assert c0.sum() > 100
    assert os.listdir(tmp_path) == ["curves.png"]  # no temporary file left beside it


def test_nothing_to_plot_writes_nothing(tmp_path):
    assert plot_loss_curves([{"step": 1, "train_runtime": 2.0}], str(tmp_path / "x.png")) is None
    assert not (tmp_path / "x.png").exists()


def test_cli_run_writes_loss_curves_of_its_log_history(tmp_path, tiny_teacher_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_corpus(40, seed=0, kind="text")))
    out = tmp_path / "run"
    assert main(["--config", TINY, "--teacher_model", tiny_teacher_dir, "--train_data", str(data),
                 "--output_dir", str(out), "--max_steps", "3"]) in (0, None)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    fig = loss_curves_figure(history)
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.get_axes()[0].get_lines()}
    assert lines["loss"] == [h["loss"] for h in history if "loss" in h] and len(lines["loss"]) == 3
    image = read_png(out / "loss_curves.png")
    assert image.shape[:2] == (FIGSIZE[1] * DPI, FIGSIZE[0] * DPI)
    assert (image[..., :3].min(-1) < 0.9).mean() > 0.01
    assert not any(".tmp" in name or "staging" in name for name in os.listdir(out))

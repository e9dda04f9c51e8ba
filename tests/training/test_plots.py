"""A finished `python -m training.train` run leaves loss_curves.png beside its weights."""

import json
import os

from training.plots import plot_loss_curves
from training.synthetic import synthetic_corpus
from training.train import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "configs", "train_tiny.yaml")


def test_cli_run_writes_loss_curves(tmp_path, tiny_teacher_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_corpus(40, seed=0, kind="text")))
    out = tmp_path / "run"
    assert main(["--config", TINY, "--teacher_model", tiny_teacher_dir, "--train_data", str(data),
                 "--output_dir", str(out), "--max_steps", "3"]) in (0, None)
    png = out / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert width > 400 and height > 200
    assert not any(name.endswith(".tmp.png") for name in os.listdir(out))


def test_nothing_to_plot_writes_nothing(tmp_path):
    assert plot_loss_curves([{"step": 1, "train_runtime": 2.0}], str(tmp_path / "x.png")) is None
    assert not (tmp_path / "x.png").exists()

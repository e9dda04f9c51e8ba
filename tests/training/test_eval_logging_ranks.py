"""Evaluation logging with two gloo processes: every process joins the gather of the evaluation metrics, also one
whose share of the evaluation set had no trained token (it used to skip it, and the other waited forever)."""

import json
import os
import subprocess
import sys

from tests.servers import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_eval_logging_does_not_wait_on_a_process_without_eval_tokens(tiny_teacher_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "tests", "training", "two_rank_eval.py"), tiny_teacher_dir, str(tmp_path / "out")]
    # ddp_timeout=60 in the script: a process left waiting in the gather fails after a minute instead of hanging
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    metrics = {rank: json.load(open(tmp_path / "out" / f"metrics-{rank}.json", encoding="utf-8"))
               for rank in (0, 1) if (tmp_path / "out" / f"metrics-{rank}.json").is_file()}
    assert sorted(metrics) == [0, 1]
    # both processes log the same global token means (process 0's tokens only)
    assert metrics[0]["eval_ce"] == metrics[1]["eval_ce"] > 0
    assert metrics[0]["eval_loss"] == metrics[1]["eval_loss"]

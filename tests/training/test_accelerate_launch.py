"""`python -m training.train` and `accelerate launch` (2 CPU processes, gloo) as real subprocesses.

The FSDP config (FSDP2) runs the same way on CPU. Note: in accelerate 1.15 `accelerate launch --cpu --num_processes 2` starts ONE process (several CPU processes need
mpirun), so the two-process run goes through the shipped DDP config (torchrun) with `use_cpu: true` in the training
config, which makes accelerate use gloo.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    from training.data.synthetic import synthetic_corpus

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_corpus(64, seed=0, kind="mixed")))
    return str(path)


def run(cmd, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO, WANDB_MODE="offline", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def train_args(teacher, data, out, per_device_batch):
    return [
        "--config", "examples/configs/train_tiny.yaml", "--teacher_model", teacher, "--train_data", data,
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", str(per_device_batch),
        "--train_sampling_strategy", "sequential", "--logging_steps", "1",
    ]


def losses(out):
    state = json.loads((out / "trainer_state.json").read_text())
    return state, {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_teacher_dir, train_file):
    out = tmp_path_factory.mktemp("single") / "out"
    run([sys.executable, "-m", "training.train", *train_args(tiny_teacher_dir, train_file, out, 4)])
    return losses(out)


@pytest.mark.parametrize("launch_config", ["ddp.yaml", "fsdp.yaml"])
def test_two_process_launch_matches_single_process(tmp_path, tiny_teacher_dir, train_file, single_run, launch_config):
    out = tmp_path / "launched"
    run([
        ACCELERATE, "launch", "--config_file", f"examples/accelerate/{launch_config}", "--num_processes", "2",
        "--mixed_precision", "no", "-m", "training.train", *train_args(tiny_teacher_dir, train_file, out, 2),
    ])
    single_state, single_losses = single_run
    state, launched_losses = losses(out)
    assert (single_state["train_batch_size"], state["train_batch_size"]) == (4, 2)
    # same global batch of 4 sequences: process 0 sees sequences 0-1, process 1 sequences 2-3
    assert launched_losses[1] == pytest.approx(single_losses[1], rel=1e-5)
    # after one Muon + AdamW step on the averaged (DDP) / reduce-scattered (FSDP) gradients, step 2 still agrees
    assert launched_losses[2] == pytest.approx(single_losses[2], rel=1e-4)
    # the distillation terms are the global token means too (each process adds its share of the step's mean)
    single_ce, launched_ce = ({h["step"]: h["loss/ce"] for h in s["log_history"] if "loss/ce" in h}
                              for s in (single_state, state))
    assert launched_ce[1] == pytest.approx(single_ce[1], rel=1e-5)
    assert launched_ce[2] == pytest.approx(single_ce[2], rel=1e-4)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (out / name).is_file()
    assert not (out / ".final-staging").exists()
    import hf_retnet  # noqa: F401  (registers the model type)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # the gathered (FSDP) / unwrapped (DDP) full student
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2


def test_cli_help_lists_distillation_keys():
    proc = run([sys.executable, "-m", "training.train", "--help"])
    for key in ("--teacher_topk", "--distill_alpha", "--kd_loss", "--student_overrides", "--muon_learning_rate"):
        assert key in proc.stdout


def test_alignment_runs_data_parallel_with_its_ranks_in_step(tmp_path, tiny_teacher_dir, train_file):
    """Stage 1 under `accelerate launch` (2 processes, DDP over gloo): each process takes half the global batch, the
    tokens are counted over both, and the processes stay in step: each measures the same per-layer errors on the
    whole held-out set, which they could not if a trained part (the decays above all) were not synchronised."""
    out = tmp_path / "aligned"
    proc = run([
        ACCELERATE, "launch", "--config_file", "examples/accelerate/ddp.yaml", "--num_processes", "2",
        "--mixed_precision", "no", "-m", "training.align", "--teacher", tiny_teacher_dir, "--data", train_file,
        "--student_out", str(out), "--max_tokens", "2000", "--batch_size", "2", "--max_seq_length", "48",
        "--eval_sequences", "4", "--eval_steps", "5", "--learning_rate", "1e-2", "--device", "cpu",
    ])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("alignment error after stage 1:")]
    assert len(lines) == 2 and lines[0] == lines[1], proc.stdout[-3000:]
    report = json.loads((out / "align_report.json").read_text())
    assert report["tokens"] >= 2000 and report["steps"] * 2 * 2 * 48 >= 2000
    assert all(a < b for a, b in zip(report["error_after"], report["error_at_conversion"]))
    assert "decays" in report["config"]["train"] and not (out / ".align-checkpoint").exists()

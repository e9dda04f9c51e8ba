"""Teacher correction with TRL: the finetuned teacher fits held-out data better, base + adapter equals the merged
model, every teacher source (direct, cached by the cache builder, network via a real server) serves the adapter with
identical top-k, and wrong adapters / configs fail clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from training.trainers.teacher_sft import RESULT_FILE, TeacherFinetuneConfig, main, tokenize_records, train_eval_datasets
from training.teachers.direct import DirectTeacher, load_teacher_model
from tests.tiny_models import default_texts, save_tiny_teacher

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=REPO, WANDB_MODE="offline", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="1")


def story_file(folder, n: int = 120) -> str:
    """A real text file, one record per paragraph, as the student's reader takes it."""
    path = os.path.join(folder, "stories.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n\n".join(default_texts(n)) + "\n")
    return path


def ft_args(teacher, data, out, *extra):
    return ["--teacher_model", teacher, "--train_data", data, "--output_dir", str(out), "--max_steps", "30",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "64", "--learning_rate", "3e-3",
            "--lora_r", "8", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "5",
            "--teacher_dtype", "float32", "--save_merged", "true", *extra]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_teacher_dir):
    """One finetune run of the tiny teacher on local stories: (data file, output folder, result)."""
    folder = tmp_path_factory.mktemp("teacher-ft")
    data = story_file(str(folder))
    out = folder / "out"
    assert main(ft_args(tiny_teacher_dir, data, out)) == 0
    result = json.loads((out / RESULT_FILE).read_text())
    return data, out, result


def test_finetuned_teacher_has_lower_held_out_loss(finetuned):
    _, out, result = finetuned
    assert result["eval_records"] == 12 and result["train_records"] == 108  # the last 10% of 120 paragraphs held out
    assert result["eval_loss_after"] < result["eval_loss_before"] - 0.1, result
    assert result["qlora"] is False  # no GPU here: plain LoRA
    names = set(os.listdir(out / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors", "teacher_base.json", "tokenizer.json"} <= names
    assert "model.safetensors" in os.listdir(out / "merged")


def held_out_loss(model, config, tokenizer) -> float:
    """Token-mean next-token loss of `model` on the held-out records, computed here without the trainer."""
    _, dataset = train_eval_datasets(config, tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in dataset:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"][1:])
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            count += int((labels != -100).sum())
    return total / count


def test_reported_losses_are_the_models_held_out_losses(finetuned, tiny_teacher_dir, tiny_tokenizer):
    data, out, result = finetuned
    config = TeacherFinetuneConfig(teacher_model=tiny_teacher_dir, train_data=data, output_dir=str(out / "x"))
    base = load_teacher_model(tiny_teacher_dir, dtype="float32")
    tuned = load_teacher_model(str(out / "merged"), dtype="float32")
    # one eval batch holds every held-out record, so the trainer's eval_loss is the token mean
    assert held_out_loss(base, config, tiny_tokenizer) == pytest.approx(result["eval_loss_before"], abs=1e-4)
    assert held_out_loss(tuned, config, tiny_tokenizer) == pytest.approx(result["eval_loss_after"], abs=1e-4)


def test_base_plus_adapter_equals_merged_model(finetuned, tiny_teacher_dir, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out, _ = finetuned
    ids = torch.tensor([tiny_tokenizer(t)["input_ids"] for t in default_texts(3)[:1]] * 2)
    base = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, str(out / "adapter")).eval()  # adapter applied at run time
    merged_folder = load_teacher_model(str(out / "merged"), dtype="float32")
    merged_on_load = load_teacher_model(tiny_teacher_dir, adapter=str(out / "adapter"), dtype="float32")
    with torch.no_grad():
        want = unmerged(input_ids=ids).logits
        plain = load_teacher_model(tiny_teacher_dir, dtype="float32")(input_ids=ids).logits
        assert (want - plain).abs().max() > 1e-2  # the adapter changes the teacher
        torch.testing.assert_close(merged_folder(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged_on_load(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_adapter_is_served_identically_by_direct_cached_and_network_teachers(
    finetuned, tiny_teacher_dir, tiny_tokenizer, tmp_path
):
    from training.teachers.cache.build import main as cache_main
    from tests.servers import ServerProcess
    from training.teachers.cached import CachedTeacher
    from training.teachers.network import NetworkTeacher

    _, out, _ = finetuned
    adapter, k = str(out / "adapter"), 16
    rows = [tiny_tokenizer(t)["input_ids"] for t in default_texts(6)]
    data = str(tmp_path / "tokens.parquet")
    pq.write_table(pa.table({"input_ids": rows}), data)
    width = max(map(len, rows))
    ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    real = mask.bool()

    direct = DirectTeacher(tiny_teacher_dir, adapter=adapter, dtype="float32").topk(ids, mask, k)
    base = DirectTeacher(tiny_teacher_dir, dtype="float32").topk(ids, mask, k)
    assert not torch.equal(direct.token_ids[real], base.token_ids[real])  # the adapter is really in the answers
    merged = DirectTeacher(str(out / "merged"), dtype="float32").topk(ids, mask, k)
    assert torch.equal(merged.token_ids[real], direct.token_ids[real])

    cache = tmp_path / "cache"
    assert cache_main(["--teacher", tiny_teacher_dir, "--adapter", adapter, "--data", data, "--output", str(cache),
                       "--topk", str(k), "--dtype", "float32", "--encoding", "naive", "--no-progress"]) == 0
    cached = CachedTeacher(str(cache), topk=k).topk(ids, mask, k)
    assert torch.equal(cached.token_ids[real], direct.token_ids[real])
    torch.testing.assert_close(cached.logprobs[real], direct.logprobs[real], atol=2e-3, rtol=0)  # fp16 in the cache

    server_args = ["--model", tiny_teacher_dir, "--adapter", adapter, "--dtype", "float32", "--max-k", "64"]
    with ServerProcess(server_args, log_path=str(tmp_path / "server.log"), env={"OMP_NUM_THREADS": "1"}) as server:
        network = NetworkTeacher(server.url).topk(ids, mask, k)
    assert torch.equal(network.token_ids[real], direct.token_ids[real])
    torch.testing.assert_close(network.logprobs[real], direct.logprobs[real], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def other_bases(tmp_path_factory):
    """Two other teachers: the same shapes with other weights, and another width."""
    folder = tmp_path_factory.mktemp("other-bases")
    same_shape = save_tiny_teacher(folder / "same-shape", seed=1)
    wider = save_tiny_teacher(folder / "wider", hidden_size=96)
    return same_shape, wider


def test_adapter_for_another_base_with_the_same_shapes_is_refused(finetuned, other_bases):
    _, out, _ = finetuned
    with pytest.raises(ValueError, match="was made for base model .* different weights"):
        load_teacher_model(other_bases[0], adapter=str(out / "adapter"))


def test_adapter_for_another_architecture_is_a_clear_error(finetuned, other_bases, tmp_path):
    _, out, _ = finetuned
    # a foreign adapter (no teacher_base.json): caught by the shape check, not dumped as a state-dict error
    foreign = tmp_path / "foreign-adapter"
    foreign.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (foreign / name).write_bytes((out / "adapter" / name).read_bytes())
    with pytest.raises(ValueError, match="does not fit the teacher .* pass the base model the adapter was trained on"):
        load_teacher_model(other_bases[1], adapter=str(foreign))


def test_missing_or_non_adapter_folders_are_clear_errors(tiny_teacher_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher adapter folder .* does not exist"):
        load_teacher_model(tiny_teacher_dir, adapter=str(tmp_path / "no-such-adapter"))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_teacher_model(tiny_teacher_dir, adapter=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="teacher adapter folder"):
        DirectTeacher(tiny_teacher_dir, adapter=str(tmp_path / "no-such-adapter"))


def test_example_config_loads_and_bad_keys_fail(tiny_teacher_dir, tmp_path):
    from training.trainers.distillation_config import load_config

    data = story_file(str(tmp_path), 10)
    example = os.path.join(REPO, "examples", "configs", "teacher_ft.yaml")
    config = load_config(example, ["--teacher_model", tiny_teacher_dir, "--train_data", data],
                         config_class=TeacherFinetuneConfig)
    assert config.eval_fraction == 0.1 and config.save_merged and config.lora_config().r == 16
    # no GPU here: SFTConfig's GPU defaults are off, plain LoRA
    assert (config.bf16, config.gradient_checkpointing, config.use_qlora) == (False, False, False)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"teacher_model: {tiny_teacher_dir}\ntrain_data: {data}\nlora_alpah: 8\n")
    with pytest.raises(ValueError, match="unknown config key 'lora_alpah'.*did you mean 'lora_alpha'"):
        load_config(str(bad), config_class=TeacherFinetuneConfig)
    with pytest.raises(ValueError, match="config key 'eval_fraction'"):
        load_config(example, ["--teacher_model", tiny_teacher_dir, "--train_data", data, "--eval_fraction", "1.5"],
                    config_class=TeacherFinetuneConfig)
    with pytest.raises(FileNotFoundError, match="config key 'train_data'"):
        load_config(example, ["--teacher_model", tiny_teacher_dir, "--train_data", str(tmp_path / "none.txt")],
                    config_class=TeacherFinetuneConfig)


def test_chat_records_train_on_assistant_turns_only(tiny_tokenizer, tmp_path):
    records = [(f"line {i}", {"messages": [{"role": "user", "content": "say a number"},
                                          {"role": "assistant", "content": f"the number {i}"}]}) for i in range(3)]
    dataset = tokenize_records(records, tiny_tokenizer, max_length=None)
    for row in dataset:
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        assert tiny_tokenizer.decode(trained).startswith("the number")
        assert len(trained) < len(row["input_ids"]) / 2


@pytest.mark.slow
def test_accelerate_launch_with_trl_gpu_defaults_on_cpu(tiny_teacher_dir, tmp_path):
    """The same CLI under `accelerate launch`, with SFTConfig's GPU habits (gradient checkpointing) forced on."""
    data = story_file(str(tmp_path), 40)
    out = tmp_path / "out"
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--config_file", "examples/accelerate/single.yaml", "--cpu", "-m",
           "training.finetune_teacher", "--config", "examples/configs/teacher_ft.yaml",
           *ft_args(tiny_teacher_dir, data, out, "--gradient_checkpointing", "true", "--max_steps", "3",
                    "--save_merged", "false")]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teacher held-out loss: before" in proc.stdout
    result = json.loads((out / RESULT_FILE).read_text())
    assert result["global_step"] == 3 and result["merged"] is None and not (out / "merged").exists()


def test_shard_folder_gives_the_same_rows_as_the_file_it_was_made_from(tiny_teacher_dir, tiny_tokenizer, tmp_path):
    """The teacher can be corrected on the student's preprocessed shards: same rows, same held-out split."""
    from training.data.preprocess import main as preprocess

    data = story_file(str(tmp_path), 30)
    shards = tmp_path / "shards"
    assert preprocess(["--input", data, "--output", str(shards), "--tokenizer", tiny_teacher_dir,
                       "--shard_size", "7"]) == 0
    from_file = TeacherFinetuneConfig(teacher_model=tiny_teacher_dir, train_data=data, output_dir=str(tmp_path / "a"))
    from_shards = TeacherFinetuneConfig(teacher_model=tiny_teacher_dir, train_data=str(shards),
                                        output_dir=str(tmp_path / "b"))
    for a, b in zip(train_eval_datasets(from_file, tiny_tokenizer), train_eval_datasets(from_shards, tiny_tokenizer)):
        assert len(a) == len(b) and len(b) > 0
        assert [list(r) for r in a["input_ids"]] == [list(r) for r in b["input_ids"]]
        assert [list(r) for r in a["labels"]] == [list(r) for r in b["labels"]]


def test_base_fingerprint_ignores_the_storage_dtype_but_not_the_weights(tiny_teacher_dir, other_bases, tmp_path):
    from transformers import AutoModelForCausalLM

    from training.teachers.adapter import base_fingerprint

    bf16 = tmp_path / "bf16-copy"
    AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    assert base_fingerprint(str(bf16)) == base_fingerprint(tiny_teacher_dir)
    assert base_fingerprint(other_bases[0]) != base_fingerprint(tiny_teacher_dir)
    (tmp_path / "no-weights").mkdir()
    assert base_fingerprint(str(tmp_path / "no-weights")) is None
    assert base_fingerprint(str(tmp_path / "not-there")) is None

"""DirectTeacher: local Hub-layout folders, Hub ids, chunked top-k, clear errors."""

import pytest
import torch

from training import DirectTeacher
from training.utils.paths import looks_like_local_path
from training.teachers.direct import load_teacher_model, topk_logprobs


@pytest.mark.parametrize(
    "value, local",
    [("meta-llama/Llama-3.2-1B-Instruct", False), ("gpt2", False), ("/models/llama", True), ("./teacher", True),
     ("~/teacher", True), ("runs/a/checkpoint-3", True)],
)
def test_hub_ids_and_paths_are_told_apart(value, local):
    assert looks_like_local_path(value) is local


def test_hub_id_goes_to_the_hub_not_to_a_missing_folder(monkeypatch):
    """The real-teacher path stays real: a Hub id is handed, unchanged, to from_pretrained (which is stubbed here:
    no network), not refused as a missing local folder."""
    from transformers import AutoModelForCausalLM

    calls = []

    class Reached(Exception):
        pass

    def fake_from_pretrained(name, *args, **kwargs):
        calls.append((name, kwargs.get("use_safetensors")))
        raise Reached

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(Reached):
        load_teacher_model("meta-llama/Llama-3.2-1B-Instruct")
    assert calls == [("meta-llama/Llama-3.2-1B-Instruct", True)]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher model folder .* does not exist"):
        load_teacher_model(str(tmp_path / "nope"))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("rows_per_chunk", [1, 3, 1024])
def test_chunked_topk_equals_log_softmax_topk(temperature, rows_per_chunk):
    logits = torch.randn(2, 5, 300, dtype=torch.bfloat16)
    values, ids = topk_logprobs(logits, 17, temperature, rows_per_chunk)
    ref_values, ref_ids = torch.log_softmax(logits.float() / temperature, -1).topk(17, dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)


def test_direct_teacher_from_hub_layout_folder(tiny_teacher_dir):
    teacher = DirectTeacher(tiny_teacher_dir)
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    ids = torch.randint(0, teacher.vocab_size, (2, 6))
    out = teacher.topk(ids, torch.ones_like(ids), k=8)
    out.validate(2, 6, 8)
    assert torch.all(out.logprobs[..., :-1] >= out.logprobs[..., 1:])
    with pytest.raises(ValueError, match="teacher_topk"):
        teacher.topk(ids, None, k=teacher.vocab_size + 1)

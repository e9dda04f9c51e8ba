"""training.convert_gguf: a tiny Llama written as GGUF (F32, F16, Q8_0, Q4_1) loads with transformers, converts to a
folder with identical logits and tokenizer, serves as a teacher wherever a teacher is loaded, and wrong files fail
with one clear line."""

import json
import os
import threading
import time

import pytest
import torch

from tests.training.tiny_gguf import build_chat_tokenizer, build_llama, write_gguf, write_tiny_chat_gguf
from training.converters import gguf as cg

gguf = pytest.importorskip("gguf")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cg.CACHE_ENV, str(tmp_path / "hf_retnet_cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(F32 gguf path, tokenizer, the HF model it was written from)."""
    return write_tiny_chat_gguf(tmp_path_factory.mktemp("gguf") / "tiny-chat.F32.gguf", "F32")


def gguf_loaded(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(path), os.path.basename(path)
    return (AutoTokenizer.from_pretrained(folder, gguf_file=name),
            AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval())


def chat_ids(tokenizer):
    conv = [{"role": "user", "content": "Can you write a poem?"}, {"role": "assistant", "content": "The cat likes music."}]
    return torch.tensor([tokenizer.apply_chat_template(conv, return_dict=True)["input_ids"]])


def test_the_test_file_loads_with_transformers_like_its_source(tiny):
    path, tokenizer, source = tiny
    tok, model = gguf_loaded(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.chat_template == tokenizer.chat_template
    meta = cg.inspect_gguf(path).metadata  # the file names its special tokens (transformers 5.2 misreads eos, pad)
    named = [tokenizer.convert_ids_to_tokens(meta[key]) for key in ("bos_token_id", "eos_token_id", "padding_token_id")]
    assert named == ["<|im_start|>", "<|im_end|>", "<|im_end|>"]
    text = "Please describes the weather? 12 times. Thanks!"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    x = chat_ids(tokenizer)
    with torch.no_grad():  # F32 tensors, llama.cpp's q/k permutation undone: the very same logits
        torch.testing.assert_close(model(x).logits, source(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "Q8_0", "mixed"])  # mixed: Q8_0 embedding, Q4_1 attention, F16 FFN
def test_convert_gives_the_gguf_models_logits_and_tokenizer(tmp_path, tensor_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, tokenizer, _ = write_tiny_chat_gguf(tmp_path / f"tiny.{tensor_type}.gguf", tensor_type)
    report = cg.convert_gguf(path, tmp_path / "out", log=lambda m: None)
    check = report["logits_check"]
    assert check["passed"] and check["max_abs_diff"] <= cg.LOGITS_TOLERANCE and check["tokens"] > 60
    out = str(tmp_path / "out")
    assert sorted(n for n in os.listdir(out) if not n.startswith("tokenizer")) == [
        "chat_template.jinja", "config.json", "generation_config.json", "gguf_source.json", "model.safetensors"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == tokenizer.eos_token_id
    source = json.load(open(os.path.join(out, cg.SOURCE_FILE)))
    assert source["sha256"] == cg.gguf_sha256(path) and source["architecture"] == "llama"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging folder left behind
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(os.path.join(out, "model.safetensors")).st_mode & 0o777 == 0o666 & ~mask  # not safetensors' 0600

    gguf_tok, gguf_model = gguf_loaded(path)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert tok.chat_template == gguf_tok.chat_template == tokenizer.chat_template
    # the special tokens the file names (transformers' own GGUF reading may differ: 5.2-5.12 take bos for eos)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                                      tokenizer.pad_token_id)
    x = chat_ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(model(x).logits, gguf_model(x).logits)


def test_cli_refuses_a_non_empty_output_unless_overwrite(tmp_path, tiny, capsys):
    path = tiny[0]
    out = tmp_path / "out"
    assert cg.main([path, "--output", str(out)]) == 0
    printed = capsys.readouterr()
    assert "logits check on 3 sequences" in printed.err and "max |diff| 0" in printed.err
    assert cg.main([path, "--output", str(out)]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert cg.main([path, "--output", str(out), "--overwrite"]) == 0
    (tmp_path / "empty").mkdir()
    assert cg.main([path, "--output", str(tmp_path / "empty")]) == 0  # an empty folder is fine
    with pytest.raises(SystemExit) as exit_:
        cg.main(["--help"])
    assert exit_.value.code == 0
    assert "Q4_1" in capsys.readouterr().out


def _write_variant(path, architecture="llama", tensor_type="F32", name="tiny-chat"):
    tokenizer = build_chat_tokenizer()
    return write_gguf(build_llama(len(tokenizer)), tokenizer, path, tensor_type, architecture=architecture, name=name)


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_text("not a model\n") and str(p), r"not a GGUF file \(it starts with b'not '"),
    (lambda p: _write_variant(p, architecture="qwen2"),
     r"architecture 'qwen2' \(transformers loads it as a 'qwen2' model, not a Llama\); only Llama .* supported: llama"),
    (lambda p: _write_variant(p, architecture="madeup"),
     r"architecture 'madeup' \(transformers' GGUF loader does not support it\)"),
    (lambda p: _write_variant(p, name="mistral-7b-tiny"), r"which transformers loads as a Mistral model"),
    (lambda p: _write_variant(p, tensor_type="F64"),
     r"tensor type F64 \(15 tensors\) cannot be dequantized .*; supported: F32, F16, Q4_0, Q4_1"),
])
def test_wrong_files_fail_with_one_line_naming_file_found_and_supported(tmp_path, make, match, capsys):
    path = tmp_path / "bad.gguf"
    path = make(path) or str(path)
    with pytest.raises(cg.GGUFError, match=match) as err:
        cg.inspect_gguf(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert cg.main([str(path), "--output", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert_gguf: error: ")
    assert not (tmp_path / "out").exists()


def test_a_truncated_file_is_reported_as_corrupt(tmp_path, tiny):
    data = open(tiny[0], "rb").read()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(cg.GGUFError, match=r"cut\.gguf: corrupt or truncated GGUF file"):
        cg.inspect_gguf(path)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        cg.inspect_gguf(tmp_path / "missing.gguf")


def test_resolve_pretrained_converts_once_into_a_content_addressed_cache(tmp_path, tiny, monkeypatch):
    path = tiny[0]
    assert cg.resolve_pretrained("org/model") == "org/model"
    assert cg.resolve_pretrained(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="GGUF file .* does not exist"):
        cg.resolve_pretrained(str(tmp_path / "nope.gguf"))

    calls = []
    real = cg.convert_gguf

    def counting(*args, **kwargs):
        calls.append(args)
        time.sleep(0.3)  # the other thread arrives meanwhile and must wait on the lock, not convert again
        return real(*args, **kwargs)

    monkeypatch.setattr(cg, "convert_gguf", counting)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cg.resolve_pretrained(path, log=lambda m: None)))
               for _ in range(2)]  # two resolvers at once: the lock lets one convert, the other reuses it
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    folder = results[0]
    assert results == [folder, folder] and len(calls) == 1
    assert folder == os.path.join(str(tmp_path / "hf_retnet_cache"), "gguf",
                                  f"tiny-chat.F32-{cg.gguf_sha256(path)[:16]}")
    assert cg.resolve_pretrained(path) == folder and len(calls) == 1  # reused
    copy = tmp_path / "renamed.gguf"  # the same content elsewhere converts into its own stem's folder, once
    copy.write_bytes(open(path, "rb").read())
    assert cg.resolve_pretrained(str(copy), log=lambda m: None).endswith(f"renamed-{cg.gguf_sha256(path)[:16]}")


def test_a_gguf_teacher_works_wherever_a_teacher_is_loaded(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    from training.teachers.cache.build import teacher_identity
    from training.trainers.distillation_config import DistillationConfig
    from training.evaluation import loading
    from training.teachers.server.app import build_engine, parse_args
    from training.teachers.direct import DirectTeacher
    from training.trainers.distillation import build_tokenizer, teacher_vocab_size

    path, tokenizer, _ = tiny
    folder = cg.resolve_pretrained(path, log=lambda m: None)
    x = chat_ids(tokenizer)
    mask = torch.ones_like(x)
    want = DirectTeacher(folder, dtype="float32").topk(x, mask, k=8)
    got = DirectTeacher(path, dtype="float32").topk(x, mask, k=8)  # the direct teacher takes the .gguf path
    assert torch.equal(got.token_ids, want.token_ids) and torch.equal(got.logprobs, want.logprobs)

    config = DistillationConfig(output_dir=str(tmp_path / "run"), teacher_model=path, report_to="none")
    assert config.tokenizer == path
    assert build_tokenizer(config).chat_template == tokenizer.chat_template
    assert teacher_vocab_size(config) == len(tokenizer)
    with pytest.raises(FileNotFoundError, match="GGUF file .* does not exist"):
        DistillationConfig(output_dir=str(tmp_path / "run"), teacher_model=str(tmp_path / "none.gguf"),
                           report_to="none")

    assert type(loading.load_causal_lm(path, "teacher")).__name__ == "LlamaForCausalLM"
    assert loading.load_tokenizer(path, "teacher").chat_template == tokenizer.chat_template
    engine = build_engine(parse_args(["--model", path, "--device", "cpu", "--dtype", "float32"]))
    assert engine.vocab_size == len(tokenizer)
    identity = teacher_identity(path, None)
    assert identity["id"] == path and identity["revision"] == "sha256:" + cg.gguf_sha256(path)
    llama = AutoModelForCausalLM.from_pretrained(cg.resolve_pretrained(path))  # what training.align loads
    assert type(llama).__name__ == "LlamaForCausalLM"

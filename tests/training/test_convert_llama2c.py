"""llama2.c -> Hugging Face conversion: the real stories260K teacher, a numpy port of run.c's forward pass,
and a pure-Python port of run.c's encoder as references."""

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from training.converters.llama2c import (
    Llama2cFormatError,
    build_tokenizer,
    convert_llama2c,
    main,
    read_checkpoint,
    read_tokenizer,
    to_llama,
)

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
CKPT, TOK, STORIES = DEMO / "stories260K.bin", DEMO / "tok512.bin", DEMO / "tinystories_4000.txt"


def paragraphs():
    return [p.strip() for p in STORIES.read_text(encoding="utf-8").split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_llama2c(CKPT, TOK, tmp_path_factory.mktemp("l2c") / "stories260K")


@pytest.fixture(scope="module")
def loaded(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(converted).eval(), AutoTokenizer.from_pretrained(converted)


# ---------------------------------------------------------------------------------- references (run.c ports)


def llama2c_encode(pieces, text):
    """run.c's encode(text, bos=1, eos=0), statement for statement."""
    lookup = {b: i for i, (b, _) in enumerate(pieces)}
    tokens = [1]
    if text:
        tokens.append(lookup[b" "])
    for ch in text:
        b = ch.encode("utf-8")
        if b in lookup:
            tokens.append(lookup[b])
        else:
            tokens.extend(x + 3 for x in b)
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            j = lookup.get(pieces[tokens[i]][0] + pieces[tokens[i + 1]][0])
            if j is not None and pieces[j][1] > best_score:
                best_score, best_id, best_idx = pieces[j][1], j, i
        if best_idx == -1:
            return tokens
        tokens[best_idx : best_idx + 2] = [best_id]


def _rmsnorm(x, w):
    return w * x / np.sqrt(np.mean(x * x) + 1e-5)


def llama2c_forward(header, a, tokens):
    """run.c's forward(), one position at a time with a KV cache, interleaved-pair RoPE: logits per position."""
    L, d, hd = header.n_layers, header.dim, header.head_dim
    rep = header.n_heads // header.n_kv_heads
    kc = np.zeros((L, len(tokens), header.kv_dim))
    vc = np.zeros_like(kc)
    wcls = a["token_embedding"] if header.shared_classifier else a["wcls"]
    out = []
    for pos, tok in enumerate(tokens):
        x = a["token_embedding"][tok].astype(np.float64)
        for l in range(L):
            xb = _rmsnorm(x, a["rms_att"][l])
            q, k, v = a["wq"][l] @ xb, a["wk"][l] @ xb, a["wv"][l] @ xb
            for i in range(0, d, 2):
                freq = 1.0 / 10000.0 ** ((i % hd) / hd)
                c, s = math.cos(pos * freq), math.sin(pos * freq)
                for vec in (q, k) if i < header.kv_dim else (q,):
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i], vec[i + 1] = v0 * c - v1 * s, v0 * s + v1 * c
            kc[l, pos], vc[l, pos] = k, v
            att_out = np.zeros(d)
            for h in range(header.n_heads):
                kvh = h // rep
                qh = q[h * hd : (h + 1) * hd]
                keys = kc[l, : pos + 1, kvh * hd : (kvh + 1) * hd]
                sc = keys @ qh / math.sqrt(hd)
                p = np.exp(sc - sc.max())
                p /= p.sum()
                att_out[h * hd : (h + 1) * hd] = p @ vc[l, : pos + 1, kvh * hd : (kvh + 1) * hd]
            x = x + a["wo"][l] @ att_out
            xb = _rmsnorm(x, a["rms_ffn"][l])
            h1, h3 = a["w1"][l] @ xb, a["w3"][l] @ xb
            x = x + a["w2"][l] @ (h1 / (1 + np.exp(-h1)) * h3)
        out.append(wcls @ _rmsnorm(x, a["rms_final"]))
    return np.stack(out)


def write_legacy(path, dim, hidden, layers, heads, kv_heads, vocab, seq_len, shared, seed=0):
    """A random legacy-format checkpoint (the layout llama2.c's export.py legacy_export writes)."""
    rng = np.random.default_rng(seed)
    hd, kv = dim // heads, dim // heads * kv_heads
    shapes = [(vocab, dim), (layers, dim), (layers, dim, dim), (layers, kv, dim), (layers, kv, dim)]
    shapes += [(layers, dim, dim), (layers, dim), (layers, hidden, dim), (layers, dim, hidden), (layers, hidden, dim)]
    shapes += [(dim,), (seq_len * hd // 2,), (seq_len * hd // 2,)] + ([] if shared else [(vocab, dim)])
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab if shared else -vocab, seq_len))
        for s in shapes:
            a = rng.normal(0, 0.3, s) + (1.0 if len(s) <= 2 and s[-1] == dim and s != (vocab, dim) else 0.0)
            f.write(a.astype("<f4").tobytes())
    return path


# ---------------------------------------------------------------------------------- the real teacher


def test_greedy_story_from_bos(loaded):
    model, tok = loaded
    out = model.generate(torch.tensor([[1]]), max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith(
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    ), text


def test_teacher_loss_on_held_out_stories(loaded):
    """Mean next-token loss over whole BOS-prefixed paragraphs (the demo's held-out split: the last 400).

    Measured: 1.8241 nats/token (perplexity 6.20) on the last 200 paragraphs; a wrong RoPE layout, norm
    epsilon, tied classifier or tokenizer moves it by far more than the band.
    """
    model, tok = loaded
    total, count = 0.0, 0
    with torch.no_grad():
        for p in paragraphs()[-200:]:
            ids = torch.tensor([tok(p).input_ids])
            n = ids.shape[1] - 1
            total += model(ids, labels=ids).loss.item() * n
            count += n
    assert abs(total / count - 1.8241) < 0.005, total / count


def test_matches_run_c_forward(loaded):
    """Logits equal a numpy port of run.c's forward (interleaved RoPE) on a real sentence."""
    model, tok = loaded
    header, arrays = read_checkpoint(CKPT)
    ids = tok("Once upon a time, Tom had a red ball.").input_ids
    ref = llama2c_forward(header, arrays, ids)
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double().numpy()
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)


EDGE_TEXTS = [
    "",
    "a",
    " ",
    "  two  spaces  ",
    "Line one.\nLine two.\n\n",
    "tab\there",
    'Unicode: café, naïve, 東京, emoji 🐶 and — dashes…',
    "<s> is text here, not BOS </s> <unk>",
    "<0x41> looks like a byte piece",
    "ALL CAPS SHOUTING!!! 1234567890",
]


def test_tokenizer_equals_run_c_encoder(loaded):
    """Every 8th TinyStories paragraph (500 of them) plus edge cases encode to run.c's ids exactly."""
    _, tok = loaded
    pieces = read_tokenizer(TOK, 512)
    texts = paragraphs()[::8] + EDGE_TEXTS
    got = tok(texts).input_ids
    mismatches = [(t, g) for t, g in zip(texts, got) if g != llama2c_encode(pieces, t)]
    assert not mismatches, mismatches[:3]


@pytest.mark.parametrize("text", ["Once upon a time, there was a dog.", "café 🐶\nnew line"])
def test_decode_inverts_encode(loaded, text):
    _, tok = loaded
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_round_trip_save_load(loaded, tmp_path):
    """The loaded folder saves and reloads through the Auto classes with identical logits and ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = loaded
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model2, tok2 = AutoModelForCausalLM.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    text = paragraphs()[3]
    assert tok2(text).input_ids == tok(text).input_ids
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model2(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert model2.config.tie_word_embeddings and model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()
    assert (tmp_path / "model.safetensors").is_file()
    assert (tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id, tok2.unk_token_id) == (1, 2, 0, 0)


# ---------------------------------------------------------------------------------- layouts the demo does not use


@pytest.mark.parametrize("heads,kv_heads,shared", [(4, 4, True), (4, 2, False), (4, 1, True)])
def test_random_checkpoint_layouts(tmp_path, heads, kv_heads, shared):
    """Grouped-query attention and an untied classifier (negative vocab_size) against the run.c port."""
    path = write_legacy(tmp_path / "m.bin", 32, 48, 2, heads, kv_heads, 40, 16, shared)
    header, arrays = read_checkpoint(path)
    assert (header.n_kv_heads, header.shared_classifier, header.vocab_size) == (kv_heads, shared, 40)
    model = to_llama(header, arrays)
    ids = [1, 5, 9, 33, 2, 17, 39, 4]
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double().numpy()
    np.testing.assert_allclose(got, llama2c_forward(header, arrays, ids), atol=1e-4, rtol=0)
    assert model.config.tie_word_embeddings == shared


# ---------------------------------------------------------------------------------- bad input


def test_truncated_checkpoint_is_named(tmp_path):
    bad = tmp_path / "cut.bin"
    bad.write_bytes(CKPT.read_bytes()[:500_000])
    with pytest.raises(Llama2cFormatError, match="truncated"):
        read_checkpoint(bad)


def test_tokenizer_given_as_checkpoint(tmp_path):
    with pytest.raises(Llama2cFormatError, match="not a llama2.c checkpoint header"):
        read_checkpoint(TOK)


def test_versioned_export_is_refused_with_fix(tmp_path):
    bad = tmp_path / "v1.bin"
    bad.write_bytes(struct.pack("<Ii", 0x616B3432, 1) + bytes(248))
    with pytest.raises(Llama2cFormatError, match="--version 0"):
        read_checkpoint(bad)


def test_nan_weights_are_refused(tmp_path):
    raw = bytearray(CKPT.read_bytes())
    raw[28 + 4 * 100 : 28 + 4 * 101] = struct.pack("<f", float("nan"))
    bad = tmp_path / "nan.bin"
    bad.write_bytes(bytes(raw))
    with pytest.raises(Llama2cFormatError, match="token_embedding holds NaN"):
        read_checkpoint(bad)


def test_truncated_tokenizer_and_wrong_vocab(tmp_path):
    cut = tmp_path / "tok.bin"
    cut.write_bytes(TOK.read_bytes()[:-3])
    with pytest.raises(Llama2cFormatError, match="truncated"):
        read_tokenizer(cut, 512)
    with pytest.raises(Llama2cFormatError, match="larger vocabulary"):
        read_tokenizer(TOK, 300)
    with pytest.raises(Llama2cFormatError, match="holds 512 tokens"):
        read_tokenizer(TOK, 1000)


def test_cli_reports_errors_and_refuses_overwrite(tmp_path, capsys):
    bad = tmp_path / "cut.bin"
    bad.write_bytes(CKPT.read_bytes()[:1000])
    assert main(["--checkpoint", str(bad), "--tokenizer", str(TOK), "--output", str(tmp_path / "o")]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written
    out = tmp_path / "ok"
    assert main(["--checkpoint", str(CKPT), "--output", str(out)]) == 0
    assert (out / "config.json").is_file()
    assert main(["--checkpoint", str(CKPT), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_build_tokenizer_rejects_wrong_byte_pieces():
    pieces = read_tokenizer(TOK, 512)
    pieces[3 + 65] = (b"byte65", 0.0)
    with pytest.raises(Llama2cFormatError, match="byte-fallback piece <0x41>"):
        build_tokenizer(pieces)

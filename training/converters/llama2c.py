"""Convert llama2.c checkpoints and ``tokenizer.bin`` files to a Hugging Face Llama folder.

llama2.c (Andrej Karpathy) trains and exports small Llamas in its own binary formats. This tool turns
one into a folder that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load like any Hub Llama, so such a
model can be a distillation teacher (or anything else transformers does):

    python -m training.convert_llama2c --checkpoint stories260K.bin --tokenizer tok512.bin --output runs/teacher

What the formats hold and why the conversion is more than a copy:

* Checkpoint ("legacy" export, llama2.c ``export.py --version 0`` / ``model.bin``): a header of seven
  little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len), then fp32
  arrays, each matrix ``[out, in]``: token embedding, attention RMSNorm weights, wq, wk, wv, wo, FFN
  RMSNorm weights, w1, w2, w3, the final RMSNorm weight, two RoPE tables (unused here), and the classifier
  only when ``vocab_size`` is negative (a positive one means it shares the token embedding).
* llama2.c rotates *interleaved* pairs (x0, x1), (x2, x3), ... of each head; transformers' Llama rotates
  the two *halves* of each head. Permuting the rows of wq and wk within each head (even rows first, then
  odd rows) makes the two computations identical.
* Tokenizer (``tokenizer.bin``): int32 max_token_length, then per token float32 score, int32 length,
  bytes. llama2.c encodes as: BOS, a space prepended to the text, one piece per UTF-8 character (byte
  fallback ``<0xXX>`` pieces when the character is not a token), then repeatedly merge the adjacent pair
  whose concatenation is the token with the highest score. That is a BPE whose merges are every pair of
  tokens that concatenates to a token, ranked by the result's score, which is what we build with the
  ``tokenizers`` library (exact when no two mergeable tokens share a score; sentencepiece scores are
  ``-rank``, so they never do; a tie is reported).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.utils.errors import command
from training.utils.io import staged_folder

__all__ = [
    "Llama2cFormatError",
    "Llama2cHeader",
    "read_checkpoint",
    "read_tokenizer",
    "build_tokenizer",
    "to_llama",
    "convert_llama2c",
    "main",
]

_HEADER = struct.Struct("<7i")
_VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c export.py --version 1 / 2 files start with this
_MAX_DIM = 1 << 20  # header values above this mean the file is not a llama2.c checkpoint


class Llama2cFormatError(ValueError):
    """A file is not a (complete, uncorrupted) llama2.c checkpoint or tokenizer."""


@dataclass(frozen=True)
class Llama2cHeader:
    """The seven integers at the start of a legacy llama2.c checkpoint."""

    dim: int  # model width (hidden_size)
    hidden_dim: int  # SwiGLU width (intermediate_size)
    n_layers: int
    n_heads: int
    n_kv_heads: int  # grouped-query attention: key/value heads, dividing n_heads
    vocab_size: int  # absolute value; see shared_classifier
    seq_len: int  # training context (max_position_embeddings)
    shared_classifier: bool  # True when the header's vocab_size was positive

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    def array_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """The fp32 arrays after the header, in file order (name, shape)."""
        L, d, h, kv, V = self.n_layers, self.dim, self.hidden_dim, self.kv_dim, self.vocab_size
        shapes = [
            ("token_embedding", (V, d)),
            ("rms_att", (L, d)),
            ("wq", (L, d, d)),
            ("wk", (L, kv, d)),
            ("wv", (L, kv, d)),
            ("wo", (L, d, d)),
            ("rms_ffn", (L, d)),
            ("w1", (L, h, d)),
            ("w2", (L, d, h)),
            ("w3", (L, h, d)),
            ("rms_final", (d,)),
            ("rope_cos", (self.seq_len * self.head_dim // 2,)),
            ("rope_sin", (self.seq_len * self.head_dim // 2,)),
        ]
        if not self.shared_classifier:
            shapes.append(("wcls", (V, d)))
        return shapes

    def expected_bytes(self) -> int:
        return _HEADER.size + 4 * sum(int(np.prod(s)) for _, s in self.array_shapes())


def _parse_header(raw: bytes, path: Path) -> Llama2cHeader:
    if len(raw) < _HEADER.size:
        raise Llama2cFormatError(
            f"{path}: {len(raw)} bytes is too short for a llama2.c checkpoint (the header alone is 28 bytes); "
            "the file is truncated or not a llama2.c model."
        )
    if struct.unpack_from("<I", raw, 0)[0] == _VERSIONED_MAGIC:
        version = struct.unpack_from("<i", raw, 4)[0]
        raise Llama2cFormatError(
            f"{path}: this is a llama2.c 'ak42' version-{version} export; only the legacy format (the one run.c "
            "reads) is supported. Re-export it with llama2.c's `python export.py out.bin --version 0 "
            "--checkpoint ckpt.pt`."
        )
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = _HEADER.unpack_from(raw, 0)
    named = dict(dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, seq_len=seq_len)
    bad = {k: v for k, v in named.items() if not 0 < v <= _MAX_DIM}
    if bad or vocab == 0 or abs(vocab) > _MAX_DIM:
        raise Llama2cFormatError(
            f"{path}: header {dict(named, vocab_size=vocab)} is not a llama2.c checkpoint header (each value must "
            f"be a positive int32 <= {_MAX_DIM}, vocab_size non-zero). Is this the tokenizer, or another format?"
        )
    if dim % heads or heads % kv_heads or (dim // heads) % 2:
        raise Llama2cFormatError(
            f"{path}: inconsistent header: dim {dim} must divide into n_heads {heads} even-sized heads and "
            f"n_heads must be a multiple of n_kv_heads {kv_heads}. The file is corrupt or not a llama2.c model."
        )
    return Llama2cHeader(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, shared_classifier=vocab > 0)


def read_checkpoint(path: str | os.PathLike) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """Read a legacy llama2.c checkpoint: its header and every fp32 array by name (see ``array_shapes``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint not found: {path}")
    raw = path.read_bytes()
    header = _parse_header(raw, path)
    expected = header.expected_bytes()
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise Llama2cFormatError(
            f"{path}: {len(raw)} bytes, but a legacy llama2.c checkpoint with header {header} has {expected} "
            f"bytes; the file is {what} (an interrupted download or copy, or a different format)."
        )
    arrays, offset = {}, _HEADER.size
    for name, shape in header.array_shapes():
        n = int(np.prod(shape))
        arrays[name] = np.frombuffer(raw, dtype="<f4", count=n, offset=offset).reshape(shape)
        offset += 4 * n
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            raise Llama2cFormatError(f"{path}: array {name} holds NaN or infinite values; the file is corrupt.")
    return header, arrays


def read_tokenizer(path: str | os.PathLike, vocab_size: int | None = None) -> list[tuple[bytes, float]]:
    """Read a llama2.c ``tokenizer.bin``: (piece bytes, score) per token id.

    The file does not store its size (run.c takes it from the model); with ``vocab_size`` the file must hold
    exactly that many tokens, without it every token up to the end is read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c tokenizer not found: {path}")
    raw = path.read_bytes()
    if len(raw) < 4:
        raise Llama2cFormatError(f"{path}: {len(raw)} bytes is too short for a llama2.c tokenizer.bin.")
    (max_len,) = struct.unpack_from("<i", raw, 0)
    if not 0 < max_len <= 4096:
        raise Llama2cFormatError(
            f"{path}: max_token_length {max_len} is not plausible; this is not a llama2.c tokenizer.bin "
            "(was the checkpoint passed as --tokenizer?)."
        )
    pieces, offset = [], 4
    while offset < len(raw) and (vocab_size is None or len(pieces) < vocab_size):
        if offset + 8 > len(raw):
            raise Llama2cFormatError(f"{path}: truncated inside the entry of token {len(pieces)}.")
        score, n = struct.unpack_from("<fi", raw, offset)
        offset += 8
        if not 0 <= n <= max_len or offset + n > len(raw) or not np.isfinite(score):
            raise Llama2cFormatError(
                f"{path}: token {len(pieces)} has length {n} (max_token_length {max_len}, {len(raw) - offset} "
                f"bytes left) and score {score}; the file is truncated or corrupt."
            )
        pieces.append((raw[offset : offset + n], float(score)))
        offset += n
    if vocab_size is not None and len(pieces) < vocab_size:
        raise Llama2cFormatError(
            f"{path}: holds {len(pieces)} tokens but the checkpoint's vocabulary has {vocab_size}; the file is "
            "truncated or belongs to another model."
        )
    if offset != len(raw):
        raise Llama2cFormatError(
            f"{path}: {len(raw) - offset} bytes left after {len(pieces)} tokens; the tokenizer belongs to a model "
            f"with a larger vocabulary than {vocab_size} or is corrupt."
        )
    return pieces


# ---------------------------------------------------------------------------------------------- tokenizer

_SPECIAL = {0: "<unk>", 1: "<s>", 2: "</s>"}


def _piece_strings(pieces: list[tuple[bytes, float]]) -> list[str]:
    """Token strings for the HF vocabulary: UTF-8 pieces; ids 0-2 get the usual names (llama2.c writes BOS
    and EOS as "\\n<s>\\n" and "\\n</s>\\n")."""
    strings = []
    for i, (b, _) in enumerate(pieces):
        if i in _SPECIAL:
            strings.append(_SPECIAL[i])
            continue
        try:
            strings.append(b.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise Llama2cFormatError(f"token {i} ({b!r}) is not valid UTF-8: {e}") from None
    seen: dict[str, int] = {}
    for i, s in enumerate(strings):
        if s in seen:
            raise Llama2cFormatError(
                f"tokens {seen[s]} and {i} are the same piece {s!r}; a llama2.c tokenizer has unique pieces."
            )
        seen[s] = i
    for b in range(256):
        if strings[3 + b] != f"<0x{b:02X}>":
            raise Llama2cFormatError(
                f"token {3 + b} is {strings[3 + b]!r}, expected the byte-fallback piece <0x{b:02X}> "
                "(llama2.c maps byte b to id b + 3)."
            )
    return strings


def build_tokenizer(pieces: list[tuple[bytes, float]], model_max_length: int | None = None):
    """A ``PreTrainedTokenizerFast`` that encodes exactly as llama2.c's ``encode(text, bos=1, eos=0)``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    strings = _piece_strings(pieces)
    vocab = {s: i for i, s in enumerate(strings)}
    # Every adjacent pair that llama2.c could merge: the two parts and their concatenation are tokens. Rank by
    # the result's score, best first; stable sort keeps id order among equal scores.
    raw_vocab = {b: i for i, (b, _) in enumerate(pieces)}
    candidates = []
    for i, (b, score) in enumerate(pieces):
        for cut in range(1, len(b)):
            left, right = raw_vocab.get(b[:cut]), raw_vocab.get(b[cut:])
            if left is not None and right is not None:
                candidates.append((-score, i, strings[left], strings[right]))
    candidates.sort(key=lambda c: (c[0], c[1]))
    scores = [c[0] for c in candidates]
    ties = {c[1] for c, s0, s1 in zip(candidates[1:], scores, scores[1:]) if s0 == s1}
    ties = {t for t in ties if any(c[1] != t and c[0] == -pieces[t][1] for c in candidates)}
    if ties:
        print(
            f"convert_llama2c: warning: {len(ties)} mergeable tokens share a score with another; llama2.c breaks "
            "such ties by position, the converted tokenizer by id, so rare texts may encode differently.",
            file=sys.stderr,
        )
    merges = [(c[2], c[3]) for c in candidates]

    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=False)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Prepend(" ")  # llama2.c's dummy prefix (only for non-empty text)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    # Decoding as llama2.c prints: byte pieces become bytes, and the dummy-prefix space after BOS goes.
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIAL.values()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        # No llama2.c text ever encodes to <unk> (byte fallback covers every character): a safe padding id, and
        # one the saved tokenizer carries, so batching code never has to invent one.
        pad_token="<unk>",
        model_max_length=model_max_length or int(1e30),
        clean_up_tokenization_spaces=False,
        # llama2.c never treats "<s>" typed in text as a control token; neither do we.
        split_special_tokens=True,
    )


# ---------------------------------------------------------------------------------------------- model


def _interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of each head from llama2.c's rotary pairs (0,1), (2,3), ... to transformers'
    (0, h/2), (1, h/2+1), ...: even rows first, then odd rows."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def to_llama(header: Llama2cHeader, arrays: dict[str, np.ndarray]):
    """Build a ``LlamaForCausalLM`` (fp32) computing exactly what llama2.c's ``forward`` computes."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        head_dim=header.head_dim,
        max_position_embeddings=header.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=header.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,  # the tokenizer pads with <unk> (never produced by encoding); config and tokenizer agree
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    t = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in arrays.items()}
    sd = {"model.embed_tokens.weight": t["token_embedding"], "model.norm.weight": t["rms_final"]}
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t["rms_att"][i]
        sd[p + "self_attn.q_proj.weight"] = _interleaved_to_halves(t["wq"][i], header.n_heads)
        sd[p + "self_attn.k_proj.weight"] = _interleaved_to_halves(t["wk"][i], header.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = t["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = t["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
        sd[p + "mlp.gate_proj.weight"] = t["w1"][i]
        sd[p + "mlp.down_proj.weight"] = t["w2"][i]
        sd[p + "mlp.up_proj.weight"] = t["w3"][i]
    sd["lm_head.weight"] = t["token_embedding"] if header.shared_classifier else t["wcls"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:  # a transformers layout change, not a user error
        raise RuntimeError(f"Llama state dict mismatch: missing {missing}, unexpected {unexpected}")
    if header.shared_classifier:
        model.tie_weights()
    # llama2.c stories models separate stories with BOS (run.c stops generating there), never EOS.
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[2, 1], pad_token_id=0)
    return model.eval()


def convert_llama2c(
    checkpoint: str | os.PathLike,
    tokenizer: str | os.PathLike | None,
    output: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Convert a llama2.c checkpoint (and its ``tokenizer.bin``) into a Hugging Face folder at ``output``.

    The folder (config, safetensors weights, generation config, tokenizer) is written next to ``output`` and
    renamed into place, so an interrupted conversion never leaves a half-written model. Returns ``output``.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        if (output / "config.json").is_file():
            raise FileExistsError(f"{output} already holds a model; pass overwrite=True (--overwrite) to replace it.")
        if output.is_file() or any(output.iterdir()):
            raise FileExistsError(f"{output} exists and is not empty; choose a new folder or pass --overwrite.")
    header, arrays = read_checkpoint(checkpoint)
    tok = None
    if tokenizer is not None:
        pieces = read_tokenizer(tokenizer, header.vocab_size)
        tok = build_tokenizer(pieces, model_max_length=header.seq_len)
    model = to_llama(header, arrays)

    with staged_folder(output) as staging:  # replaces an older `output` only once the new one is complete
        tmp = Path(staging)
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        (tmp / "llama2c_source.json").write_text(
            json.dumps(
                {
                    "checkpoint": Path(checkpoint).name,
                    "tokenizer": Path(tokenizer).name if tokenizer is not None else None,
                    "header": header.__dict__,
                    "converted_by": "python -m training.convert_llama2c",
                },
                indent=2,
            )
        )
    return output


@dataclass
class ConvertLlama2cArguments:
    """`python -m training.convert_llama2c`: every field is a flag and a YAML key."""

    checkpoint: str = field(metadata={"help": "llama2.c legacy checkpoint (.bin), e.g. stories15M.bin"})
    output: str = field(metadata={"help": "folder to write (must not exist unless --overwrite)"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "llama2.c tokenizer.bin for this model (omit to convert weights only)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})


def build_parser():
    from training.utils.parser import CommandParser

    return CommandParser(
        ConvertLlama2cArguments, prog="python -m training.convert_llama2c",
        description="Convert a llama2.c legacy checkpoint (and tokenizer.bin) to a Hugging Face LlamaForCausalLM "
        "folder with a PreTrainedTokenizerFast that encodes exactly as llama2.c does.",
    )


@command
def main(argv: list[str] | None = None) -> int:
    (args,) = build_parser().parse_or_exit(argv)
    try:
        out = convert_llama2c(args.checkpoint, args.tokenizer, args.output, overwrite=args.overwrite)
    except (Llama2cFormatError, FileNotFoundError, FileExistsError) as e:
        print(f"convert_llama2c: error: {e}", file=sys.stderr)
        return 2
    print(f"convert_llama2c: wrote {out} (load with AutoModelForCausalLM / AutoTokenizer.from_pretrained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

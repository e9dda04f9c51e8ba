"""Convert a Llama GGUF file (llama.cpp's format) into a plain safetensors Llama folder, and let every teacher
loader take a `.gguf` path.

    python -m training.convert_gguf SmolLM2-135M-Instruct.Q4_1.gguf --output runs/smollm2

What it writes (atomically: staged in a hidden folder beside `--output`, checked, then renamed):

* `config.json`: the `LlamaConfig` transformers reads from the GGUF metadata, without its `quantization_config`
  (the weights are dequantized, so the folder is an ordinary fp32 checkpoint);
* `model.safetensors`: the weights, dequantized to fp32 exactly as `from_pretrained(..., gguf_file=...)` does;
* the tokenizer (`tokenizer.json`, `tokenizer_config.json` with the chat template, bos/eos/pad/unk), rebuilt by
  transformers from the GGUF vocabulary; the chat template (when the tokenizer lacks it) and the special tokens
  come from the metadata (`tokenizer.chat_template`, `tokenizer.ggml.*_token_id`);
* `generation_config.json` (bos/pad and every end-of-sequence id the file names: eos, end-of-turn);
* `gguf_source.json`: the file name, its sha256, architecture, tensor types and the check below.

Before the rename the folder is loaded back and its logits are compared with the GGUF-loaded model's on a few
token sequences (a chat-rendered prompt, a sentence, random ids): max |difference| <= 1e-5 in fp32 or the
conversion fails (in practice it is exactly 0: the same fp32 weights through the same LlamaForCausalLM code).

Supported: GGUF files whose `general.architecture` transformers loads as a Llama (`llama`, except files whose
name says mistral, which transformers loads as Mistral), with tensors in any type the installed `gguf` package
dequantizes (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, ...). Anything else fails with one line
naming the file, what it holds and what is supported.

Everywhere a teacher or tokenizer is loaded (`training.train`'s `teacher_model` / `tokenizer`, the direct
teacher, `training.cache_teacher_logits`, `training.serve_teacher`, `training.align`, `training.evaluate`,
`training.finetune_teacher`, `training.synthesize`), a `.gguf` path goes through `resolve_pretrained`: the file
is converted once into a content-addressed cache folder (`$HF_RETNET_CACHE/gguf/<stem>-<sha256[:16]>/`, default
`~/.cache/hf_retnet/gguf/`) and every later `from_pretrained` reads that folder, so config, tokenizer and weights
come from one place. Two processes resolving the same file (e.g. the ranks of a DDP run) take a file lock: one
converts, the others wait and reuse it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from training.utils.errors import command

__all__ = [
    "GGUFError",
    "GGUFInfo",
    "LOGITS_TOLERANCE",
    "convert_gguf",
    "gguf_cache_dir",
    "gguf_sha256",
    "inspect_gguf",
    "is_gguf_path",
    "resolve_pretrained",
    "supported_tensor_types",
    "main",
]

GGUF_SUFFIX = ".gguf"
LLAMA_ARCHITECTURES = ("llama",)  # general.architecture values transformers loads as LlamaForCausalLM
LOGITS_TOLERANCE = 1e-5  # max |logit difference| (fp32) between the written folder and the GGUF-loaded model
SOURCE_FILE = "gguf_source.json"
CACHE_ENV = "HF_RETNET_CACHE"
_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """A file that is not a GGUF, is corrupt, or holds an architecture / tensor type that cannot be converted."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def is_gguf_path(spec) -> bool:
    """True for a str / PathLike naming a `.gguf` file (existing or not): what `resolve_pretrained` converts."""
    return isinstance(spec, (str, os.PathLike)) and os.fspath(spec).lower().endswith(GGUF_SUFFIX)


# ----------------------------------------------------------------------------------------------- reading the file


def _import_gguf():
    try:
        import gguf
    except ImportError as err:
        raise ImportError(
            f"reading GGUF files needs the gguf package ({err}); install it with pip install 'hf-retnet[gguf]' "
            "(or pip install gguf)"
        ) from None
    return gguf


def supported_tensor_types() -> list[str]:
    """Tensor types the installed `gguf` package dequantizes (what transformers' GGUF loader calls for Llama)."""
    gguf = _import_gguf()
    import gguf.quants as quants

    names = {"F32", "F16"}
    names.update(t.name for t in getattr(quants, "_type_traits", {}))
    order = {name: i for i, name in enumerate(t.name for t in gguf.GGMLQuantizationType)}
    return sorted(names, key=lambda n: order.get(n, 1 << 20))


def _field(reader, key: str, default=None):
    """One metadata value (str, number, bool or list) of a GGUFReader, or `default`."""
    fld = reader.fields.get(key)
    if fld is None:
        return default
    if hasattr(fld, "contents"):
        return fld.contents()
    values = []  # gguf < 0.11: decode by hand
    for index in fld.data:
        part = fld.parts[index]
        values.append(bytes(part).decode("utf-8") if part.dtype.kind == "u" and part.dtype.itemsize == 1
                      else part.tolist()[0])
    return values[0] if len(values) == 1 else values


@dataclass
class GGUFInfo:
    """What `inspect_gguf` read from a file's header: enough to refuse it before any weight is dequantized."""

    path: str
    architecture: str
    name: str | None
    tensor_types: dict[str, int]  # type name -> number of tensors
    num_tensors: int
    metadata: dict = field(default_factory=dict)  # the tokenizer ids and chat template the file states

    def describe(self) -> str:
        types = ", ".join(f"{n} x{c}" for n, c in sorted(self.tensor_types.items(), key=lambda kv: -kv[1]))
        return f"{os.path.basename(self.path)}: {self.architecture} ({self.name or 'unnamed'}), {types}"


def _transformers_reading(architecture: str) -> str:
    """How the installed transformers' GGUF loader treats a non-Llama architecture, for the error message."""
    known = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        known.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf import GGUF_ARCHS

        known.update(GGUF_ARCHS)
    except ImportError:
        pass
    if architecture in known:
        return f"transformers loads it as a {architecture!r} model, not a Llama"
    return "transformers' GGUF loader does not support it"


def inspect_gguf(path) -> GGUFInfo:
    """Read a GGUF header and refuse what cannot become a Llama folder, with one line naming file, found, supported."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != _MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}; GGUF files start with {_MAGIC!r})")
    gguf = _import_gguf()
    try:
        reader = gguf.GGUFReader(path)
        architecture = _field(reader, "general.architecture")
        tensors = list(reader.tensors)
    except Exception as err:  # GGUFReader raises ValueError / struct.error / IndexError on a damaged file
        raise GGUFError(f"{path}: corrupt or truncated GGUF file ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None
    name = _field(reader, "general.name")
    supported = "supported: " + ", ".join(LLAMA_ARCHITECTURES) + " (Llama)"
    if not isinstance(architecture, str):
        raise GGUFError(f"{path}: GGUF file without general.architecture; {supported}")
    if architecture not in LLAMA_ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {architecture!r} ({_transformers_reading(architecture)}); only Llama "
                        f"GGUF files convert to a Llama teacher; {supported}")
    if "mistral" in str(name or "").lower():  # transformers' loader turns such llama files into MistralForCausalLM
        raise GGUFError(f"{path}: a {architecture!r} file named {name!r}, which transformers loads as a Mistral model, "
                        f"not a Llama; {supported}")
    types = Counter(t.tensor_type.name for t in tensors)
    allowed = supported_tensor_types()
    unsupported = sorted(set(types) - set(allowed))
    if unsupported:
        found = ", ".join(f"{n} ({types[n]} tensors)" for n in unsupported)
        raise GGUFError(f"{path}: tensor type {found} cannot be dequantized by the installed gguf package; supported: "
                        f"{', '.join(allowed)}")
    metadata = {key: _field(reader, f"tokenizer.ggml.{key}") for key in (
        "bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id", "eot_token_id", "eom_token_id")}
    metadata["chat_template"] = _field(reader, "tokenizer.chat_template")
    metadata["tokenizer_model"] = _field(reader, "tokenizer.ggml.model")
    return GGUFInfo(path, architecture, name, dict(types), len(tensors), metadata)


def gguf_sha256(path) -> str:
    """sha256 of a file (hex), memoised per (path, size, mtime) within the process."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
        _SHA_MEMO[key] = digest.hexdigest()
    return _SHA_MEMO[key]


_SHA_MEMO: dict[tuple, str] = {}


# ----------------------------------------------------------------------------------------------- loading and writing


MIN_TRANSFORMERS = "5.6"  # 5.2-5.5 add a BOS the file rules out and re-save a tokenizer that encodes differently


def _check_transformers() -> None:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise ImportError(
            f"GGUF teachers need transformers >= {MIN_TRANSFORMERS} (installed: {transformers.__version__}, whose GGUF "
            f"tokenizer does not round-trip); pip install -U 'transformers>={MIN_TRANSFORMERS}' or 'hf-retnet[gguf]'"
        )


def _load_gguf(folder: str, name: str):
    """(tokenizer, model) from a GGUF file with transformers, the model dequantized to fp32 dense weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_transformers()

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    kwargs = {}
    try:  # transformers >= 5.25 may keep GGUF blocks packed (GgufLinear) where kernels exist: ask for dense weights
        import inspect

        from transformers import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig.__init__).parameters:
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
    return tokenizer, model.eval()


def _complete_tokenizer(tokenizer, info: GGUFInfo) -> list[str]:
    """Take from the GGUF metadata what the rebuilt tokenizer lacks (chat template) or reads otherwise (special
    tokens: the file's `tokenizer.ggml.*_token_id` are authoritative; transformers 5.2's GGUF tokenizer, for one,
    reports bos as eos and no pad for a ChatML file). Returns the attributes set."""
    filled = []
    meta = info.metadata
    if not getattr(tokenizer, "chat_template", None) and meta.get("chat_template"):
        tokenizer.chat_template = meta["chat_template"]
        filled.append("chat_template")
    for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id"),
                      ("unk_token", "unknown_token_id")):
        token_id = meta.get(key)
        if not (isinstance(token_id, int) and 0 <= token_id < len(tokenizer)):
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)
        if getattr(tokenizer, attr) != token:
            setattr(tokenizer, attr, token)
            filled.append(attr)
    return filled


def _plain_llama(model):
    """A LlamaForCausalLM with the GGUF model's config (minus quantization_config) and its tensors (no copy)."""
    import torch
    from transformers import LlamaForCausalLM

    if type(model).__name__ != "LlamaForCausalLM" or model.config.model_type != "llama":
        raise GGUFError(f"transformers loaded this GGUF file as {type(model).__name__} (model_type "
                        f"{model.config.model_type!r}), not LlamaForCausalLM; only Llama GGUF files are supported")
    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_model_name_or_path"):
        if attr in config.__dict__:
            delattr(config, attr)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    state = model.state_dict()
    bad = {k: v.dtype for k, v in state.items() if not v.is_floating_point()}
    if bad:
        raise GGUFError(f"the GGUF weights stayed packed ({sorted(bad)[:3]} ...); cannot write a dense checkpoint")
    plain.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        plain.tie_weights()
    return plain.eval()


def _generation_config(model, tokenizer, info: GGUFInfo):
    from transformers import GenerationConfig

    eos = []
    for value in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id,
                  info.metadata.get("eot_token_id"), info.metadata.get("eom_token_id")):
        for token_id in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(token_id, int) and token_id >= 0 and token_id not in eos:
                eos.append(token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.bos_token_id
    return GenerationConfig(bos_token_id=bos, eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
                            pad_token_id=pad)


def _check_sequences(tokenizer, vocab_size: int, seed: int = 0) -> list[tuple[str, list[int]]]:
    """A few token sequences to compare logits on: a chat prompt, a sentence, random ids."""
    import torch

    out = []
    if getattr(tokenizer, "chat_template", None):
        try:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": "What is the capital of France?"},
                 {"role": "assistant", "content": "Paris is the capital of France."}], tokenize=True,
                return_dict=True)["input_ids"]
            out.append(("chat", list(ids)))
        except Exception:  # a template that needs other roles: the other sequences still run
            pass
    out.append(("text", list(tokenizer("The quick brown fox jumps over the lazy dog. 12345", add_special_tokens=True)
                             ["input_ids"])))
    generator = torch.Generator().manual_seed(seed)
    out.append(("random", torch.randint(0, vocab_size, (48,), generator=generator).tolist()))
    return [(name, ids) for name, ids in out if ids]


def _compare_logits(reference, candidate, sequences) -> dict:
    import torch

    worst, tokens = 0.0, 0
    per = {}
    with torch.no_grad():
        for name, ids in sequences:
            x = torch.tensor([ids], dtype=torch.long)
            a = reference(input_ids=x, use_cache=False).logits.float()
            b = candidate(input_ids=x, use_cache=False).logits.float()
            diff = float((a - b).abs().max())
            per[name] = {"tokens": len(ids), "max_abs_diff": diff}
            worst, tokens = max(worst, diff), tokens + len(ids)
    return {"sequences": per, "tokens": tokens, "max_abs_diff": worst, "tolerance": LOGITS_TOLERANCE,
            "exact": worst == 0.0, "passed": worst <= LOGITS_TOLERANCE}


def _check_tokenizer(reference, candidate) -> None:
    texts = ["Hello world! How are you today?", "  spaces\tand\nnewlines  ", "Numbers 3.14159 and 2024-05-01.",
             "Unicode: café, naïve, 東京, emoji 🙂"]
    for text in texts:
        a = reference(text, add_special_tokens=True)["input_ids"]
        b = candidate(text, add_special_tokens=True)["input_ids"]
        if list(a) != list(b):
            raise GGUFError(f"the saved tokenizer encodes {text!r} as {list(b)[:12]} but the GGUF one as {list(a)[:12]}")
    for attr in ("chat_template", "bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(reference, attr, None) != getattr(candidate, attr, None):
            raise GGUFError(f"the saved tokenizer's {attr} ({getattr(candidate, attr, None)!r}) differs from the GGUF "
                            f"one's ({getattr(reference, attr, None)!r})")


def _readable(folder: str) -> None:
    """Give every file the mode a plain `open()` would (safetensors writes its file 0600): a shared cache stays usable."""
    mask = os.umask(0)
    os.umask(mask)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~mask)


def _publish(staging: str, output: str, overwrite: bool) -> None:
    """Move the finished staging folder to `output` (replacing it only when allowed), atomically per rename."""
    if os.path.isdir(output) and (overwrite or not os.listdir(output)):
        old = f"{staging}.old"
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(staging, output)  # fails if someone else created a non-empty `output` meanwhile
    except OSError:
        raise FileExistsError(f"{output} appeared while converting and is not empty; pass --overwrite to replace it")


def convert_gguf(gguf_path, output, overwrite: bool = False, check: bool = True, log=_log) -> dict:
    """Convert a Llama GGUF file to a safetensors folder at `output`; returns the report also stored in
    `output/gguf_source.json` (with `check`: the logits comparison, failing above `LOGITS_TOLERANCE`)."""
    start = time.perf_counter()
    info = inspect_gguf(gguf_path)
    output = os.path.abspath(os.path.expanduser(os.fspath(output)))
    if os.path.exists(output) and not os.path.isdir(output):
        raise FileExistsError(f"{output} exists and is not a folder")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; pass --overwrite to replace it")
    log(f"convert_gguf: {info.describe()}")
    digest = gguf_sha256(info.path)
    tokenizer, gguf_model = _load_gguf(os.path.dirname(info.path), os.path.basename(info.path))
    filled = _complete_tokenizer(tokenizer, info)
    loaded = time.perf_counter()
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(output)}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    try:
        plain = _plain_llama(gguf_model)
        plain.generation_config = _generation_config(gguf_model, tokenizer, info)
        plain.save_pretrained(staging, safe_serialization=True)
        del plain
        tokenizer.save_pretrained(staging)
        report = {
            "gguf_file": os.path.basename(info.path),
            "sha256": digest,
            "size_bytes": os.path.getsize(info.path),
            "architecture": info.architecture,
            "name": info.name,
            "tensor_types": info.tensor_types,
            "tokenizer_filled_from_metadata": filled,
            "converted_by": "python -m training.convert_gguf",
        }
        if check:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            saved_tokenizer = AutoTokenizer.from_pretrained(staging)
            _check_tokenizer(tokenizer, saved_tokenizer)
            saved = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
            result = _compare_logits(gguf_model, saved, _check_sequences(tokenizer, gguf_model.config.vocab_size))
            del saved
            report["logits_check"] = result
            log(f"convert_gguf: logits check on {len(result['sequences'])} sequences ({result['tokens']} tokens): "
                f"max |diff| {result['max_abs_diff']:.3g} ({'exact' if result['exact'] else 'passed'}; tolerance "
                f"{LOGITS_TOLERANCE:g}, fp32)")
            if not result["passed"]:
                raise GGUFError(f"{info.path}: the written folder's logits differ from the GGUF model's by "
                                f"{result['max_abs_diff']:.3g} > {LOGITS_TOLERANCE:g}; nothing was written")
        report["seconds"] = {"load": round(loaded - start, 2), "total": round(time.perf_counter() - start, 2)}
        with open(os.path.join(staging, SOURCE_FILE), "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        _readable(staging)
        _publish(staging, output, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report["output"] = output
    return report


# ----------------------------------------------------------------------------------------------- .gguf everywhere


def gguf_cache_dir() -> str:
    """Where `resolve_pretrained` keeps converted folders: $HF_RETNET_CACHE/gguf, else ~/.cache/hf_retnet/gguf
    (or $XDG_CACHE_HOME/hf_retnet/gguf)."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "hf_retnet")
    return os.path.join(os.path.expanduser(root), "gguf")


def _converted(folder: str, digest: str) -> bool:
    try:
        with open(os.path.join(folder, SOURCE_FILE), encoding="utf-8") as handle:
            return json.load(handle).get("sha256") == digest
    except (OSError, ValueError):
        return False


class _FileLock:
    """An exclusive lock on a file (fcntl where available; elsewhere no lock, and the atomic rename decides)."""

    def __init__(self, path: str):
        self.path, self.handle = path, None

    def __enter__(self):
        self.handle = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        return self

    def __exit__(self, *exc):
        self.handle.close()  # releases the lock
        return False


def resolve_pretrained(spec, cache_dir: str | None = None, log=_log):
    """`spec` unchanged unless it names a `.gguf` file; then the folder it converts to (converted once, cached).

    The folder is `<cache_dir>/<file stem>-<sha256[:16]>` (default cache: `gguf_cache_dir()`), so a changed file
    converts again and the same file under another name or path is reused. Safe under concurrency: a lock file
    serialises conversions and the folder appears by an atomic rename, complete (`gguf_source.json` last)."""
    if not is_gguf_path(spec):
        return spec
    path = os.path.abspath(os.path.expanduser(os.fspath(spec)))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {os.fspath(spec)!r} does not exist")
    digest = gguf_sha256(path)
    root = os.path.abspath(os.path.expanduser(cache_dir or gguf_cache_dir()))
    stem = os.path.basename(path)[: -len(GGUF_SUFFIX)]
    folder = os.path.join(root, f"{stem}-{digest[:16]}")
    if _converted(folder, digest):
        return folder
    inspect_gguf(path)  # refuse a wrong file before waiting on the lock or loading anything
    os.makedirs(root, exist_ok=True)
    with _FileLock(os.path.join(root, f".{stem}-{digest[:16]}.lock")):
        if _converted(folder, digest):
            return folder
        log(f"resolve_pretrained: converting {path} once into {folder} (reused on later runs)")
        try:
            convert_gguf(path, folder, overwrite=os.path.isdir(folder), log=log)
        except FileExistsError:
            if not _converted(folder, digest):
                raise
    return folder


# ----------------------------------------------------------------------------------------------- CLI


@dataclass
class ConvertGGUFArguments:
    """`python -m training.convert_gguf FILE.gguf --output DIR`: every field is a flag (or positional) and a YAML key."""

    gguf_file: str = field(metadata={"positional": True, "help": "the .gguf file"})
    output: str = field(metadata={"help": "folder to write (must not exist or be empty unless --overwrite)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing non-empty output folder"})
    no_check: bool = field(default=False, metadata={"help": "skip the reload-and-compare-logits check"})


def build_parser():
    from training.utils.parser import CommandParser

    return CommandParser(
        ConvertGGUFArguments, prog="python -m training.convert_gguf",
        description="Convert a Llama GGUF file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf) to a safetensors Llama folder "
        "(fp32 weights, tokenizer with its chat template, generation config), checked to give the GGUF model's "
        f"logits (max |diff| <= {LOGITS_TOLERANCE:g}). Supports the 'llama' architecture with tensors in any type the "
        "gguf package dequantizes (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, K-quants, ...).",
    )


@command
def main(argv: list[str] | None = None) -> int:
    (args,) = build_parser().parse_or_exit(argv)
    try:
        report = convert_gguf(args.gguf_file, args.output, overwrite=args.overwrite, check=not args.no_check)
    except (GGUFError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"convert_gguf: error: {err}", file=sys.stderr)
        return 2
    print(f"convert_gguf: wrote {report['output']} in {report['seconds']['total']:.1f} s (load it with "
          "AutoModelForCausalLM / AutoTokenizer.from_pretrained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

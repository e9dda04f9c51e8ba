"""Tiny Llama chat models written as GGUF files with the `gguf` package, the way llama.cpp's converter writes
them (llama metadata, q/k rows permuted for llama.cpp's rotary layout, a byte-level BPE vocabulary as
`tokenizer.ggml.model = "gpt2"` with merges, token types, special ids and a ChatML chat template).

Used by tests of `training.convert_gguf` and `training.synthesize`; nothing is downloaded.
"""

from __future__ import annotations

import json
import os

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SYSTEM_DEFAULT = "You are a tiny helpful assistant."
CHAT_TEMPLATE = (  # SmolLM2's ChatML template, with its own default system prompt
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM_DEFAULT + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus(n: int = 300) -> list[str]:
    subjects = ["the cat", "a dog", "my teacher", "the student", "a robot", "the river", "our city"]
    verbs = ["explains", "writes", "asks about", "describes", "counts", "answers", "likes"]
    objects = ["the weather", "a poem", "the answer", "every number", "a short story", "the capital", "music"]
    asks = ["Can you", "Please", "How do I", "What is", "Why does", "Tell me how to", "Write"]
    out = []
    for i in range(n):
        s, v, o, a = subjects[i % 7], verbs[(i * 3) % 7], objects[(i * 5) % 7], asks[(i * 2) % 7]
        out.append(f"{a} {v} {o}? {s.capitalize()} {v} {o} {i % 31} times. Thanks!")
    return out


def build_chat_tokenizer(vocab_size: int = 320):
    """A byte-level BPE trained on local text, with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def build_llama(vocab_size: int, seed: int = 0, chatty_stop_id: int | None = None, tied: bool = True,
                layers: int = 2):
    """A random Llama of `layers` layers (hidden 64, 4 heads / 2 kv heads). q/k are scaled up so attention is far
    from uniform (a wrong rotary layout would change the logits). With `chatty_stop_id`, the head is untied and the
    end-of-turn token gets a steady few-% probability at every step, so sampled turns end like a chat model's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied and chatty_stop_id is None,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
        if chatty_stop_id is not None:
            emb = model.model.embed_tokens.weight
            emb.normal_(0, 1)
            emb[:, 0] = 3.0  # a constant direction every hidden state keeps
            head = model.lm_head.weight
            head.normal_(0, 0.15)
            head[:, 0] = 0.0
            head[chatty_stop_id] = 0.0
            head[chatty_stop_id, 0] = 1.2  # the end-of-turn logit: about +3.4 whatever the context
    return model


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers' loader undoes it)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_names(n_layers: int) -> dict[str, str]:
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names.update({
            p + "input_layernorm.weight": f"blk.{i}.attn_norm.weight",
            p + "self_attn.q_proj.weight": f"blk.{i}.attn_q.weight",
            p + "self_attn.k_proj.weight": f"blk.{i}.attn_k.weight",
            p + "self_attn.v_proj.weight": f"blk.{i}.attn_v.weight",
            p + "self_attn.o_proj.weight": f"blk.{i}.attn_output.weight",
            p + "post_attention_layernorm.weight": f"blk.{i}.ffn_norm.weight",
            p + "mlp.gate_proj.weight": f"blk.{i}.ffn_gate.weight",
            p + "mlp.up_proj.weight": f"blk.{i}.ffn_up.weight",
            p + "mlp.down_proj.weight": f"blk.{i}.ffn_down.weight",
        })
    return names


def write_gguf(model, tokenizer, path, tensor_type: str = "F32", architecture: str = "llama",
               name: str = "tiny-chat") -> str:
    """Write `model` + `tokenizer` as a GGUF file. `tensor_type`: F32, F16, Q8_0, Q4_0, Q4_1, ... for the matrices
    (1-D norm weights stay F32, as llama.cpp keeps them), or "mixed" (embedding Q8_0, attention Q4_1, FFN F16)."""
    import gguf
    from gguf.quants import quantize

    cfg = model.config
    writer = gguf.GGUFWriter(os.fspath(path), architecture)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])  # 3 = CONTROL, 1 = NORMAL
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    names = _tensor_names(cfg.num_hidden_layers)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, array in state.items():
        if hf_name.endswith("q_proj.weight"):
            array = _permute(array, cfg.num_attention_heads, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = _permute(array, cfg.num_attention_heads, cfg.num_key_value_heads)
        kind = tensor_type
        if tensor_type == "mixed":
            kind = "Q8_0" if "embed" in hf_name or "lm_head" in hf_name else "Q4_1" if "self_attn" in hf_name else "F16"
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim == 1 or kind == "F32":
            writer.add_tensor(names[hf_name], array)
        elif kind == "F16":
            writer.add_tensor(names[hf_name], array.astype(np.float16))
        elif kind == "F64":  # a type no GGUF loader dequantizes: for the error tests
            writer.add_tensor(names[hf_name], array.astype(np.float64))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(names[hf_name], quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)


def write_tiny_chat_gguf(path, tensor_type: str = "F32", chatty: bool = False, seed: int = 0, layers: int = 2):
    """(gguf path, tokenizer, the HF model it was written from)."""
    tokenizer = build_chat_tokenizer()
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>") if chatty else None
    model = build_llama(len(tokenizer), seed=seed, chatty_stop_id=stop, layers=layers)
    return write_gguf(model, tokenizer, path, tensor_type), tokenizer, model

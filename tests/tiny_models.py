"""Tiny local stand-ins with the real layouts: a BPE tokenizer with a Llama-3 style chat template and
a small `LlamaForCausalLM` teacher saved like a Hub folder. Used by tests and the offline default,
where no Hub is reachable; the real-teacher path loads `meta-llama/...` through the same code."""

from __future__ import annotations

import os
from collections.abc import Iterable

# Llama-3's special tokens and chat template shape, so chat preprocessing behaves as with the real teacher.
BOS, EOS, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, EOT, PAD, START_HEADER, END_HEADER]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def default_texts(n: int = 400) -> list[str]:
    """A small deterministic corpus, enough to train a byte-level BPE tokenizer."""
    subjects = ["the cat", "a dog", "the model", "our teacher", "the student", "a retnet", "the server"]
    verbs = ["reads", "writes", "learns", "predicts", "counts", "answers", "repeats"]
    objects = ["the number", "a token", "the story", "every word", "the answer", "a sequence"]
    out = []
    for i in range(n):
        s, v, o = subjects[i % 7], verbs[(i * 3) % 7], objects[(i * 5) % 6]
        out.append(f"{s} {v} {o} {i % 97}. {o.capitalize()} is {i % 13} and {s} {v} it again.")
    return out


def build_tiny_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE on `texts` and wrap it as a `PreTrainedTokenizerFast` with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts or default_texts()), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=131072,
    )


def build_tiny_llama(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, **overrides):
    """A randomly initialised `LlamaForCausalLM` with the Llama-3.2 shape at toy size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_teacher(folder: str | os.PathLike, texts: Iterable[str] | None = None, **model_kwargs) -> str:
    """Write a tokenizer + tiny Llama to `folder` in the Hub layout (config.json, model.safetensors,
    tokenizer.json, ...) and return the folder; `from_pretrained(folder)` then works as for a Hub id."""
    tokenizer = build_tiny_tokenizer(texts)
    model = build_tiny_llama(len(tokenizer), **model_kwargs)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)

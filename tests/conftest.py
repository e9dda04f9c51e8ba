"""Shared fixtures: tiny tokenizers and teachers built locally, never downloaded."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny models on 2 shared cores: one intra-op thread is several times faster than oversubscribing.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A folder with the layout of a Hub Llama checkpoint: config, safetensors weights, tokenizer, chat template."""
    from tests.tiny_models import save_tiny_teacher

    return save_tiny_teacher(tmp_path_factory.mktemp("tiny-llama-teacher"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_teacher_dir)

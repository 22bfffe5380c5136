"""Shared test fixtures: small models saved with save_pretrained, so every test loads
them through the real `from_pretrained` path, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: tests never reach the hub

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

import lm


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=257, bos_token_id=256,
                        eos_token_id=256)
    return GPT2LMHeadModel(config).eval()


def tiny_mistral():
    torch.manual_seed(0)
    config = MistralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=257, max_position_embeddings=64)
    return MistralForCausalLM(config).eval()


@pytest.fixture(scope="session", params=["gpt2", "mistral"])
def saved_model_dir(request, tmp_path_factory):
    """A directory holding a tiny GPT-2 or Mistral (byte vocabulary) saved with save_pretrained."""
    path = tmp_path_factory.mktemp(request.param)
    model = (tiny_gpt2 if request.param == "gpt2" else tiny_mistral)()
    lm.save_base(model, lm.ByteTokenizer(), path)
    return str(path)

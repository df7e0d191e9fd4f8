"""Shared fixtures: tiny random HF models saved with ``save_pretrained`` (the parity references)."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=10000.0)),
    "llama3_scaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position_embeddings=64))),
    "llama_linear_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling=dict(rope_type="linear", factor=2.0), tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=7, num_key_value_heads=1)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=True)),
}


def make_hf_model(arch: str, tmp_path_factory, **overrides):
    import torch
    import transformers

    cfg_cls, model_cls, extra = ARCHS[arch]
    cfg = getattr(transformers, cfg_cls)(**{**TINY, **extra, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # random init makes tiny norms/biases trivial: perturb every parameter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp(arch)
    model.save_pretrained(path, safe_serialization=True)
    model.config._attn_implementation = "eager"
    return model, str(path)


@pytest.fixture(scope="session", params=list(ARCHS))
def hf_tiny(request, tmp_path_factory):
    """(arch name, torch model, checkpoint dir) for each supported tiny architecture."""
    model, path = make_hf_model(request.param, tmp_path_factory)
    return request.param, model, path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def tiny_llama_with_prompt(tmp_path_factory, length: int, batch: int = 2):
    """(kvjax model, params, random prompt (batch, length)) from the tiny random Llama checkpoint."""
    import jax.numpy as jnp

    import kvjax
    from kvjax.checkpoints.safetensors import load_safetensors

    _, path = make_hf_model("llama", tmp_path_factory)
    cfg, params = load_safetensors(path, progress=False)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, length)), jnp.int32)
    return kvjax.Model(cfg), params, prompt

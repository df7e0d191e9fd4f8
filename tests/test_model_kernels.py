"""The model with Pallas decode attention (interpret mode on CPU) produces the same tokens as the jnp reference."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.checkpoints.safetensors import load_safetensors
from kvjax.generate import generate

from conftest import make_hf_model


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_pallas_decode_matches_reference_tokens(arch, tmp_path_factory, rng):
    _, path = make_hf_model(arch, tmp_path_factory)
    cfg, params = load_safetensors(path, progress=False)
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(2, 11)).astype(np.int32))
    mask = jnp.asarray(np.array([[True] * 11, [False] * 3 + [True] * 8]))
    ref = generate(kvjax.Model(cfg), params, prompt, prompt_mask=mask, max_new_tokens=6)
    ker = generate(kvjax.Model(cfg, impl="pallas"), params, prompt, prompt_mask=mask, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(ker.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(ker.prefill_logits), np.asarray(ref.prefill_logits), atol=1e-5)


def test_pallas_decode_logits_close(tmp_path_factory, rng):
    _, path = make_hf_model("llama", tmp_path_factory)
    cfg, params = load_safetensors(path, progress=False)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(1, 9)).astype(np.int32))
    outs = []
    for impl in ("reference", "pallas"):
        model = kvjax.Model(cfg, impl=impl)
        _, st = model.prefill(params, toks[:, :8], model.init_state(1, 16))
        lg, _ = model.decode_step(params, toks[:, 8], st)
        outs.append(np.asarray(lg))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)


def test_unknown_impl_rejected():
    cfg = kvjax.ModelConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=8, intermediate_size=8,
                            num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="unknown attention impl 'cuda'"):
        kvjax.Model(cfg, impl="cuda")


@pytest.mark.slow
def test_real_model_pallas_tokens_equal_reference():
    """SmolLM2-135M (30 layers) greedy tokens with the Pallas decode kernel == jnp reference (interpret mode)."""
    from kvjax.data.corpora import load_text
    from kvjax.pretrained import load_pretrained

    lm = load_pretrained("smollm2-135m", progress=False)
    ids = lm.tokenizer.encode(load_text("hamlet"))[2000:2096]
    prompt = jnp.asarray([ids], jnp.int32)
    ref = generate(lm.model, lm.params, prompt, max_new_tokens=8)
    ker = generate(dataclasses.replace(lm.model, impl="pallas"), lm.params, prompt, max_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(ker.tokens), np.asarray(ref.tokens))

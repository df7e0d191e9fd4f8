"""kvjax models vs transformers on tiny random checkpoints: logits, padding, cached decode, chunked prefill, generation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import kvjax
from kvjax.checkpoints.safetensors import load_safetensors
from kvjax.generate import generate

T = 20


def _batch(rng, vocab):
    tokens = rng.integers(0, vocab, size=(2, T)).astype(np.int32)
    mask = np.ones((2, T), bool)
    mask[1, :6] = False  # row 1 is left-padded
    tokens[1, :6] = 0
    return tokens, mask


def _hf_logits(model, tokens, mask):
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(pos, dtype=torch.long))
    return out.logits.float().numpy()


@pytest.fixture(scope="module")
def loaded(hf_tiny):
    arch, hf_model, path = hf_tiny
    cfg, params = load_safetensors(path, progress=False)
    return arch, hf_model, kvjax.Model(cfg), params


def test_logits_match_transformers_with_padding(loaded, rng):
    arch, hf_model, model, params = loaded
    tokens, mask = _batch(rng, model.cfg.vocab_size)
    want = _hf_logits(hf_model, tokens, mask)
    state = model.init_state(2, 32)
    got, _ = model.jit_prefill(params, jnp.asarray(tokens), state, jnp.asarray(mask))
    got = np.asarray(got)
    assert np.abs(got[mask] - want[mask]).max() < 1e-4, arch


def test_right_padding_matches_unpadded_rows(loaded, rng):
    _, _, model, params = loaded
    tokens = rng.integers(0, model.cfg.vocab_size, size=(2, 12)).astype(np.int32)
    mask = np.ones((2, 12), bool)
    mask[1, 8:] = False
    got, _ = model.prefill(params, jnp.asarray(tokens), model.init_state(2, 16), jnp.asarray(mask))
    alone, _ = model.prefill(params, jnp.asarray(tokens[1:, :8]), model.init_state(1, 16))
    np.testing.assert_allclose(np.asarray(got)[1, :8], np.asarray(alone)[0], atol=1e-5)


def test_decode_with_cache_equals_full_recompute(loaded, rng):
    _, _, model, params = loaded
    tokens = jnp.asarray(rng.integers(0, model.cfg.vocab_size, size=(2, T)).astype(np.int32))
    full, _ = model.prefill(params, tokens, model.init_state(2, T))
    state = model.init_state(2, T)
    _, state = model.prefill(params, tokens[:, :5], state)
    for t in range(5, T):
        step, state = model.jit_decode_step(params, tokens[:, t], state)
        np.testing.assert_allclose(np.asarray(step), np.asarray(full)[:, t], atol=1e-4)


def test_chunked_prefill_equals_one_shot(loaded, rng):
    _, _, model, params = loaded
    tokens = jnp.asarray(rng.integers(0, model.cfg.vocab_size, size=(2, T)).astype(np.int32))
    full, full_state = model.prefill(params, tokens, model.init_state(2, T))
    state, outs = model.init_state(2, T), []
    for a, b in [(0, 7), (7, 8), (8, 16), (16, T)]:
        out, state = model.prefill(params, tokens[:, a:b], state)
        outs.append(out)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-4)
    for la, lb in zip(state.layers, full_state.layers):
        np.testing.assert_allclose(np.asarray(la.k), np.asarray(lb.k), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(la.pos), np.asarray(lb.pos))


def test_greedy_generation_identical(loaded, rng):
    arch, hf_model, model, params = loaded
    prompt = rng.integers(0, model.cfg.vocab_size, size=(1, 8)).astype(np.int32)
    with torch.no_grad():
        want = hf_model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=32, do_sample=False,
                                 min_new_tokens=32, pad_token_id=0)[0, 8:].numpy()
    out = generate(model, params, jnp.asarray(prompt), max_new_tokens=32)
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), want, err_msg=arch)


def test_ring_layers_with_right_padding_then_decode(tmp_path_factory, rng):
    """Padding must not take ring slots: right-padded prompt + decode equals the unpadded row (Mistral window 7)."""
    from conftest import make_hf_model

    _, path = make_hf_model("mistral", tmp_path_factory)
    cfg, params = load_safetensors(path, progress=False)
    model = kvjax.Model(cfg)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 12)).astype(np.int32)
    mask = np.ones((2, 12), bool)
    mask[1, 9:] = False  # row 1: 9 real tokens then padding
    state = model.init_state(2, 24)
    assert state.layers[0].capacity == cfg.sliding_window  # a ring of the window
    _, state = model.prefill(params, jnp.asarray(tokens), state, jnp.asarray(mask))
    nxt = rng.integers(0, cfg.vocab_size, size=(2,)).astype(np.int32)
    got, _ = model.decode_step(params, jnp.asarray(nxt), state)
    alone = np.concatenate([tokens[1, :9], nxt[1:]])[None]
    want, _ = model.prefill(params, jnp.asarray(alone), model.init_state(1, 24))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[0, -1]), atol=1e-4)

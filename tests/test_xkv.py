"""xKV (cross-layer SVD): the factorisation, the shared-factor storage and attention over it."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.compress import Context, chain, get_method
from kvjax.compress.xkv import CrossLayerKV, group_ranks, layer_groups, svd_factor
from kvjax.config import ModelConfig, RopeScaling
from kvjax.state import DenseKV, bound_layers, nbytes, valid_nbytes
from tests.test_compress_api import CFG, tiny_params

T, ROOM = 12, 3


def test_svd_reconstruction_error_is_the_discarded_singular_values():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 20, 12)).astype(np.float32)
    for r in (1, 4, 12):
        a, b = svd_factor(jnp.asarray(x), r)
        assert a.shape == (2, 20, r) and b.shape == (2, r, 12)
        s = np.linalg.svd(x, compute_uv=False)
        err = np.sum((x - np.asarray(a @ b)) ** 2, axis=(1, 2))
        np.testing.assert_allclose(err, np.sum(s[:, r:] ** 2, axis=1), rtol=1e-3, atol=1e-3)
    a, b = svd_factor(jnp.asarray(x), 50)  # a rank above min(n, c) is capped (and exact)
    assert a.shape[-1] == 12


def test_groups_and_default_ranks():
    layers = [DenseKV(k=None, v=None, pos=None, fill=None, window=w) for w in (0, 8, 0, 0, 8, 0, 0)]
    assert layer_groups(layers, 2) == [[0, 2], [3, 5], [6]]
    assert group_ranks(4, 8, 128, 128, None, None) == (512, 768)  # the authors' Llama-3.1-8B xKV-4 ranks
    assert group_ranks(2, 3, 64, 64, 7, None) == (7, 72)


@pytest.mark.parametrize("hp, match", [({"group_size": 0}, "group_size"), ({"rank_k": 0}, "rank_k"),
                                       ({"rank_v": -2}, "rank_v")])
def test_bad_hyperparameters(hp, match):
    with pytest.raises(ValueError, match=match):
        get_method("xkv", **hp)


def test_dynamic_rope_refused_before_compilation():
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=4, max_position_embeddings=16,
                      rope_scaling=RopeScaling(rope_type="dynamic", factor=2.0))
    with pytest.raises(ValueError, match="dynamic"):
        get_method("xkv").validate(Context(cfg=cfg))


@pytest.fixture(scope="module")
def prefilled():
    model, params = kvjax.Model(CFG), tiny_params(CFG)
    rng = np.random.default_rng(3)
    prompt = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, T)), jnp.int32)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, ROOM)), jnp.int32)
    observe = get_method("snapkv", window=3).observe()
    _, state, obs = model.jit_forward(params, prompt, model.init_state(2, T), None, observe=observe, logits="last")
    return model, params, state, obs, tokens


def _decode(model, params, state, tokens):
    out = []
    for j in range(tokens.shape[1]):
        lg, state, _ = model.jit_forward(params, tokens[:, j:j + 1], state, None, logits="last")
        out.append(np.asarray(lg))
    return np.stack(out, 1), state


@pytest.mark.parametrize("pre_rope", [True, False])
def test_full_rank_is_exact_and_shares_one_factor(prefilled, pre_rope):
    """At full rank the factored keys/values are the prompt's own (RoPE re-applied), decoding matches the full
    cache, and the group's token-side factors are stored once (in the first layer)."""
    model, params, state, obs, tokens = prefilled
    ctx = Context(cfg=CFG, decode_room=ROOM, prompt_len=T)
    m = get_method("xkv", group_size=2, rank_k=64, rank_v=64, pre_rope=pre_rope)
    comp, _ = m.prefill(state, obs, ctx)
    first, second = comp.layers
    assert isinstance(first, CrossLayerKV) and first.shared is not None and first.owner == -1
    assert second.shared is None and second.owner == 0
    for orig, layer in zip(state.layers, bound_layers(comp)):
        k, v = layer.factored()
        np.testing.assert_allclose(np.asarray(k), np.asarray(orig.k), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(v), np.asarray(orig.v), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="shares the factors"):
        second.dense()
    if pre_rope:  # decoding through the model's layer loop (the follower gets the owner's factors while it runs)
        full = state.replace(layers=tuple(DenseKV(k=jnp.pad(x.k, ((0, 0), (0, 0), (0, ROOM), (0, 0))),
                                                  v=jnp.pad(x.v, ((0, 0), (0, 0), (0, ROOM), (0, 0))),
                                                  pos=jnp.pad(x.pos, ((0, 0), (0, 0), (0, ROOM)), constant_values=-1),
                                                  fill=x.fill) for x in state.layers))
        want, _ = _decode(model, params, full, tokens)
        got, after = _decode(model, params, comp, tokens)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
        assert after.layers[1].shared is None  # the loop attached the factors only while the layer ran
    b, h, d, rk, rv = 2, CFG.num_kv_heads, CFG.head_dim, 2 * CFG.num_kv_heads * CFG.head_dim, 32
    rk = rv = min(T, 2 * h * d)  # rank capped at min(n, G H D)
    per_layer = 4 * (b * rk * h * d + b * rv * h * d + b * h * T + b * h * ROOM * (2 * d + 1) + b * h) \
        + (4 * d // 2 if pre_rope else 0)
    assert nbytes(comp.layers) == 4 * b * T * (rk + rv) + 2 * per_layer  # shared factors counted once


def test_low_rank_compresses_and_chains_after_eviction(prefilled):
    """Default ranks shrink the bytes; after SnapKV the factored rows are the kept slots; valid bytes exclude the
    unused decode room."""
    model, params, state, obs, tokens = prefilled
    ctx = Context(cfg=CFG, decode_room=ROOM, prompt_len=T)
    snap = get_method("snapkv", budget=6, window=3, kernel=3)
    m = chain(snap, get_method("xkv", group_size=2, rank_k=2, rank_v=3))
    comp, _ = m.prefill(state, obs, ctx)
    layer = comp.layers[0]
    assert layer.num_factored == 6 and layer.recent.capacity == ROOM
    h, d = CFG.num_kv_heads, CFG.head_dim
    assert layer.shared["ak"].shape == (2, 6, 2) and layer.shared["av"].shape == (2, 6, 3)
    snap_only, _ = snap.prefill(state, obs, ctx)
    per_layer = 4 * (2 * (2 + 3) * h * d + 2 * h * 6 + 2 * h * ROOM * (2 * d + 1) + 2 * h) + 4 * d // 2
    assert nbytes(comp.layers) == 4 * 2 * 6 * (2 + 3) + 2 * per_layer < nbytes(snap_only.layers)
    room_bytes = 2 * 2 * h * ROOM * (2 * d + 1) * 4  # two layers' empty decode slots
    assert valid_nbytes(comp) == nbytes(comp) - room_bytes
    kv = jnp.ones((2, h, ROOM, d))
    full_room = comp.replace(layers=tuple(x.append(kv, kv, jnp.full((2, ROOM), T, jnp.int32)) for x in comp.layers))
    assert valid_nbytes(full_room) == nbytes(full_room)  # the room is used now

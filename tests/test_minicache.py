"""MiniCache (cross-layer SLERP merging): SLERP, retention, the shared-direction storage and attention over it."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.compress import Context, chain, get_method
from kvjax.compress.minicache import MergedPairKV, layer_pairs, retention_mask, slerp
from kvjax.state import DenseKV, KVState, bound_layers, nbytes, valid_nbytes
from tests.test_compress_api import CFG, tiny_params

T, ROOM = 12, 3


def test_slerp_unit_norm_endpoints_and_angle():
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=(50, 8)) * 3, rng.normal(size=(50, 8)) * 0.2
    u1, u2 = x1 / np.linalg.norm(x1, axis=-1, keepdims=True), x2 / np.linalg.norm(x2, axis=-1, keepdims=True)
    for t in (0.0, 0.3, 0.6, 1.0):
        e, w = slerp(jnp.asarray(x1), jnp.asarray(x2), t)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(e), axis=-1), 1.0, rtol=1e-5)
        # e sits at angle t * W from u1 and (1 - t) * W from u2, on the arc between them
        ang = lambda a, b: np.arccos(np.clip(np.sum(a * b, -1), -1, 1))  # noqa: E731
        np.testing.assert_allclose(ang(np.asarray(e), u1), t * np.asarray(w), atol=2e-3)
        np.testing.assert_allclose(ang(np.asarray(e), u2), (1 - t) * np.asarray(w), atol=2e-3)
    np.testing.assert_allclose(np.asarray(slerp(jnp.asarray(x1), jnp.asarray(x2), 0.0)[0]), u1, atol=1e-5)
    np.testing.assert_allclose(np.asarray(slerp(jnp.asarray(x1), jnp.asarray(x2), 1.0)[0]), u2, atol=1e-5)
    e, w = slerp(jnp.asarray(x1), jnp.asarray(2 * x1), 0.6)  # parallel: the common direction
    np.testing.assert_allclose(np.asarray(e), u1, atol=1e-5)


def test_retention_band_is_the_most_distinct_pairs():
    omega = jnp.asarray([[[0.1, 0.2, 3.0, 0.15, 2.99, 1.0]]])
    cand = jnp.asarray([[[True, True, True, True, True, False]]])
    got = np.asarray(retention_mask(omega, cand, 0.05))
    assert got.tolist() == [[[False, False, True, False, True, False]]]  # 2.99 > 3.0 - 0.05 * 2.9; 1.0 not a candidate


def _layer(k, v, pos):
    b, h, c, _ = k.shape
    return DenseKV(k=jnp.asarray(k, jnp.float32), v=jnp.asarray(v, jnp.float32), pos=jnp.asarray(pos, jnp.int32),
                   fill=jnp.full((b, h), c, jnp.int32))


def test_merge_keeps_magnitudes_retains_distinct_tokens_exactly_and_stores_directions_once():
    rng = np.random.default_rng(1)
    b, h, c, d = 1, 2, 10, 8
    k1, v1 = rng.normal(size=(b, h, c, d)), rng.normal(size=(b, h, c, d))
    k2 = k1 * 1.7 + 0.05 * rng.normal(size=k1.shape)  # similar directions, other magnitudes
    v2 = v1 * 0.5 + 0.05 * rng.normal(size=v1.shape)
    k2[0, 0, 4] = -k1[0, 0, 4]  # one highly distinct token pair (head 0, position 4)
    pos = np.broadcast_to(np.arange(c), (b, h, c))
    st = KVState(layers=(_layer(k1, v1, pos), _layer(k2, v2, pos)), next_pos=jnp.full((b,), c, jnp.int32),
                 rope_shift=jnp.zeros((b,), jnp.int32))
    cfg = CFG
    m = get_method("minicache", start_layer=0)
    out, _ = m.prefill(st, None, Context(cfg=cfg, decode_room=ROOM))
    first, second = out.layers
    assert isinstance(first, MergedPairKV) and second.owner == 0 and second.shared is None
    assert 4 not in np.asarray(first.pos_m[0, 0]).tolist()  # the distinct token is not merged ...
    for orig, layer in zip((k1, k2), bound_layers(out)):
        ex = layer.exact
        slot = int(np.nonzero(np.asarray(ex.pos[0, 0]) == 4)[0][0])
        np.testing.assert_allclose(np.asarray(ex.k[0, 0, slot]), orig[0, 0, 4], rtol=1e-6)  # ... but kept exactly
        km, _ = layer.merged()
        p = np.asarray(layer.pos_m)
        ok = p >= 0
        norms = np.linalg.norm(np.take_along_axis(orig, np.maximum(p, 0)[..., None], 2), axis=-1)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(km), axis=-1)[ok], norms[ok], rtol=1e-5)
        cos = np.sum(np.asarray(km) * np.take_along_axis(orig, np.maximum(p, 0)[..., None], 2), -1) / (
            norms * np.linalg.norm(np.asarray(km), axis=-1) + 1e-30)
        assert np.all(cos[ok] > 0.95)  # merged directions close to each layer's own
    n = first.num_merged
    dir_bytes = 4 * b * h * n * 2 * d
    assert nbytes(out.layers) == dir_bytes + nbytes([first.mag_k, first.mag_v, first.pos_m, first.exact,
                                                      second.mag_k, second.mag_v, second.pos_m, second.exact])
    assert nbytes(out) < nbytes(st.replace(layers=tuple(
        DenseKV(k=jnp.pad(x.k, ((0, 0), (0, 0), (0, ROOM), (0, 0))), v=jnp.pad(x.v, ((0, 0), (0, 0), (0, ROOM), (0, 0))),
                pos=jnp.pad(x.pos, ((0, 0), (0, 0), (0, ROOM)), constant_values=-1), fill=x.fill) for x in st.layers)))


def test_pairs_and_bad_hyperparameters():
    layers = [DenseKV(k=None, v=None, pos=None, fill=None, window=w) for w in (0, 8, 0, 0, 0, 8, 0, 0)]
    assert layer_pairs(layers, None) == [(4, 6)]  # 6 global layers: from the 3rd on, pairs (4, 6); 7 is alone
    assert layer_pairs(layers, 0) == [(0, 2), (3, 4), (6, 7)]
    for hp, match in (({"t": 1.5}, "t "), ({"gamma": -0.1}, "gamma"), ({"start_layer": -1}, "start_layer")):
        with pytest.raises(ValueError, match=match):
            get_method("minicache", **hp)
    with pytest.raises(ValueError, match="no pair"):
        get_method("minicache", start_layer=1).validate(Context(cfg=CFG))


def test_chain_after_eviction_decodes_and_counts_bytes():
    """SnapKV then MiniCache on the tiny model: decoding runs through the layer loop (the second layer gets the
    directions while it runs), bytes shrink below SnapKV's alone, valid bytes exclude the unused room."""
    model, params = kvjax.Model(CFG), tiny_params(CFG)
    rng = np.random.default_rng(3)
    prompt = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, T)), jnp.int32)
    snap = get_method("snapkv", budget=8, window=3, kernel=3)
    m = chain(snap, get_method("minicache", start_layer=0, gamma=0.05))
    _, st, obs = model.jit_forward(params, prompt, model.init_state(2, T), None, observe=m.observe(), logits="last")
    ctx = Context(cfg=CFG, decode_room=ROOM, prompt_len=T)
    comp, _ = m.prefill(st, obs, ctx)
    ev, _ = snap.prefill(st, obs, ctx)
    assert isinstance(comp.layers[0], MergedPairKV)
    assert nbytes(comp) < nbytes(ev) and valid_nbytes(comp) < nbytes(comp)
    for row in range(2):  # every kept token of each layer is held once: merged or exact
        for layer, e in zip(bound_layers(comp), ev.layers):
            got = sorted(p for p in np.asarray(layer.pos[row, 0]).tolist() if p >= 0)
            assert got == sorted(p for p in np.asarray(e.pos[row, 0]).tolist() if p >= 0)
    tok = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 1)), jnp.int32)
    lg, after, _ = model.jit_forward(params, tok, comp, None, logits="last")
    assert np.all(np.isfinite(np.asarray(lg))) and after.layers[1].shared is None
    assert int(after.layers[1].exact.fill.max()) == int(comp.layers[1].exact.fill.max()) + 1

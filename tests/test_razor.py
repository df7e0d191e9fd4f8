"""RazorAttention (kvjax.compress.razor): retrieval-head scores, storage, and attention equal to a masked dense cache.

* echo / induction scores of hand-made attention patterns;
* a Razor layer attends exactly like a dense cache holding the same tokens in which the compensation token (mean of
  the dropped keys and values) appears as many times as tokens it replaces (reference path and Pallas kernel);
* bytes: retrieval heads hold their whole context, the others sinks + buffer + 1, each plus the decode room;
* chains: an eviction before Razor, a quantizer after it (unweighted compensation tokens), a clear error otherwise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_compress_api import CFG, tiny_params

import kvjax
from kvjax.attention import reference_attention
from kvjax.compress import chain, get_method
from kvjax.compress.base import densify
from kvjax.compress.razor import echo_induction_scores, probe_tokens, retrieval_heads
from kvjax.generate import prefill_compressed
from kvjax.state import RaggedKV


def test_echo_and_induction_scores():
    length, reps = 5, 3
    t = length * reps
    tok = probe_tokens(1000, length, reps)[0]
    assert (tok[:length] == tok[length:2 * length]).all() and tok.min() >= 100
    ind = np.zeros((2, t, t))
    echo = np.zeros((2, t, t))
    for q in range(t):
        ind[:, q, 0] = echo[:, q, 0] = 1.0  # a sink for the first repeat
        if q >= length:
            ind[:, q, 0] = echo[:, q, 0] = 0.0
            ind[:, q, q - length + 1] = 1.0  # the token after the previous occurrence
            echo[:, q, q - length] = 1.0  # the previous occurrence itself
    e, i = echo_induction_scores(ind, length)
    assert np.allclose(i, 1.0) and np.allclose(e, 0.0)
    e, i = echo_induction_scores(echo, length)
    assert np.allclose(e, 1.0) and np.allclose(i, 0.0)


@pytest.fixture(scope="module")
def tiny():
    return kvjax.Model(CFG), tiny_params(CFG)


@pytest.mark.slow
def test_probe_selects_the_papers_fractions(tiny):
    model, params = tiny
    mask, scores = retrieval_heads(model, params, length=16, repeats=3, induction_frac=0.25, echo_frac=0.25)
    assert mask.shape == (CFG.num_layers, CFG.num_kv_heads) and 1 <= mask.sum() <= 2  # 25% of 4 heads, twice
    assert mask.flat[np.argmax(scores["induction"])] and mask.flat[np.argmax(scores["echo"])]


def test_razor_equals_dense_cache_with_repeated_compensation_token(tiny):
    model, params = tiny
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    mask = jnp.asarray([[True] * 11 + [True], [False] * 2 + [True] * 10])  # row 1 left-padded by 2
    room = 2
    m = get_method("razor", n_sink=1, min_buffer=3, ratio=1e9, heads=((1, 1),))
    full = model.init_state(2, 12)
    _, full, _ = model.jit_forward(params, prompt, full, mask, logits="last")
    state = prefill_compressed(model, params, prompt, method=m, prompt_mask=mask, decode_room=room)[1]
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, CFG.num_heads, 1, CFG.head_dim)), jnp.float32)
    qp = state.next_pos[:, None]
    for i, (lf, lr) in enumerate(zip(full.layers, state.layers)):
        assert isinstance(lr, RaggedKV)
        k, v, pos = (np.asarray(x) for x in (lf.k, lf.v, lf.pos))
        n = np.asarray(state.next_pos)
        seg = np.asarray(lr.head_capacity)
        ks, vs, ps = [], [], []
        for b in range(2):
            kb, vb, pb = [], [], []
            for h in range(CFG.num_kv_heads):
                valid = pos[b, h] >= 0
                keep = valid if (i, h) == (1, 1) else valid & ((pos[b, h] < 1) | (pos[b, h] >= n[b] - 3))
                drop = valid & ~keep
                kk, vv, pp = list(k[b, h][keep]), list(v[b, h][keep]), list(pos[b, h][keep])
                if drop.any():  # the compensation token, repeated once per dropped token
                    kk += [k[b, h][drop].mean(0)] * int(drop.sum())
                    vv += [v[b, h][drop].mean(0)] * int(drop.sum())
                    pp += [pos[b, h][drop].max()] * int(drop.sum())
                    assert seg[b, h] == keep.sum() + 1 + room
                else:
                    assert seg[b, h] == keep.sum() + room
                kb.append(kk), vb.append(vv), pb.append(pp)
            ks.append(kb), vs.append(vb), ps.append(pb)
        c = max(len(p) for row in ps for p in row)
        K = np.zeros((2, CFG.num_kv_heads, c, CFG.head_dim), np.float32)
        V = np.zeros_like(K)
        P = np.full((2, CFG.num_kv_heads, c), -1, np.int32)
        for b in range(2):
            for h in range(CFG.num_kv_heads):
                j = len(ps[b][h])
                K[b, h, :j], V[b, h, :j], P[b, h, :j] = ks[b][h], vs[b][h], ps[b][h]
        want, _ = reference_attention(q, jnp.asarray(K), jnp.asarray(V), qp, jnp.asarray(P))
        got, _ = jax.jit(lambda layer, q, qp: layer.attend(q, qp))(lr, q, qp)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
        if i == 1:  # the Pallas kernel reads the flat buffer with the weighted slot (interpret mode)
            pal, _ = lr.attend(q, qp, impl="pallas")
            np.testing.assert_allclose(np.asarray(pal), np.asarray(want), atol=2e-5)
    assert kvjax.nbytes(state) < kvjax.nbytes(full)


@pytest.mark.slow
def test_razor_chains_with_eviction_and_quantization(tiny):
    model, params = tiny
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    razor = dict(n_sink=1, min_buffer=3, ratio=1e9, heads=((0, 0),))
    snap_razor = chain(get_method("snapkv", budget=8, window=3, kernel=3), get_method("razor", **razor))
    st = prefill_compressed(model, params, prompt, method=snap_razor, decode_room=2)[1]
    assert all(isinstance(layer, RaggedKV) for layer in st.layers)
    assert (np.asarray(st.layers[0].head_capacity)[:, 0] == 8 + 2).all()  # the retrieval head keeps SnapKV's 8
    kivi = get_method("kivi", bits=4, group=8, residual=8)
    razor_kivi = chain(get_method("razor", count_weight=False, **razor), kivi)
    assert razor_kivi.kind == "quantized"
    rag = st
    st = prefill_compressed(model, params, prompt, method=razor_kivi, decode_room=2)[1]
    for lq in st.layers:  # KIVI quantized Razor's padded view: same heads, Razor's positions (sinks, buffer)
        assert type(lq).__name__ == "QuantizedKV"
        held = np.asarray(jnp.sum(lq.valid, -1))
        assert (held[:, 1:] <= 1 + 3 + 1).all() and kvjax.nbytes(lq) == sum(x.nbytes for x in jax.tree.leaves(lq))
    with pytest.raises(ValueError, match="weighted slots"):  # a dense cache cannot hold the compensation counts
        densify(rag.replace(layers=tuple(layer.replace(weight_slot=layer.fill, log_weight=layer.fill * 0.0)
                                         for layer in rag.layers)))
    with pytest.raises(ValueError, match="outside the model"):
        prefill_compressed(model, params, prompt, method=get_method("razor", heads=((5, 0),)), decode_room=2)
    with pytest.raises(ValueError, match="params"):
        get_method("razor").prefill(st, None, kvjax.compress.Context(cfg=CFG))
    with pytest.raises(ValueError, match="ratio"):
        get_method("razor", ratio=0.5)

"""Per-head ragged storage (kvjax.state.RaggedKV) and its Pallas decode kernel (interpret mode).

* a ragged layer attends exactly like a masked dense layer holding the same tokens (reference and kernel);
* storage round-trips through gather (dense -> ragged -> dense), append and model decode steps;
* ``kvjax.nbytes`` counts the tokens kept plus room and offsets, never the padding to the largest head;
* AdaKV's ragged and padded storage give identical tokens, the ragged one in fewer bytes; chains densify before a
  quantizer; the kernel equals its reference with garbage outside the segments.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.attention import Observe, reference_attention
from kvjax.compress import chain, get_method
from kvjax.generate import prefill_compressed
from kvjax.state import DenseKV, RaggedKV, as_dense_layer, ragged_from_dense, valid_nbytes
from pallas_kernels import attention_impl
from pallas_kernels.ragged_decode_attention import ragged_decode_attention
from pallas_kernels.reference import ragged_decode_attention_reference

B, H, G, C, D = 2, 3, 2, 10, 8


def compacted_dense(seed, fills, room=0):
    """A compacted DenseKV (each head's tokens in slots [0, fill), increasing positions) with ``room`` free slots;
    empty slots hold NaN (they must never be read)."""
    rng = np.random.default_rng(seed)
    fills = np.asarray(fills, np.int32)
    c = C + room
    pos = np.full((B, H, c), -1, np.int32)
    k = np.full((B, H, c, D), np.nan, np.float32)
    v = np.full((B, H, c, D), np.nan, np.float32)
    for b in range(B):
        for h in range(H):
            f = fills[b, h]
            pos[b, h, :f] = np.sort(rng.choice(30, f, replace=False))
            k[b, h, :f] = rng.normal(size=(f, D))
            v[b, h, :f] = rng.normal(size=(f, D))
    return DenseKV(k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos), fill=jnp.asarray(fills))


FILLS = [[10, 2, 6], [0, 9, 4]]


def test_roundtrip_bytes_and_masked_dense_attention():
    dense = compacted_dense(0, FILLS)
    room = 2
    rag = ragged_from_dense(dense, room)
    caps = np.asarray(FILLS) + room
    assert rag.flat_size == caps.sum(axis=1).max() and rag.max_len == caps.max()
    np.testing.assert_array_equal(np.asarray(rag.offsets), np.concatenate([np.zeros((B, 1)), caps.cumsum(1)], 1))
    # bytes = kept tokens + their room (k, v f32, pos int32) + offsets + fill: no padding to the largest head
    n = int(caps.sum(1).max())
    assert kvjax.nbytes(rag) == B * n * (2 * D * 4 + 4) + B * (H + 1) * 4 + B * H * 4
    assert kvjax.nbytes(rag) < kvjax.nbytes(dense.replace(
        k=jnp.pad(dense.k, ((0, 0), (0, 0), (0, room), (0, 0))), v=jnp.pad(dense.v, ((0, 0), (0, 0), (0, room), (0, 0))),
        pos=jnp.pad(dense.pos, ((0, 0), (0, 0), (0, room)), constant_values=-1)))
    back = as_dense_layer(rag)
    valid = np.asarray(dense.pos) >= 0
    np.testing.assert_array_equal(np.asarray(back.pos)[..., :C], np.asarray(dense.pos))
    assert (np.asarray(back.pos)[..., C:] == -1).all()
    np.testing.assert_array_equal(np.asarray(back.k)[..., :C, :][valid], np.asarray(dense.k)[valid])
    # append 2 decode tokens to both, then attend: identical to the masked dense layer holding the same tokens
    rng = np.random.default_rng(1)
    padded = back
    append = jax.jit(lambda layer, k, v, p: layer.append(k, v, p))
    for step in range(room):
        k = jnp.asarray(rng.normal(size=(B, H, 1, D)), jnp.float32)
        v = jnp.asarray(rng.normal(size=(B, H, 1, D)), jnp.float32)
        p = jnp.asarray([[30 + step], [-1 if step else 31]], jnp.int32)  # a padding token in row 1
        rag, padded = append(rag, k, v, p), append(padded, k, v, p)
    assert not np.isnan(np.asarray(rag.k)).any()
    np.testing.assert_array_equal(np.asarray(as_dense_layer(rag).pos), np.asarray(padded.pos))
    q = jnp.asarray(rng.normal(size=(B, H * G, 3, D)), jnp.float32)
    qp = jnp.asarray([[29, 30, 31], [5, 31, -1]], jnp.int32)
    obs = Observe(window=2, colsum=True)
    got, got_obs = jax.jit(lambda r, q, qp: r.attend(q, qp, observe=obs))(rag, q, qp)
    want, want_obs = jax.jit(lambda q, k, v, qp, p: reference_attention(q, k, v, qp, p, observe=obs))(
        q, padded.k, padded.v, qp, padded.pos)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got_obs["colsum"]), np.asarray(want_obs["colsum"]))
    # the Pallas kernel (interpret mode) on the flat buffer
    pal, _ = rag.attend(q[:, :, 1:2], qp[:, 1:2], impl="pallas")
    np.testing.assert_allclose(np.asarray(pal), np.asarray(want[:, :, 1:2]), atol=1e-5)
    # a full head segment drops further tokens; the model refuses such input up front
    assert (np.asarray(rag.fill) == np.asarray(rag.head_capacity)).all()


def test_kernel_matches_reference_with_garbage_outside_segments():
    rng = np.random.default_rng(0)
    lens = np.array([[37, 0, 13], [7, 50, 22]], np.int32)
    caps = lens + 3
    starts = np.concatenate([np.zeros((B, 1), np.int32), np.cumsum(caps, 1)[:, :-1]], 1).astype(np.int32)
    n = int(caps.sum(1).max()) + 4
    k = rng.normal(size=(B, n, D)).astype(np.float32)
    v = rng.normal(size=(B, n, D)).astype(np.float32)
    pos = rng.integers(0, 120, (B, n)).astype(np.int32)
    pos[rng.random(pos.shape) < 0.1] = -1
    for b in range(B):
        out = np.ones(n, bool)
        for h in range(H):
            out[starts[b, h]:starts[b, h] + lens[b, h]] = False
        k[b, out], v[b, out] = np.nan, np.inf
    q = jnp.asarray(rng.normal(size=(B, H * G, 2, D)), jnp.float32)
    qp = jnp.asarray([[100, 101], [110, -1]], jnp.int32)
    args = (q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos), qp, jnp.asarray(starts), jnp.asarray(lens))
    for kw in (dict(block_k=8, num_splits=3, window=40, logit_softcap=3.0),):  # (no window: the test above)
        ref = ragged_decode_attention_reference(*args, window=kw.get("window", 0),
                                                logit_softcap=kw.get("logit_softcap", 0.0))
        out = ragged_decode_attention(*args, max_len=int(caps.max()), **kw)
        assert np.isfinite(np.asarray(out)).all()
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)
    assert attention_impl("ragged", "reference") is ragged_decode_attention_reference
    with pytest.raises(ValueError, match="pos must have shape"):
        ragged_decode_attention(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos)[:, :-1], qp,
                                jnp.asarray(starts), jnp.asarray(lens))
    with pytest.raises(ValueError, match="k must have shape"):
        ragged_decode_attention(q, jnp.asarray(k)[:, None], jnp.asarray(v), jnp.asarray(pos), qp,
                                jnp.asarray(starts), jnp.asarray(lens))


@pytest.fixture(scope="module")
def tiny():
    from test_compress_api import CFG, tiny_params

    return kvjax.Model(CFG), tiny_params(CFG)


@pytest.mark.slow
def test_adakv_ragged_equals_padded_in_fewer_bytes_and_chains(tiny):
    model, params = tiny
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    # prompt shape and window as tests/test_compress_api.py: shared compiles. The safeguard allocation keeps exactly
    # H * (budget - window) prefix tokens per row (FFY0's rounded rule, the default, may keep up to H / 2 fewer or
    # more); with the GQA order pool-then-reduce this prompt gets unequal head budgets.
    kw = dict(budget=6, window=3, kernel=3)
    ada = dict(kw, allocation="safeguard", gqa_order="pool_then_reduce")
    room = 2
    states = {s: prefill_compressed(model, params, prompt, method=get_method("adakv", storage=s, **ada),
                                    decode_room=room)[1] for s in ("ragged", "padded")}
    rag, pad = states["ragged"], states["padded"]
    assert all(isinstance(layer, RaggedKV) for layer in rag.layers)
    for lr, lp in zip(rag.layers, pad.layers):
        np.testing.assert_array_equal(np.asarray(as_dense_layer(lr).pos)[..., :lp.capacity], np.asarray(lp.pos))
        # every row holds H * budget prompt tokens plus the room of every head: the flat buffer has exactly that
        assert lr.flat_size == lr.num_heads * (6 + room) < lp.k.shape[1] * lp.capacity
    assert kvjax.nbytes(rag) < kvjax.nbytes(pad)
    tok = jnp.asarray([3, 5], jnp.int32)
    for _ in range(room):  # decode through the model (jitted forward, the ragged layers in one scan)
        lr, rag = model.jit_decode_step(params, tok, rag)
        lp, pad = model.jit_decode_step(params, tok, pad)
        np.testing.assert_allclose(np.asarray(lr), np.asarray(lp), atol=1e-5)
    with pytest.raises(ValueError, match="segment lacks"):
        model.decode_step(params, tok, rag)
    # a quantizer after ragged AdaKV quantizes the exact padded view; a decode-time evictor before it is refused
    kivi = get_method("kivi", bits=4, group=8, residual=8)
    both = chain(get_method("adakv", **ada), kivi)
    assert both.kind == "quantized" and chain(get_method("adakv", **ada), get_method("snapkv", **kw)).kind == "dense"
    got = prefill_compressed(model, params, prompt, method=both, decode_room=room)[1]
    for lq, lp in zip(got.layers, states["padded"].layers):
        assert type(lq).__name__ == "QuantizedKV"
        for b in range(2):
            for h in range(lp.pos.shape[1]):
                want = np.asarray(lp.pos[b, h])
                have = np.asarray(lq.pos[b, h])
                assert sorted(have[have >= 0].tolist()) == sorted(want[want >= 0].tolist())
    with pytest.raises(ValueError, match="later method of the chain leaves ragged ones"):
        chain(get_method("h2o", budget=6), get_method("adakv", **ada))
    with pytest.raises(ValueError, match="storage"):
        get_method("adakv", storage="paged")


@pytest.mark.slow
def test_adakv_fixed_shapes_keeps_the_same_tokens_with_static_sizes(tiny):
    """``fixed_shapes=True``: the same kept tokens and logits as the exact ragged sizes, with sizes that do not depend
    on the prompt (one compiled decode program for every prompt of a shape)."""
    model, params = tiny
    room = 2
    ada = dict(budget=6, window=3, kernel=3, allocation="ffy0", gqa_order="pool_then_reduce")
    sizes = set()
    for seed in (0, 1):
        prompt = jnp.asarray(np.random.default_rng(seed).integers(0, 64, (2, 12)), jnp.int32)
        exact = prefill_compressed(model, params, prompt, method=get_method("adakv", **ada), decode_room=room)[1]
        fixed = prefill_compressed(model, params, prompt, method=get_method("adakv", fixed_shapes=True, **ada),
                                   decode_room=room)[1]
        for le, lf in zip(exact.layers, fixed.layers):
            pe, pf = np.asarray(as_dense_layer(le).pos), np.asarray(as_dense_layer(lf).pos)
            for b in range(2):
                for h in range(pe.shape[1]):
                    assert sorted(pe[b, h][pe[b, h] >= 0].tolist()) == sorted(pf[b, h][pf[b, h] >= 0].tolist())
            assert lf.flat_size >= le.flat_size and lf.max_len >= le.max_len
        sizes.add(tuple((lf.flat_size, lf.max_len) for lf in fixed.layers))
        tok = jnp.asarray([3, 5], jnp.int32)
        np.testing.assert_allclose(np.asarray(model.jit_decode_step(params, tok, fixed)[0]),
                                   np.asarray(model.jit_decode_step(params, tok, exact)[0]), atol=1e-5)
        assert valid_nbytes(fixed) == valid_nbytes(exact)
    assert len(sizes) == 1

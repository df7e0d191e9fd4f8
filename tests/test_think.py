"""ThinK (kvjax.compress.think): channel scores, pruned storage, attention equal to attention on the kept dims."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_compress_api import CFG, tiny_params

import kvjax
from kvjax.compress import chain, get_method
from kvjax.compress.think import ChannelPrunedKV, channel_scores
from kvjax.generate import prefill_compressed
from kvjax.state import DenseKV


def test_channel_scores_are_the_papers_norm_product():
    rng = np.random.default_rng(0)
    b, hq, hkv, w, c, d = 1, 4, 2, 3, 6, 5
    q = rng.normal(size=(b, hq, w, d)).astype(np.float32)
    k = rng.normal(size=(b, hkv, c, d)).astype(np.float32)
    pos = np.tile(np.arange(c), (b, hkv, 1)).astype(np.int32)
    pos[0, 1, 4:] = -1  # invalid slots do not count
    layer = DenseKV(k=jnp.asarray(k), v=jnp.asarray(k), pos=jnp.asarray(pos), fill=jnp.full((b, hkv), c))
    got = np.asarray(channel_scores(jnp.asarray(q), layer))
    for h in range(hkv):
        kk = k[0, h][pos[0, h] >= 0]
        for j in range(d):
            qq = q[0, 2 * h:2 * h + 2, :, j]
            # ||Q_w[:, j] K[:, j]^T||_F^2 / (w * n) summed over the group: the squared-norm ranking of the paper
            want = sum(np.linalg.norm(np.outer(qg, kk[:, j])) ** 2 for qg in qq) / (w * len(kk))
            np.testing.assert_allclose(got[0, h, j], want, rtol=1e-5)


def test_pruned_attention_equals_attention_on_kept_dims_and_bytes():
    model, params = kvjax.Model(CFG), tiny_params(CFG)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    snap = get_method("snapkv", budget=8, window=3, kernel=3)
    think = get_method("think", ratio=0.5, window=3, recent=2)
    dense = prefill_compressed(model, params, prompt, method=snap, decode_room=2)[1]
    st = prefill_compressed(model, params, prompt, method=chain(snap, think), decode_room=2)[1]
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, CFG.num_heads, 1, CFG.head_dim)), jnp.float32)
    qp = st.next_pos[:, None]
    g = CFG.num_heads // CFG.num_kv_heads
    for ld, lt in zip(dense.layers, st.layers):
        assert isinstance(lt, ChannelPrunedKV)
        assert lt.pruned.k.shape[-1] == CFG.head_dim // 2 and lt.recent.k.shape[-1] == CFG.head_dim
        got, _ = jax.jit(lambda layer, q, qp: layer.attend(q, qp))(lt, q, qp)
        k, v, pos = (np.asarray(x) for x in (ld.k, ld.v, ld.pos))
        ch = np.asarray(lt.channels)
        n = np.asarray(st.next_pos)
        want = np.zeros(got.shape, np.float64)
        for b in range(2):
            for hq in range(CFG.num_heads):
                h = hq // g
                ok = pos[b, h] >= 0
                rec = ok & (pos[b, h] >= n[b] - 2)
                qv = np.asarray(q[b, hq, 0], np.float64)
                logit = np.where(rec, k[b, h] @ qv, k[b, h][:, ch[b, h]] @ qv[ch[b, h]]) / np.sqrt(CFG.head_dim)
                p = np.where(ok, np.exp(logit - logit[ok].max()), 0.0)
                want[b, hq, 0] = (p / p.sum()) @ v[b, h]
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    # bytes: the pruned keys hold half the channels (+ 1-byte channel indices); values and positions unchanged
    lt = st.layers[0]
    assert kvjax.nbytes(lt.pruned.k) * 2 == lt.pruned.k.size * 4 * 2 and lt.channels.dtype == jnp.uint8
    assert kvjax.nbytes(st) < kvjax.nbytes(dense)
    # valid bytes: the pruned part and the recent part each count their valid slots only (the 2 free decode slots
    # per head are not charged; before the fix every ChannelPrunedKV array counted in full)
    from kvjax.state import valid_nbytes  # noqa: PLC0415

    room = sum(2 * CFG.num_kv_heads * int(x.recent.capacity - np.asarray(x.recent.fill).max()) for x in st.layers)
    per_slot = 4 * (2 * CFG.head_dim + 1)  # full-dimension key, value, position of a recent-part slot
    assert valid_nbytes(st) == kvjax.nbytes(st) - room * per_slot > 0
    with pytest.raises(ValueError, match="leaves channel ones"):
        chain(get_method("h2o", budget=8), think)
    # ThinK -> int8 (issue 14's composition): both parts quantized per token; bytes = a hand count; keys/values
    # within int8 rounding of the float chain's
    int8 = get_method("int8")
    assert chain(snap, think, int8).kind == "quantized"
    sq = int8.prefill(st, None, kvjax.compress.Context(cfg=CFG, decode_room=2, prompt_len=12))[0]
    hkv, d = CFG.num_kv_heads, CFG.head_dim

    def int8_bytes(c, dk):  # codes of dk + d channels, f16 scale + zero of keys and of values, position, per slot
        return 2 * hkv * (c * (dk + d + 2 * 2 * 2 + 4) + 4)

    want = sum(int8_bytes(x.pruned.capacity, d // 2) + int8_bytes(x.recent.capacity, d) + kvjax.nbytes(x.channels)
               for x in st.layers) + kvjax.nbytes(st.next_pos) + kvjax.nbytes(st.rope_shift)
    assert kvjax.nbytes(sq) == want
    for lt, lq in zip(st.layers, sq.layers):
        (kf, vf), (kq, vq) = jax.jit(lambda a, b: (a.dense(), b.dense()))(lt, lq)
        ok = np.asarray(lt.pos >= 0)[..., None]
        np.testing.assert_array_equal(np.asarray(lq.pos), np.asarray(lt.pos))
        for f, q_ in ((kf, kq), (vf, vq)):  # per-token int8: within half a step of the token's range
            f, q_ = np.asarray(f), np.asarray(q_)
            rng_ = np.ptp(np.where(ok, f, 0), axis=-1, keepdims=True)
            err = np.where(ok, np.abs(q_ - f), 0)
            assert 0 < err.max() and np.all(err <= rng_ / 255 * 0.51 + 1e-6)
    with pytest.raises(ValueError, match=r"ThinK's pruned keys \(4 kept channels\) with 4-bit codes in groups of 8"):
        get_method("int4", group=8).prefill(st, None, kvjax.compress.Context(cfg=CFG, decode_room=2, prompt_len=12))
    with pytest.raises(ValueError, match="ratio"):
        get_method("think", ratio=1.0)


@pytest.mark.slow
def test_decode_appends_full_keys_and_ratio_zero_is_snapkv():
    model, params = kvjax.Model(CFG), tiny_params(CFG)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    snap = get_method("snapkv", budget=8, window=3, kernel=3)
    dense = prefill_compressed(model, params, prompt, method=snap, decode_room=2)[1]
    st = prefill_compressed(model, params, prompt, method=chain(snap, get_method("think", ratio=0.0, window=3)),
                            decode_room=2)[1]
    l0, st2 = model.jit_decode_step(params, jnp.asarray([3, 5]), st)
    assert (np.asarray(st2.layers[0].recent.fill) == np.asarray(st.layers[0].recent.fill) + 1).all()
    l1, _ = model.jit_decode_step(params, jnp.asarray([3, 5]), dense)
    np.testing.assert_allclose(np.asarray(l0), np.asarray(l1), atol=1e-5)

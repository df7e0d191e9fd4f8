"""Cross-layer and streaming methods composed with a quantizer (issue 14): eviction -> xKV -> int8, eviction ->
MiniCache -> KIVI-4, LaCache -> int8. Bytes equal a hand count of the stored arrays; what the quantized chain
attends equals the unquantized chain's states within the quantizer's rounding; decoding runs through the model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.compress import Context, chain, get_method
from kvjax.compress.minicache import MergedPairKV
from kvjax.compress.xkv import CrossLayerKV
from kvjax.quant.cache import QuantizedKV, QuantTensor
from kvjax.state import DenseKV, bound_layers, nbytes, valid_nbytes
from tests.test_compress_api import CFG, _forced_decode, tiny_params

T, ROOM, B = 12, 3, 2
H, D = CFG.num_kv_heads, CFG.head_dim
F16, F32, I32 = 2, 4, 4


@pytest.fixture(scope="module")
def setup():
    model, params = kvjax.Model(CFG), tiny_params(CFG)
    rng = np.random.default_rng(3)  # the prompt of tests/test_xkv.py and test_minicache.py (shared compilations)
    prompt = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, ROOM)), jnp.int32)
    observe = get_method("snapkv", window=3).observe()
    _, state, obs = model.jit_forward(params, prompt, model.init_state(B, T), None, observe=observe, logits="last")
    return model, params, state, obs, tokens


def _prefill(method, state, obs):
    return method.prefill(state, obs, Context(cfg=CFG, decode_room=ROOM, prompt_len=T))[0]


def _tensor_bytes(x: QuantTensor) -> int:
    """Hand count: packed codes (``bits`` per entry of the padded rows) plus f16 scale and zero per group."""
    *lead, rows, width = x.codes.shape
    d = width * 8 // x.bits
    groups = rows * (d // x.group) if x.axis == "token" else (rows // x.group) * d
    return int(np.prod(lead)) * (rows * d * x.bits // 8 + 2 * groups * F16)


def _int8_cache_bytes(c: QuantizedKV) -> int:
    """Hand count of a per-token int8 cache without residual: codes, f16 scale + zero per token, positions, fill,
    (B, H) extras."""
    cap = c.pos.shape[2]
    return B * H * (cap * (2 * D + 2 * 2 * F16 + I32) + I32) + sum(B * H * I32 for _ in c.extras)


@jax.jit
def _views(flt_layers, q_layers, k, v, q):
    """Per layer of the float and the quantized chain (shared parts attached): the compressed part's keys and values
    (``factored()`` / ``merged()``), and the attention output of queries ``q`` after appending one token ``k``/``v``
    at position ``T`` (so decoding writes into the quantized decode buffer). One compiled program per test."""
    pos = jnp.full((B, 1), T, jnp.int32)

    def one(layer):
        part = layer.factored() if hasattr(layer, "factored") else layer.merged()
        new = layer.append(k, v, pos)
        return part, new.attend(q, pos)[0], new.fill

    return [one(x) for x in flt_layers], [one(x) for x in q_layers]


def _inputs(seed):
    rng = np.random.default_rng(seed)
    k, v = (jnp.asarray(rng.normal(size=(B, H, 1, D)), jnp.float32) for _ in range(2))
    return k, v, jnp.asarray(rng.normal(size=(B, CFG.num_heads, 1, D)), jnp.float32)


def test_xkv_then_int8_after_eviction(setup):
    model, params, state, obs, tokens = setup
    snap = get_method("snapkv", budget=6, window=3, kernel=3)  # as tests/test_xkv.py
    xkv = get_method("xkv", group_size=2, rank_k=2, rank_v=3)
    int8 = get_method("int8")
    assert chain(snap, xkv, int8).kind == "quantized"
    flt = _prefill(chain(snap, xkv), state, obs)
    q = _prefill(int8, flt, None)
    owner, other = q.layers
    assert isinstance(owner, CrossLayerKV) and isinstance(owner.shared["ak"], QuantTensor)
    assert isinstance(owner.recent, QuantizedKV) and other.shared is None
    n = owner.num_factored
    # hand count: the float chain's bytes minus its factors A (f32) and decode buffers, plus int8 factors (a code per
    # entry, f16 scale + zero per token) and int8 decode buffers
    fa = B * n * (2 + 3) * F32
    qa = B * n * (2 + 3) + 2 * B * n * 2 * F16
    frec = sum(nbytes(x.recent) for x in flt.layers)
    assert sum(_tensor_bytes(t) for t in owner.shared.values()) == qa
    assert nbytes(q) == nbytes(flt) - fa - frec + qa + sum(_int8_cache_bytes(x.recent) for x in q.layers)
    assert valid_nbytes(q) < nbytes(q)
    vf_, vq_ = _views(bound_layers(flt), bound_layers(q), *_inputs(0))
    for lq, x, y in zip(q.layers, vf_, vq_):  # reconstruction within the rounding of A (int8)
        (kf, vf), of, _ = x
        (kq, vq), oq, fill = y
        for xf, xq, a, bl, rope in ((kf, kq, owner.shared["ak"], lq.bk, True), (vf, vq, owner.shared["av"], lq.bv,
                                                                                  False)):
            half = 0.5 * np.asarray(a.scale, np.float32)[:, :, 0]  # (B, n): each token's rounding step / 2
            bound = half[:, None, :, None] * np.abs(np.asarray(bl)).sum(1).reshape(B, 1, H, D).transpose(0, 2, 1, 3)
            err = np.abs(np.asarray(xq) - np.asarray(xf))
            if rope:  # RoPE rotates channel pairs (j, j + D/2): bound each pair's norm
                err, bound = (np.hypot(x[..., :D // 2], x[..., D // 2:]) for x in (err, bound))
            assert 0 < err.max() and np.all(err <= bound * 1.01 + 1e-6)
        assert np.all(np.asarray(fill) == np.asarray(lq.fill) + 1)
        assert 0 < np.abs(np.asarray(oq) - np.asarray(of)).max() < 0.05


def test_minicache_then_kivi4_after_eviction(setup):
    model, params, state, obs, tokens = setup
    snap = get_method("snapkv", budget=8, window=3, kernel=3)
    mc = get_method("minicache", start_layer=0, gamma=0.05)
    kivi = get_method("kivi", bits=4, group=4, residual=4)
    assert chain(snap, mc, kivi).kind == "quantized"
    flt = _prefill(chain(snap, mc), state, obs)
    q = _prefill(kivi, flt, None)
    first, second = q.layers
    assert isinstance(first, MergedPairKV) and isinstance(first.shared["dir_k"], QuantTensor)
    assert isinstance(first.exact, QuantizedKV) and isinstance(second.exact, QuantizedKV)
    n = first.num_merged
    npad = -(-n // 4) * 4
    # hand count of the directions: keys 4-bit per channel over groups of 4 tokens, values 4-bit per token over
    # groups of 4 channels, f16 scales and zeros
    qdir = B * H * (npad * D // 2 + 2 * (npad // 4) * D * F16) + B * H * (n * D // 2 + 2 * n * (D // 4) * F16)
    assert sum(_tensor_bytes(t) for t in first.shared.values()) == qdir
    fdir = 2 * B * H * n * D * F32

    def kivi_bytes(c):  # the unmerged part as KIVI-4 stores a layer of c slots: whole groups of R = 4 quantized
        cq = c // 4 * 4  # (4-bit codes, f16 per-channel key scales per 4 tokens, per-token value scales per 4
        return B * H * (2 * cq * D // 2 + 2 * (cq // 4) * D * F16 + 2 * cq * (D // 4) * F16  # channels), a
                        + 2 * 4 * D * F32 + (cq + 4) * I32 + I32)  # 4-slot f32 residual, positions, fill

    qex = [kivi_bytes(x.exact.capacity) for x in flt.layers]
    assert nbytes(q) == nbytes(flt) - fdir + qdir - sum(nbytes(x.exact) for x in flt.layers) + sum(qex)
    vf_, vq_ = _views(bound_layers(flt), bound_layers(q), *_inputs(1))
    for lf, lq, x, y in zip(flt.layers, q.layers, vf_, vq_):
        (kf, vf), of, _ = x
        (kq, vq), oq, _ = y
        kf, vf, kq, vq = (np.asarray(a) for a in (kf, vf, kq, vq))
        mag = np.asarray(lq.mag_k)[..., None]
        # 4-bit directions: each entry within half a step of its group's range (unit vectors: entries in [-1, 1])
        step = 2.0 / 15
        assert 0 < np.abs(kq - kf).max() and np.all(np.abs(kq - kf) <= mag * step / 2 + 1e-4)
        assert np.all(np.abs(vq - vf) <= np.asarray(lq.mag_v)[..., None] * step / 2 + 1e-4)
        for pf, pq in zip(np.asarray(lf.pos), np.asarray(lq.pos)):  # the same tokens held
            assert sorted(p for p in pf.ravel().tolist() if p >= 0) == sorted(p for p in pq.ravel().tolist() if p >= 0)
        assert 0 < np.abs(np.asarray(oq) - np.asarray(of)).max() < 0.3


def test_lacache_then_int8_streams_the_same_ladder(setup):
    """Prefill + 3 teacher-forced decode steps (the jitted hook compacting the int8 cache): every layer holds the
    positions of the host replay of the ladder, the prompt tokens it still holds within int8 rounding of their
    keys/values, at constant bytes (hand count)."""
    from kvjax.compress.lacache import ladder_positions  # noqa: PLC0415

    model, params, state, obs, tokens = setup
    lac = get_method("lacache", cache_size=6, span=1, n_sink=1)
    both = chain(lac, get_method("int8"))
    ctx = Context(cfg=CFG, decode_room=ROOM, prompt_len=T)
    q = _prefill(both, state, obs)
    assert all(isinstance(x, QuantizedKV) and "lacache_cursor" in x.extras for x in q.layers)
    assert nbytes(q) == sum(_int8_cache_bytes(x) for x in q.layers) + 2 * B * I32  # + next_pos, rope_shift
    _, after = _forced_decode(model, both, ctx, params, q, tokens)
    assert nbytes(after) == nbytes(q)  # fixed size while streaming
    for i, (x, full) in enumerate(zip(after.layers, state.layers)):
        want, cur = ladder_positions(np.arange(T + ROOM), 2, i, before=2, after=1, n_sink=1, cache_size=6)
        pos = np.asarray(x.pos)
        for r in range(B):
            for h in range(H):
                assert pos[r, h][pos[r, h] >= 0].tolist() == want.tolist()
        assert np.all(np.asarray(x.extras["lacache_cursor"]) == cur)
        kq, vq = (np.asarray(a) for a in jax.jit(lambda c: c.dense())(x))
        old = (pos >= 0) & (pos < T)  # prompt tokens still held: compare with the prefill's keys / values
        idx = np.clip(pos, 0, T - 1)[..., None]
        for got, src, s in ((kq, full.k, x.k_scale), (vq, full.v, x.v_scale)):
            want_kv = np.take_along_axis(np.asarray(src), idx, axis=2)
            err = np.where(old[..., None], np.abs(got - want_kv), 0)
            assert 0 < err.max() and np.all(err <= 0.5 * np.asarray(s, np.float32) * 1.01 + 1e-6)
    from kvjax.eval.harness import grow_room  # noqa: PLC0415

    grown = grow_room(q, 4)  # the harness's "once" perplexity setting: room for a 4-token chunk, no eviction
    assert all(x.capacity == 7 + 4 - 1 and x.k_codes.shape[2] == x.pos.shape[2] for x in grown.layers)
    with pytest.raises(ValueError, match="residual=0"):
        chain(lac, get_method("kivi"))
    with pytest.raises(ValueError, match="decoding"):  # a decode-time evictor the quantized layout cannot follow
        chain(get_method("h2o", budget=8), get_method("int8"))


def test_quant_tensor_pads_widths_that_do_not_fit_the_groups():
    """A factor 72 wide (xKV's rank of a 2-layer group) in int4 groups of 16 channels: padded to 80 columns (stored
    and counted); per channel over 4-row groups, 13 rows padded to 16. Dequantized within half a step."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 13, 72)), jnp.float32)

    @jax.jit
    def both(x):
        t = QuantTensor.build(x, None, bits=4, group=16, axis="token")
        c = QuantTensor.build(x, None, bits=2, group=4, axis="channel")
        return t, t.dequant(), c, c.dequant()

    t, xt, c, xc = both(x)
    assert t.codes.shape == (2, 13, 40) and nbytes(t) == 2 * 13 * (40 + 2 * 5 * F16)
    step = (np.asarray(t.scale, np.float32)[..., :, None] * np.ones((1, 1, 1, 16))).reshape(2, 13, 80)[..., :72]
    assert np.all(np.abs(np.asarray(xt) - np.asarray(x)) <= 0.5 * step * 1.01 + 1e-6)
    assert c.codes.shape == (2, 16, 18) and c.scale.shape == (2, 4, 72) and xc.shape == x.shape

"""Quantized KV caches: packing, error bounds, KIVI / int8 / int4 / GEAR / MiKV / RotateKV, streaming residual flushes
under jit, byte counts, composition with eviction, bad input."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.attention import Observe, reference_attention
from kvjax.compress import chain, get_method
from kvjax.compress.base import Context
from kvjax.compress.gear import GearKV, gear_dense_layer
from kvjax.generate import generate
from kvjax.quant import packing
from kvjax.quant import quantizers as qz
from kvjax.quant.cache import QuantizedKV, QuantSpec, init_quantized_layer, quantize_dense_layer
from kvjax.state import DenseKV, init_dense_layer

from conftest import tiny_llama_with_prompt

T = 40

# jitted once per static configuration (eager conversion dispatches hundreds of small ops: several times slower)
_quantize = jax.jit(quantize_dense_layer, static_argnames=("spec", "room", "keep_bits", "keep_group"))
_gear = jax.jit(gear_dense_layer, static_argnames=("sp", "room"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_with_prompt(tmp_path_factory, T)


@pytest.fixture(scope="module")
def prompt_state(tiny):
    """The tiny model's full-precision cache after a 64-token prompt (real keys/values)."""
    model, params, _ = tiny
    toks = jnp.asarray(np.random.default_rng(1).integers(0, model.cfg.vocab_size, (1, 64)), jnp.int32)
    _, state = model.jit_prefill(params, toks, model.init_state(1, 64), logits="none")
    return state


def _dense(k, v, pos=None, fill=None) -> DenseKV:
    b, h, c, _ = k.shape
    if pos is None:
        pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, h, c))
    if fill is None:
        fill = jnp.sum(pos >= 0, axis=-1, dtype=jnp.int32)
    return DenseKV(k=k, v=v, pos=pos, fill=fill)


def _with_outlier_channels(layer: DenseKV) -> DenseKV:
    """Keys with two injected outlier channels (large, mostly one-signed — what real LLM keys show)."""
    k = layer.k.at[..., 3].multiply(12.0).at[..., 3].add(8.0).at[..., 11].multiply(-9.0)
    return layer.replace(k=k)


# ------------------------------------------------------------------------------------------------- packing / bounds


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_roundtrip_exact(bits):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, size=(2, 3, 7, 64)).astype(np.uint8)
    packed = packing.pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (2, 3, 7, 64 * bits // 8)
    np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits, 64)), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis,group", [("token", 8), ("token", 0), ("channel", 16)])
def test_quantize_error_within_half_step(bits, axis, group):
    rng = np.random.default_rng(bits)
    x = jnp.asarray(rng.normal(size=(2, 3, 64, 32)) * rng.uniform(0.1, 5, size=(1, 1, 1, 32)), jnp.float32)
    valid = jnp.asarray(rng.random((2, 3, 64)) > 0.2)  # invalid slots must not widen the range
    x = jnp.where(valid[..., None], x, 1e4)
    g = qz.resolve_group(group, 32, bits) if axis == "token" else group
    codes, scale, zero = qz.quantize(x, valid, bits=bits, group=g, axis=axis, scale_dtype=jnp.float32)
    y = qz.dequantize(codes, scale, zero, bits=bits, group=g, axis=axis)
    s = np.asarray(scale)
    step = np.repeat(s, g, axis=-1) if axis == "token" else np.repeat(s, g, axis=-2)  # per-entry scale
    err = np.abs(np.asarray(y) - np.asarray(x))
    ok = np.asarray(valid)[..., None] & np.ones_like(err, bool)
    assert np.all(err[ok] <= step[ok] / 2 + 1e-5 * (1 + np.abs(np.asarray(x))[ok]))
    assert s.max() < 100  # the 1e4 fill of invalid slots did not enter the min/max


# ------------------------------------------------------------------------------------------------- error ordering


def _rel_err(a, b, pos):
    m = np.asarray(pos >= 0)[..., None]
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sqrt(np.sum(((a - b) * m) ** 2) / np.sum((b * m) ** 2))


@pytest.mark.parametrize("bits", [2, 4])
def test_gear_error_strictly_below_plain_quantization(prompt_state, bits):
    layer = _with_outlier_channels(prompt_state.layers[0])
    gear = get_method("gear", bits=bits, buffer=16, group=8).spec(16, 64)
    plain_same_backbone = get_method("gear", bits=bits, buffer=16, group=8, rank=0, prefill_rank=0,
                                     outlier_ratio=0.0).spec(16, 64)
    g, _, _ = _gear(layer, sp=gear)
    p, _, _ = _gear(layer, sp=plain_same_backbone)
    per_token, _, _ = _quantize(layer, QuantSpec(bits=bits, v_bits=bits, k_group=0, v_group=0,
                                                            k_axis="token", residual=0))
    assert gear.prompt_rank == 4 and gear.prompt_k_each == 10 and gear.quant == ("kcvt" if bits == 4 else "kivi")
    for which in (0, 1):  # keys, values
        ref = (layer.k, layer.v)[which]
        e_gear = _rel_err(g.dense()[which][:, :, :64], ref, layer.pos)
        e_plain = _rel_err(p.dense()[which][:, :, :64], ref, layer.pos)
        e_tok = _rel_err(per_token.dense()[which][:, :, :64], ref, layer.pos)
        assert e_gear < e_plain and e_gear < e_tok, (which, e_gear, e_plain, e_tok)
    # everything is really stored: the 64-token prompt as one chunk per head (packed codes, fp16 scales, COO
    # outliers with uint16 flat indices into 64x16 entries, fp16 rank-4 factors), no decode chunk (no room), the
    # f32 16-token streaming buffer, positions
    h, c, d, el = 2, 64, 16, 16
    kscale = 1 if bits == 4 else c // 8  # keys: one scale per channel over the chunk (KCVT) / per 8 tokens (KIVI)
    vscale = 1 if bits == 4 else d // 8  # values per token: the head (KCVT) / groups of 8 channels (KIVI)
    part = h * c * d * bits // 8 + h * 20 * (2 + 2) + h * (c * 4 + 4 * d) * 2  # codes, COO, A and B
    scales = 2 * h * kscale * d * 2 + 2 * h * c * vscale * 2
    assert g.kp.sp_idx.dtype == jnp.uint16 and g.kp.codes.dtype == jnp.uint8 and g.k.codes.shape[2] == 0
    assert kvjax.nbytes(g) == 2 * part + scales + 2 * h * el * d * 4 + h * (c + el) * 4 + h * 4


def _gear_numpy(x, bits, key, kcvt, k_each, tok_group=8, ch_group=8):
    """numpy GEAR without the low-rank part for one head's chunk ``x`` ``(L, D)``: the k_each largest / smallest
    entries kept (in fp16), the rest quantized (keys per channel over the chunk (KCVT) or ``tok_group`` tokens; values
    per token over the head (KCVT) or ``ch_group`` channels), fp16 scale/zero, codes against the rounded values."""
    el, d = x.shape
    flat = x.reshape(-1)
    order = np.argsort(flat, kind="stable")
    outl = np.zeros(flat.shape, bool)
    if k_each:
        outl[order[-k_each:]] = True
        outl[order[:k_each]] = True
    outl = outl.reshape(x.shape)
    qmax = 2 ** bits - 1
    out = np.empty_like(x)
    if key:
        g = el if kcvt else tok_group
        blocks = [(slice(i, i + g), slice(None)) for i in range(0, el, g)]
        axis = 0
    else:
        g = d if kcvt else ch_group
        blocks = [(slice(None), slice(j, j + g)) for j in range(0, d, g)]
        axis = 1
    for blk in blocks:
        xs, ms = x[blk], ~outl[blk]
        big = np.finfo(np.float32).max
        mn = np.where(ms, xs, big).min(axis=axis, keepdims=True)
        mx = np.where(ms, xs, -big).max(axis=axis, keepdims=True)
        mn = np.where(mn == big, 0, mn)
        mx = np.where(mx == -big, 0, mx)
        s = ((mx - mn) / qmax).astype(np.float16).astype(np.float32)
        z = mn.astype(np.float16).astype(np.float32)
        codes = np.clip(np.round((xs - z) / np.where(s > 0, s, 1)), 0, qmax)
        out[blk] = np.where(s > 0, codes, 0) * s + z
    return np.where(outl, x.astype(np.float16).astype(np.float32), out)  # outliers stored in fp16


@pytest.mark.parametrize("bits", [4, 2])
def test_gear_prompt_one_chunk_and_64_token_streaming_match_numpy_reference(prompt_state, bits):
    """The prompt's first n - n % gap tokens form ONE chunk per head (keys per channel over the whole chunk with
    KCVT at 4 bits, per 8 tokens with the 2-bit KIVI backbone) with the rank-4 error correction; decoded tokens are
    compressed every gap tokens as one chunk with rank 2. Without the low-rank part the reconstruction equals a
    numpy implementation entry for entry; with it, the error is close to numpy's best (SVD) rank-r correction."""
    layer = _with_outlier_channels(prompt_state.layers[1])
    n0, total, el, d = 45, 64, 8, 16
    short = layer.replace(fill=jnp.full_like(layer.fill, n0), pos=jnp.where(layer.pos < n0, layer.pos, -1))
    append = jax.jit(lambda c, kk, vv, pp: c.append(kk, vv, pp))
    k, v = np.asarray(layer.k, np.float32), np.asarray(layer.v, np.float32)
    for rank in (0, 1):
        m = get_method("gear", bits=bits, buffer=el, group=8, rank=2 * rank, prefill_rank=4 * rank)
        sp = m.spec(d, 64)
        cache, _, _ = _gear(short, sp=sp, room=total - n0)
        assert int(cache.fill[0, 0]) == 64 + n0 % el  # prompt chunk (allocated) + 5 buffered tokens
        for t in range(n0, total):  # the buffer flushes at 48 and 56
            cache = append(cache, layer.k[:, :, t:t + 1], layer.v[:, :, t:t + 1], jnp.full((1, 1), t, jnp.int32))
        kd, vd = (np.asarray(a) for a in jax.jit(lambda c: c.dense())(cache))
        pos = np.asarray(cache.pos)[0]
        # outliers: the ratio of the 40 tokens the prompt chunk really holds (not of its 64 static slots)
        chunks = [(0, 40, sp.outliers(40, d), 4)] + [(s, s + el, sp.k_each, 2) for s in (40, 48)]
        assert sp.outliers(40, d) < sp.prompt_k_each
        for hh in range(2):
            slot = {int(p): j for j, p in enumerate(pos[hh]) if p >= 0}
            assert sorted(slot) == list(range(total))
            for a, b_, k_each, r in chunks:
                for key, src, got in ((True, k, kd), (False, v, vd)):
                    x = src[0, hh, a:b_]
                    y = got[0, hh, [slot[p] for p in range(a, b_)]]
                    want = _gear_numpy(x, bits, key, bits == 4, k_each)
                    if rank == 0:
                        np.testing.assert_allclose(y, want, atol=2e-6, err_msg=f"{bits} {a} {key}")
                    else:  # low-rank correction of the quantization residual (outliers excluded)
                        res = x - want
                        sv = np.linalg.svd(res, compute_uv=False)
                        best = np.sqrt(np.sum(sv[r:] ** 2))
                        err = np.linalg.norm(x - y)
                        assert err < np.linalg.norm(res) and err <= 1.25 * best + 1e-3, (bits, a, key, err, best)
            np.testing.assert_array_equal(np.asarray(cache.k_res)[0, hh, :0], np.zeros((0, d)))
        assert cache.kp.lr_a.shape[-1] == 4 * rank and cache.k.lr_a.shape[-1] == 2 * rank


def test_hadamard_and_mikv_balancer_beat_plain_per_token_2bit_on_outlier_keys(prompt_state):
    layer = _with_outlier_channels(prompt_state.layers[0])
    plain = QuantSpec(bits=2, v_bits=2, k_group=0, v_group=0, k_axis="token", residual=0)
    p, _, _ = _quantize(layer, plain)
    rot = QuantSpec(bits=2, v_bits=2, k_group=0, v_group=0, k_axis="token", residual=0, k_rotate=True,
                    v_rotate=True)  # per-head Hadamard (RotateKV's own grouped pre-RoPE layer: test below)
    r, _, _ = _quantize(layer, rot)
    from kvjax.compress.mikv import channel_balancer

    window_q = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 8, 16))  # queries without outlier channels
    m, _, _ = _quantize(layer, plain, k_balance=channel_balancer(layer, window_q, 2))
    e_plain = _rel_err(p.dense()[0], layer.k, layer.pos)
    assert _rel_err(r.dense()[0], layer.k, layer.pos) < 0.7 * e_plain
    assert _rel_err(m.dense()[0], layer.k, layer.pos) < e_plain
    # rotations are orthogonal: queries rotated the same way give the same logits as unrotated keys
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 3, 16))
    qpos = jnp.full((1, 3), 100, jnp.int32)
    for cache in (r, m):
        want, _ = jax.jit(lambda c: reference_attention(q, *c.dense(), qpos, c.pos))(cache)
        got, _ = jax.jit(lambda c: c.attend(q, qpos))(cache)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


# ------------------------------------------------------------------------------------------------- KIVI attention


def _random_kivi(bits=2, b=2, h=2, c=48, d=16, group=8, residual=16, ragged=True):
    rng = np.random.default_rng(7)
    k = jnp.asarray(rng.normal(size=(b, h, c, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, h, c, d)), jnp.float32)
    fill = jnp.asarray([[c, c - 5], [c - 17, c - 9]][:b], jnp.int32)[:, :h] if ragged else jnp.full((b, h), c)
    pos = jnp.where(jnp.arange(c) < fill[..., None], jnp.arange(c), -1).astype(jnp.int32)
    spec = QuantSpec(bits=bits, v_bits=bits, k_group=group, v_group=group, residual=residual)
    cache, _, _ = _quantize(_dense(k, v, pos, fill), spec, room=20)
    return cache, k, v, pos


@pytest.mark.parametrize("bits", [2])
def test_kivi_attention_matches_dequantized_reference(bits):
    cache, k, v, pos = _random_kivi(bits)
    b, h = cache.fill.shape
    q = jax.random.normal(jax.random.PRNGKey(bits), (b, 2 * h, 1, 16))
    qpos = jnp.full((b, 1), 60, jnp.int32)
    got, obs = jax.jit(lambda c, q: c.attend(q, qpos, observe=Observe(window=1, colsum=True)))(cache, q)
    kd, vd = cache.dense()
    want, wobs = reference_attention(q, kd, vd, qpos, cache.pos, observe=Observe(window=1, colsum=True))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    np.testing.assert_allclose(np.asarray(obs["colsum"]), np.asarray(wobs["colsum"]), atol=1e-5)
    # and against the full-precision cache: the quantization error shrinks with the bit width
    full, _ = reference_attention(q, k, v, qpos, pos)
    err = float(jnp.max(jnp.abs(got - full)))
    assert err < {2: 0.6, 4: 0.12, 8: 0.01}[bits], err
    # the residual holds the last n % R tokens of every head in full precision
    r = np.asarray(cache.fill) % 16
    res_pos = np.asarray(cache.res_pos())
    for i in range(b):
        for j in range(h):
            n = int(cache.fill[i, j])
            np.testing.assert_array_equal(res_pos[i, j, :r[i, j]], np.arange(n - r[i, j], n))
            assert np.all(res_pos[i, j, r[i, j]:] == -1)


def test_kivi_pallas_kernel_matches_reference_path():
    pytest.importorskip("pallas_kernels")
    cache, _, _, _ = _random_kivi(2, b=1, h=2, c=32, group=8, residual=16, ragged=False)
    q = jax.random.normal(jax.random.PRNGKey(3), (1, 4, 1, 16))
    qpos = jnp.full((1, 1), 40, jnp.int32)
    ref, _ = cache.attend(q, qpos, impl="reference")
    ker, obs = cache.attend(q, qpos, impl="pallas")
    assert obs == {}
    np.testing.assert_allclose(np.asarray(ker), np.asarray(ref), atol=2e-4)


# ------------------------------------------------------------------------------------------------- streaming flushes


@pytest.mark.parametrize("k_axis,residual", [("channel", 16), ("token", 8)])  # residual 0: rotatekv in generate
def test_streaming_appends_under_jit_equal_one_shot_quantization(k_axis, residual):
    """Tokens appended in odd-sized chunks under jit (crossing several residual-group boundaries, ragged heads)
    give exactly the cache that quantizing all of them at once gives."""
    rng = np.random.default_rng(0)
    b, h, d, total = 2, 2, 16, 79
    k = jnp.asarray(rng.normal(size=(b, h, total, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, h, total, d)), jnp.float32)
    spec = QuantSpec(bits=4, v_bits=2, k_group=8 if k_axis == "channel" else 4, v_group=8, k_axis=k_axis,
                     residual=residual)
    # start from a ragged prefill: head (0, 1) saw 5 tokens fewer (as after eviction); it gets the same new tokens
    start = 11
    fill0 = jnp.asarray([[start, start - 5], [start, start]], jnp.int32)
    pos0 = jnp.where(jnp.arange(start) < fill0[..., None], jnp.arange(start), -1).astype(jnp.int32)
    cache, _, _ = _quantize(_dense(k[:, :, :start], v[:, :, :start], pos0, fill0), spec,
                                       room=total - start)
    append = jax.jit(lambda c, kk, vv, pp: c.append(kk, vv, pp))
    t = start
    for n in (1, 16, 1, 16, 1, 16, 1, 16):  # decode steps and long chunks; ragged heads cross groups mid-chunk
        cache = append(cache, k[:, :, t:t + n], v[:, :, t:t + n], jnp.broadcast_to(jnp.arange(t, t + n), (b, n)))
        t += n
    assert t == total
    # reference: every head's tokens in order (head (0, 1) lacks 6..10), quantized in one shot
    keep01 = np.setdiff1d(np.arange(total), np.arange(start - 5, start))
    idx = np.broadcast_to(np.arange(total), (b, h, total)).copy()
    idx[0, 1, :len(keep01)] = keep01
    fill = np.full((b, h), total)
    fill[0, 1] = len(keep01)
    pos = np.where(np.arange(total) < fill[..., None], idx, -1)
    ix = jnp.asarray(idx)[..., None]
    ref = _dense(jnp.take_along_axis(k, ix, 2), jnp.take_along_axis(v, ix, 2), jnp.asarray(pos, jnp.int32),
                 jnp.asarray(fill, jnp.int32))
    one, _, _ = _quantize(ref, spec=spec)
    assert jax.tree.structure(one) == jax.tree.structure(cache)
    for (path, a), b_ in zip(jax.tree_util.tree_leaves_with_path(cache), jax.tree.leaves(one)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b_), err_msg=jax.tree_util.keystr(path))
    q = jax.random.normal(jax.random.PRNGKey(0), (b, 2 * h, 1, d))
    qpos = jnp.full((b, 1), total, jnp.int32)
    att = jax.jit(lambda c: c.attend(q, qpos)[0])
    np.testing.assert_allclose(np.asarray(att(cache)), np.asarray(att(one)), atol=1e-6)


# ------------------------------------------------------------------------------------------------- bytes


def test_nbytes_counts_exactly_the_packed_arrays():
    b, h, d, cap, r, g = 2, 3, 16, 100, 32, 16
    for bits in (2, 4, 8):
        spec = QuantSpec(bits=bits, v_bits=bits, k_group=g, v_group=8, residual=r)
        cache = init_quantized_layer(b, h, cap, d, spec, jnp.bfloat16)
        cq = cache.q_capacity
        assert cq == 96 and cache.capacity >= cap
        codes = 2 * b * h * cq * d * bits // 8
        k_scales = 2 * b * h * (cq // g) * d * 2  # scale + zero, fp16
        v_scales = 2 * b * h * cq * (d // 8) * 2
        residual = 2 * b * h * r * d * 2  # bf16
        book = b * h * (cq + r) * 4 + b * h * 4  # pos, fill
        assert kvjax.nbytes(cache) == codes + k_scales + v_scales + residual + book
        assert kvjax.kv_nbytes(cache) == codes + k_scales + v_scales + residual
        assert cache.k_codes.dtype == jnp.uint8 and cache.k_codes.shape[-1] == d * bits // 8


# ------------------------------------------------------------------------------------------------- end to end


def test_methods_run_in_generate_and_track_full_precision(tiny):
    model, params, prompt = tiny
    full = generate(model, params, prompt, max_new_tokens=6)
    kivi8 = generate(model, params, prompt, max_new_tokens=6, method=get_method("kivi", bits=8, group=8,
                                                                               residual=16))
    np.testing.assert_allclose(np.asarray(kivi8.prefill_logits), np.asarray(full.prefill_logits), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(kivi8.tokens), np.asarray(full.tokens))
    assert all(isinstance(x, QuantizedKV) for x in kivi8.state.layers)
    layer = kivi8.state.layers[0]  # fresh prefill: quantized slots for prompt + decode room, whole residual groups
    assert layer.q_capacity == ((T + 6) // 16) * 16 and layer.capacity >= T + 6
    sizes = {}
    # (2-bit KIVI runs end to end in the chain test; int4/int8 share QuantizedKV's per-token path with these)
    for name, kw in [("mikv", dict(group=8)), ("rotatekv", {}), ("gear", dict(buffer=8, group=8))]:
        out = generate(model, params, prompt, max_new_tokens=6, method=get_method(name, **kw))
        assert out.tokens.shape == (2, 6) and np.all(np.asarray(out.lengths) == 6)
        for layer in out.state.layers:  # prompt + generated tokens all still in the cache, at their positions
            assert np.all(np.sort(np.asarray(layer.pos)[0, 0][np.asarray(layer.pos)[0, 0] >= 0])
                          == np.arange(T + 6))
        sizes[name] = kvjax.kv_nbytes(out.state)
    assert max(sizes.values()) < kvjax.kv_nbytes(full.state), sizes


def test_chain_snapkv_then_kivi_is_evicted_and_packed(tiny):
    model, params, prompt = tiny
    budget, new, r, g = 24, 8, 16, 8
    snap = get_method("snapkv", budget=budget, window=8)
    both = chain(snap, get_method("kivi", bits=2, group=g, residual=r))
    out = generate(model, params, prompt, max_new_tokens=new, method=both)
    evicted = generate(model, params, prompt, max_new_tokens=new, method=snap)
    cfg = model.cfg
    b, h, d = 2, cfg.num_kv_heads, cfg.head_dim
    cq = ((budget + new) // r) * r  # the evicted layer (budget + decode room) re-packed in whole residual groups
    per_layer = (2 * b * h * cq * d * 2 // 8  # 2-bit codes
                 + 2 * b * h * (cq // g) * d * 2 + 2 * b * h * cq * (d // g) * 2  # fp16 scales + zeros
                 + 2 * b * h * r * d * 4  # f32 residual
                 + b * h * (cq + r) * 4 + b * h * 4)  # pos, fill
    assert kvjax.nbytes(out.state) == cfg.num_layers * per_layer + 2 * b * 4
    assert kvjax.nbytes(out.state) < kvjax.nbytes(evicted.state)
    for layer in out.state.layers:
        assert isinstance(layer, QuantizedKV)
        held = np.sum(np.asarray(layer.pos) >= 0, axis=-1)
        assert np.all(held == budget + new)  # every sampled token is fed back (the loop writes it)


def test_chain_wrong_order_raises():
    with pytest.raises(ValueError, match="snapkv needs a dense"):
        chain(get_method("kivi", group=8, residual=16), get_method("snapkv", budget=64))
    with pytest.raises(ValueError, match="needs a dense"):
        chain(get_method("gear"), get_method("mikv"))


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_hyper_parameters_give_clear_errors(tiny):
    model, params, prompt = tiny
    for name in ("kivi", "gear", "rotatekv"):
        with pytest.raises(ValueError, match="bits must be one of"):
            get_method(name, bits=3)
    with pytest.raises(ValueError, match="lo_bits must be one of"):
        get_method("mikv", lo_bits=1)
    with pytest.raises(ValueError, match="residual must be an integer >= 0"):
        get_method("kivi", residual=-1)
    with pytest.raises(ValueError, match="residual must be an integer >= 0"):
        get_method("int8", residual=-4)
    with pytest.raises(ValueError, match="positive multiple of the group"):
        get_method("kivi", group=32, residual=48)
    with pytest.raises(ValueError, match="does not divide head_dim 16"):  # head_dim of the tiny model is 16
        generate(model, params, prompt, max_new_tokens=2, method=get_method("kivi", group=12, residual=24))
    with pytest.raises(ValueError, match="does not divide head_dim 16"):
        generate(model, params, prompt, max_new_tokens=2, method=get_method("int4", group=6))
    with pytest.raises(ValueError, match="does not divide head_dim"):
        QuantSpec(k_axis="token", k_group=5, v_group=8).resolve(16, 16)
    with pytest.raises(ValueError, match="axis"):
        QuantSpec(k_axis="head").resolve(16, 16)
    with pytest.raises(ValueError, match="ring-buffer"):
        quantize_dense_layer(init_dense_layer(1, 1, 8, 16, ring_start=0), QuantSpec(k_group=8, v_group=8,
                                                                                   residual=8))
    with pytest.raises(ValueError, match="unknown attention impl"):
        _random_kivi()[0].attend(jnp.zeros((2, 4, 1, 16)), jnp.zeros((2, 1), jnp.int32), impl="cuda")


def test_evicted_layer_keeps_its_capacity(tiny):
    """A fresh prefill gets the decode room (checked in the generate test); a layer that is not the prompt's fresh
    cache (an evictor's output) is taken to hold its decode room already: its capacity is kept, not grown."""
    model, _, _ = tiny
    kivi = get_method("kivi", group=8, residual=16)
    ctx = Context(cfg=model.cfg, decode_room=10, prompt_len=T)
    out = jax.jit(lambda st: kivi.prefill(st, None, ctx)[0])(model.init_state(2, 33))
    assert out.layers[0].capacity >= 33 and out.layers[0].q_capacity == math.floor(33 / 16) * 16


# ------------------------------------------------------------------------------------------------- KIVI sliding values


def test_kivi_values_keep_exactly_the_last_R_in_full_precision_after_every_step():
    """KIVI's reference keeps exactly the last R values in full precision (prefill: all but the last R quantized;
    decode: slide by one). After the prefill and after every decode step (crossing key-group flushes, ragged heads)
    the dequantized values equal the original ones for exactly the last min(R, n) tokens of every head; the Pallas
    kernel (interpret mode) reads the same cache as the reference path."""
    rng = np.random.default_rng(11)
    b, h, d, rr, start, total = 2, 2, 16, 16, 21, 58
    k = jnp.asarray(rng.normal(size=(b, h, total, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, h, total, d)), jnp.float32)
    spec = get_method("kivi", group=8, residual=rr).spec()
    assert spec.v_slide
    fill0 = jnp.asarray([[start, start - 9], [start - 13, start]], jnp.int32)  # 21, 12 (< R), 8, 21 prompt tokens
    pos0 = jnp.where(jnp.arange(start) < fill0[..., None], jnp.arange(start), -1).astype(jnp.int32)
    cache, _, _ = _quantize(_dense(k[:, :, :start], v[:, :, :start], pos0, fill0), spec, room=total - start)
    append = jax.jit(lambda c, kk, vv, pp: c.append(kk, vv, pp))
    values = jax.jit(lambda c: c.dense()[1])
    kernel_checked = 0
    for t in range(start, total + 1):
        vd = np.asarray(values(cache))
        pos = np.asarray(cache.pos)
        for i in range(b):
            for j in range(h):
                n = int(cache.fill[i, j])
                slots = np.nonzero(pos[i, j] >= 0)[0]
                assert len(slots) == n
                # the token at original position p has value v[..., p] only if it was not evicted; heads with a
                # shorter prompt lack positions [fill0, start)
                p = pos[i, j, slots]
                exact = np.all(vd[i, j, slots] == np.asarray(v[i, j, p]), axis=-1)
                recent = np.argsort(p)[::-1][:min(rr, n)]
                assert exact.sum() == min(rr, n), (t, i, j, exact.sum())
                assert exact[recent].all(), (t, i, j)
        if t == start + 27:  # after key-group flushes: the last group's values are partly full precision
            q = jax.random.normal(jax.random.PRNGKey(t), (b, 2 * h, 1, d))
            qpos = jnp.full((b, 1), t, jnp.int32)
            ref = jax.jit(lambda c: c.attend(q, qpos, impl="reference")[0])(cache)
            ker = jax.jit(lambda c: c.attend(q, qpos, impl="pallas")[0])(cache)
            np.testing.assert_allclose(np.asarray(ker), np.asarray(ref), atol=2e-4)
            kernel_checked += 1
        if t < total:
            cache = append(cache, k[:, :, t:t + 1], v[:, :, t:t + 1], jnp.full((b, 1), t, jnp.int32))
    assert kernel_checked == 1


# ------------------------------------------------------------------------------------------------- MiKV re-scoring


def _h2o_reference(score0, pos0, n_hi, n_rec, step_cols, next_pos0):
    """numpy H2O over one head: the high-precision set after prefill and after every decode step (new token enters;
    every hi token gains that step's attention; the lowest-scoring token outside the last ``n_rec`` is demoted)."""
    order = sorted(range(len(pos0)), key=lambda i: (-(1e9 if pos0[i] >= next_pos0 - n_rec else score0[i]), i))
    hi = {int(pos0[i]): float(score0[i]) for i in order[:n_hi]}
    sets = [set(hi)]
    for t, col in enumerate(step_cols):
        newest = next_pos0 + t
        hi[newest] = 0.0
        for p in hi:
            hi[p] += col[p]
        cand = [p for p in hi if p <= newest - n_rec]
        if len(hi) > n_hi:
            victim = min(cand, key=lambda p: (hi[p], p))
            del hi[victim]
        sets.append(set(hi))
    return sets


def test_mikv_rescored_token_moves_between_precisions_like_h2o():
    """MiKV follows H2O every step: generated tokens enter high precision (recent window), the hi set after every
    step equals a numpy H2O simulation of the same scores, a token whose accumulated attention is raised above the
    weakest heavy hitter's during decoding is kept in (moves into) the heavy, high-precision set when it leaves the
    recent window, demoted tokens land in the 2-bit stream at their positions, and hi tokens are exact."""
    from kvjax.compress.mikv import MixedPrecisionKV
    from kvjax.config import ModelConfig
    from kvjax.state import KVState

    b, hq, h, d, t, steps, n_hi, n_rec = 1, 2, 1, 8, 10, 6, 4, 2
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=16, hidden_size=16, intermediate_size=16,
                      num_layers=1, num_heads=hq, num_kv_heads=h, head_dim=d, max_position_embeddings=64)
    rng = np.random.default_rng(3)
    kk = jnp.asarray(rng.normal(size=(b, h, t + steps, d)), jnp.float32)
    vv = jnp.asarray(rng.normal(size=(b, h, t + steps, d)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t + steps, dtype=jnp.int32), (b, h, t + steps))
    dense = DenseKV(k=kk, v=vv, pos=jnp.where(pos < t, pos, -1), fill=jnp.full((b, h), t, jnp.int32))
    colsum = np.zeros((b, hq, t + steps), np.float32)
    colsum[0, 0, :t] = [5, 1, 4, 2, 3, 0.5, 0.2, 0.1, 0.3, 0.4]  # heavy hitters 0 and 2; 8, 9 recent
    m = get_method("mikv", hi_budget=n_hi, recent_ratio=n_rec / n_hi, group=8, balance=False)
    ctx = Context(cfg=cfg, decode_room=steps + 7, prompt_len=t)  # room for the decode steps and the final chunk
    state = KVState(layers=(DenseKV(k=kk[:, :, :t], v=vv[:, :, :t], pos=dense.pos[:, :, :t], fill=dense.fill),),
                    next_pos=jnp.full((b,), t, jnp.int32), rope_shift=jnp.zeros((b,), jnp.int32))
    state, _ = m.prefill(state, ({"colsum": jnp.asarray(colsum[..., :t])},), ctx)
    layer = state.layers[0]
    assert isinstance(layer, MixedPrecisionKV) and layer.n_keep == n_hi + 1
    # decode attention: token 8 (recent at prefill end) gets a lot of attention, so it beats heavy hitter 2 (score 4)
    cols = [np.zeros(t + steps, np.float32) for _ in range(steps)]
    cols[0][8], cols[1][8] = 5.0, 2.0
    for i in range(steps):
        cols[i][t + i] = 0.25 * i  # the new tokens get something too
    want = _h2o_reference(colsum[0, 0, :t], np.arange(t), n_hi, n_rec, cols, t)
    step = jax.jit(lambda st, kn, vn, p, c: m.decode(st.replace(layers=(st.layers[0].append(kn, vn, p),),
                                                                next_pos=st.next_pos + 1), c, ctx))

    def hi_set(layer):
        p = np.asarray(layer.hi_pos())[0, 0]
        return set(p[p >= 0].tolist())

    def check(layer, i):
        assert hi_set(layer) == want[i], (i, hi_set(layer), want[i])
        kd, vd = layer.dense()
        p = np.asarray(layer.pos)[0, 0]
        ok = p >= 0
        assert sorted(p[ok].tolist()) == list(range(t + i))  # no token left behind
        for s in np.nonzero(ok)[0]:
            exact = np.allclose(np.asarray(vd[0, 0, s]), np.asarray(vv[0, 0, p[s]]), atol=1e-6)
            assert exact == (p[s] in want[i]), (i, p[s])  # hi tokens exact, demoted ones 2-bit

    check(layer, 0)
    assert 8 in want[0] and 2 in want[0]
    for i in range(steps):
        sp = layer.pos.shape[-1]
        o = jnp.zeros((b, hq, sp), jnp.float32).at[0, 0].set(jnp.asarray(cols[i])[jnp.maximum(layer.pos[0, 0], 0)]
                                                              * (layer.pos[0, 0] >= 0))
        state = step(state, kk[:, :, t + i:t + i + 1], vv[:, :, t + i:t + i + 1], jnp.full((b, 1), t + i), (
            {"colsum": o},))
        layer = state.layers[0]
        check(layer, i + 1)
    # a chunk longer than the high-precision set ("compress once, then grow"): its newest n_hi + 1 tokens are high
    # precision, its oldest and all earlier hi tokens go to 2 bits, no token is lost
    more = 7
    kx = jnp.asarray(rng.normal(size=(b, h, more, d)), jnp.float32)
    grown = jax.jit(lambda c: c.append(kx, kx, jnp.arange(t + steps, t + steps + more)[None]))(layer)
    p = np.asarray(grown.pos)[0, 0]
    assert sorted(p[p >= 0].tolist()) == list(range(t + steps + more))
    assert hi_set(grown) == set(range(t + steps + more - n_hi - 1, t + steps + more))
    # token 8 left the recent window at step 2 and stayed high precision as a heavy hitter; token 2 was demoted
    assert 8 in want[steps] and 2 not in want[steps] and 8 not in range(t + steps - n_rec, t + steps)
    # without the extra attention token 8 would have been demoted instead
    cols2 = [c.copy() for c in cols]
    cols2[0][8] = cols2[1][8] = 0.0
    assert 8 not in _h2o_reference(colsum[0, 0, :t], np.arange(t), n_hi, n_rec, cols2, t)[steps]


# ------------------------------------------------------------------------------------------------- RotateKV pre-RoPE


def test_rotatekv_pre_rope_grouped_attention_within_computed_2bit_bound(tmp_path):
    """RotateKV stores quantized, grouped-head-rotated, channel-permuted *pre-RoPE* keys and applies RoPE after
    dequantization: (a) equal pre-RoPE keys at different positions get identical codes (storage is pre-RoPE); (b) the
    massive-activation tokens are exact; (c) every dequantized key/value is within the 2-bit rounding bound computed
    here from the stored-space groups (rotation, permutation and RoPE are orthogonal, so they carry the error norm
    over unchanged); (d) attention equals the float reference within the bound that this key/value error implies
    (logit error eps = scale * |q| * |dk|: softmax moves by at most e^(2 eps) - 1 in L1); for prefill and a decoded
    token."""
    from kvjax.compress.rotatekv import PreRopeQuantKV, grouped_forward, rotation_matrix_for, save_calibration
    from kvjax.config import ModelConfig
    from kvjax.rope import apply_rope, inv_frequencies
    from kvjax.state import KVState

    b, hq, h, d, t = 1, 4, 2, 16, 24
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=16, hidden_size=32, intermediate_size=16,
                      num_layers=1, num_heads=hq, num_kv_heads=h, head_dim=d, max_position_embeddings=64)
    rng = np.random.default_rng(5)
    pre = rng.normal(size=(b, h, t + 1, d)).astype(np.float32)
    pre[..., 3] *= 12.0  # an outlier channel
    pre[:, :, 17] = pre[:, :, 9]  # same pre-RoPE key at positions 9 and 17
    pre[:, :, t] = pre[:, :, 9]  # ... and the decoded token
    inv = jnp.asarray(inv_frequencies(d, cfg.rope_theta))
    pos = jnp.arange(t + 1, dtype=jnp.int32)[None]
    post = apply_rope(jnp.asarray(pre).transpose(0, 2, 1, 3), pos, inv).transpose(0, 2, 1, 3)
    v = jnp.asarray(rng.normal(size=(b, h, t + 1, d)), jnp.float32)
    perm = rng.permutation(h * d)
    path = tmp_path / "calib.npz"
    save_calibration(path, perm[None], head_group=4, model="synthetic")
    m = get_method("rotatekv", calibration=str(path), n_pivot=3)
    ctx = Context(cfg=cfg, decode_room=2, prompt_len=t)
    m.validate(ctx)
    layer0 = DenseKV(k=post[:, :, :t], v=v[:, :, :t], pos=jnp.broadcast_to(pos[:, None, :t], (b, h, t)),
                     fill=jnp.full((b, h), t, jnp.int32))
    state = KVState(layers=(layer0,), next_pos=jnp.full((b,), t, jnp.int32), rope_shift=jnp.zeros((b,), jnp.int32))
    massive = jnp.asarray([[5, 0, 5]], jnp.int32)  # repeats: 2 distinct sink tokens
    state, _ = m.prefill(state, ({"massive_pos": massive},), ctx)
    cache = state.layers[0]
    assert isinstance(cache, PreRopeQuantKV) and cache.group == h and cache.n_keep == 3
    rot = jnp.asarray(rotation_matrix_for(h, d))
    stored = np.asarray(grouped_forward(jnp.asarray(pre), rot, jnp.asarray(perm), h))  # (B, H, T+1, D)

    def bounds(x):  # per token and head: |error| norm bound of per-token 2-bit groups of D channels (+ fp16 slack)
        mn, mx = x.min(-1), x.max(-1)
        e = (mx - mn) / 3 / 2 + 4e-3 * np.maximum(np.abs(mn), np.abs(mx))
        return np.sqrt(d) * e

    def check(cache, n):
        kd, vd = (np.asarray(a) for a in jax.jit(lambda c: c.dense())(cache))
        p = np.asarray(cache.pos)[0, 0]
        slots = np.nonzero(p >= 0)[0]
        assert sorted(p[slots].tolist()) == list(range(n))
        kb = np.sqrt((bounds(stored) ** 2).sum(1))  # whole rotation group's error norm (B, T+1)
        vrot = np.asarray(v) @ np.asarray(qz.hadamard_matrix(d))
        vb = bounds(vrot)
        dk = np.zeros(n)
        for s in slots:
            pp = p[s]
            ek = np.sqrt(((kd[0, :, s] - np.asarray(post)[0, :, pp]) ** 2).sum())
            ev = np.sqrt(((vd[0, :, s] - np.asarray(v)[0, :, pp]) ** 2).sum(-1))
            if pp in (0, 5):
                assert ek < 1e-4 and ev.max() < 1e-5, (pp, ek)
            else:
                assert 1e-3 < ek <= kb[0, pp], (pp, ek, kb[0, pp])
                assert np.all(ev <= vb[0, :, pp] + 1e-6), (pp, ev)
            dk[pp] = ek
        # attention vs the float reference
        q = jax.random.normal(jax.random.PRNGKey(n), (b, hq, 1, d))
        qpos = jnp.full((b, 1), n - 1, jnp.int32)
        got = np.asarray(jax.jit(lambda c: c.attend(q, qpos)[0])(cache))
        want, _ = reference_attention(q, post[:, :, :n], v[:, :, :n], qpos,
                                      jnp.broadcast_to(pos[:, None, :n], (b, h, n)))
        want = np.asarray(want)
        for i in range(hq):
            eps = d ** -0.5 * float(np.linalg.norm(np.asarray(q)[0, i, 0])) * dk.max()
            vmax = np.linalg.norm(np.asarray(v)[0, i // (hq // h), :n], axis=-1).max() + vb.max()
            bound = (math.exp(2 * eps) - 1) * vmax + vb.max()
            err = np.linalg.norm(got[0, i, 0] - want[0, i, 0])
            assert 0 < err <= bound, (i, err, bound)
        return cache

    cache = check(cache, t)
    slot = {int(x): j for j, x in enumerate(np.asarray(cache.pos)[0, 0]) if x >= 0}
    codes = np.asarray(cache.k_codes)[0, :, :]
    off = cache.n_keep
    np.testing.assert_array_equal(codes[:, slot[9] - off], codes[:, slot[17] - off])  # pre-RoPE storage
    cache = jax.jit(lambda c: c.append(post[:, :, t:t + 1], v[:, :, t:t + 1], pos[:, t:t + 1]))(cache)
    cache = check(cache, t + 1)
    slot = {int(x): j for j, x in enumerate(np.asarray(cache.pos)[0, 0]) if x >= 0}
    np.testing.assert_array_equal(np.asarray(cache.k_codes)[0, :, slot[t] - off], codes[:, slot[9] - off])

"""kvjax.quant.packing and pallas_kernels.quantized_decode_attention (interpret mode) against the references."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.quant import packing
from pallas_kernels import attention_impl, quantized_decode_attention
from pallas_kernels.reference import (attention_reference, dequantize_cache,
                                      quantized_decode_attention_reference)
_qchan = jax.jit(packing.quantize_per_channel, static_argnums=(1, 2), static_argnames=("scale_dtype",))
_qtok = jax.jit(packing.quantize_per_token, static_argnums=(1, 2), static_argnames=("scale_dtype",))

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# jitted once per shape: eager reference ops would each compile separately (slow on 2 cores)
qref = functools.partial(jax.jit, static_argnames=("bits", "v_bits", "window", "logit_softcap"))(
    quantized_decode_attention_reference)


# ------------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_roundtrip_and_bit_layout(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2 ** bits, size=(3, 5, 32)).astype(np.uint8)
    packed = packing.pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, 32 * bits // 8)
    np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits, 32)), codes)
    ppb = 8 // bits  # little-endian: code j of a byte at bit offset (j % ppb) * bits
    want = sum(codes[..., j::ppb].astype(np.int64) << (j * bits) for j in range(ppb))
    np.testing.assert_array_equal(np.asarray(packed), want.astype(np.uint8))


def test_pack_known_byte():
    assert int(packing.pack(jnp.array([3, 2, 2, 1], jnp.uint8), 2)[0]) == 0b01_10_10_11
    assert int(packing.pack(jnp.array([0xA, 0x5], jnp.uint8), 4)[0]) == 0x5A


@pytest.mark.parametrize("bits,scale_dtype", [(2, jnp.float32), (4, jnp.bfloat16), (8, jnp.float32)])
def test_quantize_dequantize_error_bound(bits, scale_dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 64, 32)) * 3, jnp.float32)
    x = x.at[0, 0, :16, :].set(1.25)  # constant token group / channel group: scale 0, exact
    for quant, dequant, sshape in ((_qtok, packing.dequantize_per_token, (2, 3, 64, 2)),
                                   (_qchan, packing.dequantize_per_channel, (2, 3, 4, 32))):
        packed, scale, zero = quant(x, bits, 16, scale_dtype=scale_dtype)
        assert packed.shape == (2, 3, 64, 32 * bits // 8) and scale.shape == zero.shape == sshape
        assert scale.dtype == scale_dtype
        y = np.asarray(jax.jit(dequant, static_argnums=3)(packed, scale, zero, bits))
        err = np.abs(y - np.asarray(x))
        # half a quantization step (+ rounding of the stored scale/zero)
        step = np.asarray(scale, np.float32).max()
        assert err.max() <= step / 2 + 1e-5 + (step * 2 ** bits * 4e-3 if scale_dtype == jnp.bfloat16 else 0)
    packed, scale, zero = _qchan(x, bits, 16)
    assert float(scale[0, 0, 0, 0]) == 0.0
    np.testing.assert_array_equal(np.asarray(packing.dequantize_per_channel(packed, scale, zero, bits))[0, 0, :16],
                                  1.25)


def test_packing_validation():
    x = jnp.zeros((4, 32), jnp.float32)
    with pytest.raises(ValueError, match="bits"):
        packing.quantize_per_token(x, 3, 16)
    with pytest.raises(ValueError, match="divisible"):
        packing.quantize_per_token(x, 4, 12)
    with pytest.raises(ValueError, match="divisible"):
        packing.quantize_per_channel(x, 4, 3)
    with pytest.raises(ValueError, match="multiple"):
        packing.pack(jnp.zeros((3,), jnp.uint8), 2)
    with pytest.raises(ValueError, match="expected"):
        packing.unpack(jnp.zeros((3,), jnp.uint8), 2, 16)


# ------------------------------------------------------------------------------------------------- kernel


def make_qcase(seed, *, b=2, hkv=2, g=4, tq=1, c=256, d=64, dv=None, bits=4, v_bits=None, gk=32, gv=32, r=16,
               dtype=jnp.float32, lengths=None, scale_dtype=jnp.float32):
    """A quantized cache (+ residual) whose data past ``lengths`` / at pos = -1 is garbage (NaN scales ...)."""
    rng = np.random.default_rng(seed)
    dv = d if dv is None else dv
    v_bits = bits if v_bits is None else v_bits
    k = jnp.asarray(rng.normal(size=(b, hkv, c, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, hkv, c, dv)), jnp.float32)
    kc, ks, kz = _qchan(k, bits, gk, scale_dtype=scale_dtype)
    vc, vs, vz = _qtok(v, v_bits, gv, scale_dtype=scale_dtype)
    pos = np.stack([np.stack([rng.permutation(c) for _ in range(hkv)]) for _ in range(b)]).astype(np.int32)
    pos[rng.random(pos.shape) < 0.1] = -1
    vs, vz = np.array(vs), np.array(vz)
    vs[pos < 0] = np.nan  # per-token value scales of empty slots: garbage
    if lengths is not None:
        lengths = np.asarray(lengths, np.int32)
        past = np.arange(c)[None, None, :] >= lengths[:, :, None]
        pos[past] = 0  # valid-looking, must still be ignored
        vs[past], vz[past] = np.nan, np.inf
        ks, kz = np.array(ks), np.array(kz)
        gpast = np.arange(c // gk)[None, None, :] >= -(-lengths[:, :, None] // gk)  # key groups fully past
        ks[gpast], kz[gpast] = np.nan, 1e30
        kc = jnp.asarray(np.where(past[..., None], 255, np.asarray(kc)), jnp.uint8)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    out = dict(q=cast(rng.normal(size=(b, hkv * g, tq, d))), k_codes=kc, k_scale=jnp.asarray(ks, scale_dtype),
               k_zero=jnp.asarray(kz, scale_dtype), v_codes=vc, v_scale=jnp.asarray(vs, scale_dtype),
               v_zero=jnp.asarray(vz, scale_dtype), pos=jnp.asarray(pos),
               q_pos=jnp.asarray(np.stack([c + r - tq + np.arange(tq)] * b), jnp.int32),
               lengths=None if lengths is None else jnp.asarray(lengths))
    if r:
        rp = np.broadcast_to(c + np.arange(r), (b, hkv, r)).astype(np.int32).copy()
        rp[0, 0, -3:] = -1
        kr = rng.normal(size=(b, hkv, r, d)).astype(np.float32)
        kr[0, 0, -3:] = np.nan
        out.update(k_res=cast(kr), v_res=cast(rng.normal(size=(b, hkv, r, dv))), res_pos=jnp.asarray(rp))
    return out, dict(bits=bits, v_bits=v_bits)


def _call(fn, case, static, **kw):
    args = [case[n] for n in ("q", "k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "pos", "q_pos")]
    extra = {n: case[n] for n in ("k_res", "v_res", "res_pos", "lengths") if case.get(n) is not None}
    return fn(*args, **static, **extra, **kw)


def test_quantized_reference_is_dequantize_then_attend():
    case, static = make_qcase(0, bits=2, c=64, d=16, gk=16, gv=8, r=8, lengths=[[64, 20], [7, 0]])
    out = _call(qref, case, static)

    @jax.jit
    def want_fn(case):
        k, v = dequantize_cache(case["k_codes"], case["k_scale"], case["k_zero"], case["v_codes"], case["v_scale"],
                                case["v_zero"], bits=2)
        kk = jnp.concatenate([k, case["k_res"]], axis=2)
        vv = jnp.concatenate([v, case["v_res"]], axis=2)
        pp = jnp.concatenate([case["pos"], case["res_pos"]], axis=2)
        ok = jnp.concatenate([jnp.arange(64)[None, None] < case["lengths"][..., None], jnp.ones((2, 2, 8), bool)],
                             axis=2)
        pp = jnp.where(ok, pp, -1)
        kk = jnp.where((pp >= 0)[..., None], kk, 0.0)
        vv = jnp.where((pp >= 0)[..., None], vv, 0.0)
        return attention_reference(case["q"], kk, vv, pp, case["q_pos"])

    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_fn(case)), atol=1e-6)


# (bits, v_bits, g, d, dtype, residual, lengths, strategy, unpack layout, window, softcap, scale dtype): bits 2/4/8,
# GQA 1/4/8, head_dim 64/128, f32/bf16 (queries and scales), ragged lengths not multiple of block_k=64, both
# strategies, both unpack layouts ("natural" is the GPU one), with and without residual.
QCASES = [
    (2, None, 4, 64, jnp.float32, 16, [[256, 37], [100, 161]], "pipeline", "plane_major", 0, 0.0, jnp.float32),
    (4, None, 1, 128, jnp.bfloat16, 16, None, "loop", "natural", 0, 0.0, jnp.bfloat16),
    (8, None, 8, 64, jnp.bfloat16, 0, [[5, 256], [64, 0]], "pipeline", "plane_major", 0, 0.0, jnp.float32),
    (4, 2, 4, 128, jnp.float32, 8, [[200, 31], [256, 129]], "loop", "natural", 100, 15.0, jnp.float32),
    (2, 8, 8, 128, jnp.float32, 0, None, "pipeline", "plane_major", 0, 0.0, jnp.float32),
    (4, None, 4, 64, jnp.bfloat16, 16, [[250, 1], [33, 256]], "pipeline", "plane_major", 64, 0.0, jnp.float32),
]


@pytest.mark.parametrize("bits,v_bits,g,d,dtype,r,lengths,strategy,layout,window,softcap,sdt", QCASES)
def test_quantized_decode_matches_reference(bits, v_bits, g, d, dtype, r, lengths, strategy, layout, window, softcap,
                                            sdt):
    case, static = make_qcase(bits * 10 + g, g=g, d=d, bits=bits, v_bits=v_bits, dtype=dtype, r=r, lengths=lengths,
                              scale_dtype=sdt)
    kw = dict(window=window, logit_softcap=softcap)
    out = _call(quantized_decode_attention, case, static, block_k=64, num_splits=2, strategy=strategy,
                unpack_layout=layout, interpret=True, **kw)
    ref = _call(qref, case, static, **kw)
    assert out.shape == ref.shape == (2, 2 * g, 1, d) and out.dtype == dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "garbage past the length / in empty slots leaked"
    np.testing.assert_allclose(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("strategy", ["pipeline", "loop"])
def test_quantized_ragged_3_vs_500(strategy):
    case, static = make_qcase(5, c=512, d=64, bits=4, gk=32, r=8, lengths=[[3, 500], [500, 0]])
    out = _call(quantized_decode_attention, case, static, block_k=128, strategy=strategy, interpret=True)
    ref = _call(qref, case, static)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_quantized_validation_errors():
    case, static = make_qcase(1, c=64, d=64, bits=4, gk=32, r=0)
    with pytest.raises(ValueError, match="bits"):
        _call(quantized_decode_attention, case, dict(bits=3), interpret=True)
    with pytest.raises(ValueError, match="multiple of 32"):
        _call(quantized_decode_attention, case, static, block_k=16, interpret=True)
    with pytest.raises(ValueError, match="k_codes last axis"):
        _call(quantized_decode_attention, case, dict(bits=2, v_bits=4), interpret=True)
    bad = dict(case, k_codes=case["k_codes"].astype(jnp.int32))
    with pytest.raises(TypeError, match="uint8"):
        _call(quantized_decode_attention, bad, static, interpret=True)
    bad = dict(case, v_scale=case["v_scale"][..., :1].repeat(3, axis=-1))
    with pytest.raises(ValueError, match="value group"):
        _call(quantized_decode_attention, bad, static, interpret=True)
    bad = dict(case, q=case["q"][:, :3])
    with pytest.raises(ValueError, match="multiple of the number of KV heads"):
        _call(quantized_decode_attention, bad, static, interpret=True)
    with pytest.raises(ValueError, match="together"):
        _call(quantized_decode_attention, case, static, k_res=case["q"], interpret=True)
    assert attention_impl("quantized_decode", "reference") is quantized_decode_attention_reference


@pytest.mark.parametrize("platform,strategy", [("tpu", "pipeline"), ("cuda", "loop")])
def test_lowers_for_tpu_and_gpu(platform, strategy):
    """The kernel lowers through Mosaic TPU / Triton (jax.export on the CPU; no device compile)."""
    from jax import export

    sd = jax.ShapeDtypeStruct
    b, hkv, g, c, d, r = 1, 2, 3, 1024, 128, 24
    for bits in ((2,) if platform == "tpu" else (4,)):
        args = (sd((b, hkv * g, 1, d), jnp.bfloat16), sd((b, hkv, c, d * bits // 8), jnp.uint8),
                sd((b, hkv, c // 32, d), jnp.bfloat16), sd((b, hkv, c // 32, d), jnp.bfloat16),
                sd((b, hkv, c, d * bits // 8), jnp.uint8), sd((b, hkv, c, d // 32), jnp.bfloat16),
                sd((b, hkv, c, d // 32), jnp.bfloat16), sd((b, hkv, c), jnp.int32), sd((b, 1), jnp.int32),
                sd((b, hkv, r, d), jnp.bfloat16), sd((b, hkv, r, d), jnp.bfloat16), sd((b, hkv, r), jnp.int32),
                sd((b, hkv), jnp.int32))

        def f(*a):
            return quantized_decode_attention(*a[:9], bits=bits, k_res=a[9], v_res=a[10], res_pos=a[11],
                                              lengths=a[12], interpret=False, backend=platform, strategy=strategy)

        exp = export.export(jax.jit(f), platforms=[platform], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
        assert exp.out_avals[0].shape == (b, hkv * g, 1, d)

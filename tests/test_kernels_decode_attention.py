"""pallas_kernels.decode_attention (interpret mode) against the jnp reference, and the reference against numpy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention_impl, decode_attention
from pallas_kernels import _common as cm
from pallas_kernels.reference import attention_reference, decode_attention_reference

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# jitted once per shape: eager reference ops would each compile separately (slow on 2 cores)
ref_jit = jax.jit(decode_attention_reference, static_argnames=("window", "logit_softcap", "sm_scale"))


def naive_attention(q, k, v, pos, q_pos, lengths=None, sm_scale=None, window=0, softcap=0.0):
    """softmax(QK^T)V with the masking contract, one (b, query head, t) at a time, in float64 numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    pos, q_pos = np.asarray(pos), np.asarray(q_pos)
    b_, hq, tq, d = q.shape
    hkv, c = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if sm_scale is None else sm_scale
    out = np.zeros((b_, hq, tq, v.shape[3]))
    for b in range(b_):
        for h in range(hq):
            kv = h // g
            n = c if lengths is None else int(lengths[b, kv])
            for t in range(tq):
                qp = q_pos[b, t]
                vis = [ci for ci in range(min(n, c)) if pos[b, kv, ci] >= 0 and qp >= 0 and pos[b, kv, ci] <= qp
                       and (window == 0 or qp - pos[b, kv, ci] < window)]
                if not vis:
                    continue
                s = np.array([q[b, h, t] @ k[b, kv, ci] for ci in vis]) * scale
                if softcap:
                    s = softcap * np.tanh(s / softcap)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, h, t] = sum(pi * v[b, kv, ci] for pi, ci in zip(p, vis))
    return out


def make_case(seed, *, b=2, hkv=2, g=4, tq=1, c=200, d=64, dv=None, dtype=jnp.float32, lengths=None,
              holes=0.15, shuffle=True, pad_query=False):
    """Random dense cache whose invalid slots (pos = -1, or past ``lengths``) hold NaN / inf / huge garbage."""
    rng = np.random.default_rng(seed)
    dv = d if dv is None else dv
    k = rng.normal(size=(b, hkv, c, d)).astype(np.float32)
    v = rng.normal(size=(b, hkv, c, dv)).astype(np.float32)
    pos = np.empty((b, hkv, c), np.int32)
    for bi in range(b):
        for h in range(hkv):
            pos[bi, h] = rng.permutation(c) if shuffle else np.arange(c)
    pos[rng.random(pos.shape) < holes] = -1
    garbage = np.array([np.nan, np.inf, -np.inf, 1e30, -3e38], np.float32)
    bad = pos < 0
    if lengths is not None:
        lengths = np.asarray(lengths, np.int32)
        past = np.arange(c)[None, None, :] >= lengths[:, :, None]
        bad |= past
        pos[past] = rng.integers(0, 5, size=int(past.sum()))  # valid-looking positions must still be ignored
    k[bad] = garbage[rng.integers(0, len(garbage), size=int(bad.sum()))][:, None]
    v[bad] = garbage[rng.integers(0, len(garbage), size=int(bad.sum()))][:, None]
    q = rng.normal(size=(b, hkv * g, tq, d)).astype(np.float32)
    q_pos = np.stack([rng.integers(c // 3, c + 2) + np.arange(tq) for _ in range(b)]).astype(np.int32)
    if pad_query:
        q_pos[-1, -1] = -1
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return dict(q=cast(q), k=cast(k), v=cast(v), pos=jnp.asarray(pos), q_pos=jnp.asarray(q_pos),
                lengths=None if lengths is None else jnp.asarray(lengths))


def test_reference_matches_naive_numpy():
    case = make_case(0, b=2, hkv=2, g=2, tq=3, c=40, d=16, lengths=[[40, 17], [0, 33]], pad_query=True)
    for kw in ({}, {"window": 9}, {"logit_softcap": 2.0, "sm_scale": 0.3}):
        ref = attention_reference(case["q"], case["k"], case["v"], case["pos"], case["q_pos"],
                                  lengths=case["lengths"], **kw)
        want = naive_attention(case["q"], case["k"], case["v"], case["pos"], case["q_pos"], case["lengths"],
                               sm_scale=kw.get("sm_scale"), window=kw.get("window", 0),
                               softcap=kw.get("logit_softcap", 0.0))
        assert np.isfinite(np.asarray(ref)).all()
        np.testing.assert_allclose(np.asarray(ref), want, atol=1e-5, rtol=1e-5)


# (g, d, dtype, tq, lengths, window, softcap, strategy, num_splits, dv): GQA 1/4/8, head_dim 64/128, f32/bf16,
# ragged lengths not multiple of block_k=64 (C=200 is not either), both strategies, several split counts.
CASES = [
    (1, 64, jnp.float32, 1, [[200, 37], [130, 65]], 0, 0.0, "pipeline", 3, None),
    (4, 128, jnp.bfloat16, 2, [[5, 200], [64, 129]], 0, 0.0, "loop", 2, None),
    (8, 64, jnp.bfloat16, 1, None, 0, 0.0, "pipeline", None, None),
    (4, 64, jnp.float32, 3, [[150, 199], [1, 100]], 48, 20.0, "pipeline", 2, None),
    (8, 128, jnp.float32, 1, [[77, 0], [200, 190]], 0, 0.0, "loop", 4, None),
    (1, 128, jnp.bfloat16, 4, None, 30, 10.0, "loop", 1, None),
    (4, 64, jnp.float32, 1, [[33, 180], [99, 2]], 0, 0.0, "pipeline", 1, 128),
]


@pytest.mark.parametrize("g,d,dtype,tq,lengths,window,softcap,strategy,num_splits,dv", CASES)
def test_decode_matches_reference(g, d, dtype, tq, lengths, window, softcap, strategy, num_splits, dv):
    case = make_case(g * 100 + d + tq, g=g, tq=tq, d=d, dv=dv, dtype=dtype, lengths=lengths, pad_query=tq > 1)
    kw = dict(lengths=case["lengths"], window=window, logit_softcap=softcap)
    out = decode_attention(case["q"], case["k"], case["v"], case["pos"], case["q_pos"], block_k=64,
                           num_splits=num_splits, strategy=strategy, interpret=True, **kw)
    ref = ref_jit(case["q"], case["k"], case["v"], case["pos"], case["q_pos"], **kw)
    assert out.shape == ref.shape == (2, 2 * g, tq, dv or d) and out.dtype == dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "garbage in masked slots leaked into the output"
    np.testing.assert_allclose(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    if tq > 1:  # the padding query (q_pos = -1) outputs zeros
        assert (out[-1, :, -1] == 0).all()


@pytest.mark.parametrize("strategy", ["pipeline", "loop"])
def test_ragged_heads_very_different_lengths(strategy):
    """Heads with 3 vs 500 valid slots: matches the reference and NaN/inf/huge data past the length never leaks."""
    c = 512
    lengths = np.array([[3, 500], [500, 0]], np.int32)
    case = make_case(7, b=2, hkv=2, g=4, tq=1, c=c, d=64, lengths=lengths, holes=0.0, shuffle=False)
    q_pos = jnp.full((2, 1), c + 10, jnp.int32)
    out = decode_attention(case["q"], case["k"], case["v"], case["pos"], q_pos, lengths=case["lengths"],
                           block_k=128, strategy=strategy, interpret=True)
    ref = ref_jit(case["q"], case["k"], case["v"], case["pos"], q_pos, lengths=case["lengths"])
    out = np.asarray(out)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, np.asarray(ref), atol=1e-5, rtol=1e-5)
    # head (0, 0) sees exactly its 3 slots; head (1, 1) has length 0 → zeros
    want = naive_attention(case["q"][:1, :4], case["k"][:1, :1, :3], case["v"][:1, :1, :3], case["pos"][:1, :1, :3],
                           q_pos[:1])
    np.testing.assert_allclose(out[:1, :4], want, atol=1e-5, rtol=1e-5)
    assert (out[1, 4:] == 0).all()


def test_no_visible_key_gives_zeros_and_splits_agree():
    case = make_case(3, g=2, tq=2, c=96, d=64)
    q_pos = jnp.array([[-1, -1], [0, 95]], jnp.int32)
    pos = case["pos"].at[1].set(jnp.where(case["pos"][1] == 0, 1, case["pos"][1]))  # batch 1: no key at pos 0
    outs = [np.asarray(decode_attention(case["q"], case["k"], case["v"], pos, q_pos, block_k=32, num_splits=s,
                                        interpret=True)) for s in (1, 3)]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
    assert (outs[0][0] == 0).all() and (outs[0][1, :, 0] == 0).all()
    ref = ref_jit(case["q"], case["k"], case["v"], pos, q_pos)
    np.testing.assert_allclose(outs[0], np.asarray(ref), atol=1e-5)


def test_f32_queries_over_bf16_cache():
    case = make_case(4, g=4, tq=1, c=64, d=64, dtype=jnp.bfloat16, lengths=[[64, 30], [9, 50]])
    q = case["q"].astype(jnp.float32) + 1e-3  # not representable in bf16: must not be rounded
    out = decode_attention(q, case["k"], case["v"], case["pos"], case["q_pos"], lengths=case["lengths"],
                           block_k=32, interpret=True)
    ref = ref_jit(q, case["k"], case["v"], case["pos"], case["q_pos"], lengths=case["lengths"])
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_tpu_interpreter():
    """The pipeline (TPU) strategy under the TPU interpreter (simulated VMEM/SMEM, DMAs and semaphores)."""
    from jax.experimental.pallas import tpu as pltpu

    case = make_case(11, g=4, tq=2, c=200, d=64, lengths=[[200, 37], [130, 65]])
    out = decode_attention(case["q"], case["k"], case["v"], case["pos"], case["q_pos"], lengths=case["lengths"],
                           block_k=64, num_splits=2, interpret=pltpu.InterpretParams())
    ref = ref_jit(case["q"], case["k"], case["v"], case["pos"], case["q_pos"], lengths=case["lengths"])
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_validation_errors():
    case = make_case(1, g=2, c=64, d=64)
    q, k, v, pos, qp = case["q"], case["k"], case["v"], case["pos"], case["q_pos"]
    with pytest.raises(ValueError, match="multiple of the number of KV heads"):
        decode_attention(q[:, :3], k, v, pos, qp, interpret=True)
    with pytest.raises(TypeError, match="share a dtype"):
        decode_attention(q, k, v.astype(jnp.bfloat16), pos, qp, interpret=True)
    with pytest.raises(ValueError, match="head_dim"):
        decode_attention(q[..., :32], k, v, pos, qp, interpret=True)
    with pytest.raises(ValueError, match="pos must have shape"):
        decode_attention(q, k, v, pos[:, :, :10], qp, interpret=True)
    with pytest.raises(ValueError, match="lengths must have shape"):
        decode_attention(q, k, v, pos, qp, lengths=jnp.zeros((2,), jnp.int32), interpret=True)
    with pytest.raises(TypeError, match="integer"):
        decode_attention(q, k, v, pos.astype(jnp.float32), qp, interpret=True)
    with pytest.raises(ValueError, match="strategy"):
        decode_attention(q, k, v, pos, qp, strategy="bogus", interpret=True)
    with pytest.raises(ValueError, match="block_k"):
        decode_attention(q, k, v, pos, qp, block_k=12, interpret=True)
    with pytest.raises(ValueError, match="window"):
        decode_attention(q, k, v, pos, qp, window=-1, interpret=True)


def test_entry_point_and_interpret_default():
    assert cm.resolve_interpret(None) == (jax.default_backend() == "cpu")
    assert attention_impl("decode") is decode_attention
    assert attention_impl("decode_attention", "reference") is decode_attention_reference
    with pytest.raises(ValueError, match="unknown kernel"):
        attention_impl("nope")
    with pytest.raises(ValueError, match="unknown impl"):
        attention_impl("decode", "cuda")


@pytest.mark.parametrize("platform,strategy", [("tpu", "pipeline"), ("cuda", "loop")])
def test_lowers_for_tpu_and_gpu(platform, strategy):
    """The kernel lowers through Mosaic TPU / Triton (jax.export on the CPU; no device compile)."""
    from jax import export

    sd = jax.ShapeDtypeStruct
    b, hkv, g, c, d = 2, 2, 3, 1000, 128
    args = (sd((b, hkv * g, 1, d), jnp.bfloat16), sd((b, hkv, c, d), jnp.bfloat16), sd((b, hkv, c, d), jnp.bfloat16),
            sd((b, hkv, c), jnp.int32), sd((b, 1), jnp.int32), sd((b, hkv), jnp.int32))

    def f(q, k, v, pos, q_pos, lengths):
        return decode_attention(q, k, v, pos, q_pos, lengths=lengths, window=256, logit_softcap=30.0,
                                interpret=False, backend=platform, strategy=strategy)

    exp = export.export(jax.jit(f), platforms=[platform], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    assert exp.out_avals[0].shape == (b, hkv * g, 1, d)

"""pallas_kernels.prefill_attention_with_scores (interpret mode): output, column sums and observation-window
probabilities against the jnp reference, and the reference against numpy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import PrefillOutput, attention_impl, prefill_attention_with_scores
from pallas_kernels.reference import prefill_attention_with_scores_reference

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
ref_jit = jax.jit(prefill_attention_with_scores_reference,
                  static_argnames=("window", "logit_softcap", "obs_window", "sm_scale"))


def naive_probs(q, k, pos, q_pos, lengths=None, window=0, softcap=0.0):
    """Probabilities (B, Hq, Tq, C) in float64 numpy, one row at a time."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    pos, q_pos = np.asarray(pos), np.asarray(q_pos)
    b_, hq, tq, d = q.shape
    hkv, c = k.shape[1], k.shape[2]
    p = np.zeros((b_, hq, tq, c))
    for b in range(b_):
        for h in range(hq):
            kv = h // (hq // hkv)
            n = c if lengths is None else int(lengths[b][kv])
            for t in range(tq):
                qp = q_pos[b, t]
                vis = [ci for ci in range(n) if pos[b, kv, ci] >= 0 and 0 <= qp and pos[b, kv, ci] <= qp
                       and (not window or qp - pos[b, kv, ci] < window)]
                if not vis:
                    continue
                s = np.array([q[b, h, t] @ k[b, kv, ci] for ci in vis]) * d ** -0.5
                if softcap:
                    s = softcap * np.tanh(s / softcap)
                e = np.exp(s - s.max())
                p[b, h, t, vis] = e / e.sum()
    return p


def make_chunk(seed, *, b=2, hkv=2, g=4, tq=24, prefix=40, c=96, d=64, dtype=jnp.float32, lengths=None,
               evicted=True):
    """A cache holding an (evicted, shuffled) prefix plus the chunk's own keys; empty slots hold NaN/inf."""
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(b, hkv, c, d)).astype(np.float32)
    v = rng.normal(size=(b, hkv, c, d)).astype(np.float32)
    pos = np.full((b, hkv, c), -1, np.int32)
    starts = rng.integers(prefix, prefix + 30, size=b)  # original position of the chunk's first token
    q_pos = np.stack([s + np.arange(tq) for s in starts]).astype(np.int32)
    for bi in range(b):
        for h in range(hkv):
            kept = np.sort(rng.choice(starts[bi], size=prefix, replace=False)) if evicted else np.arange(prefix)
            slots = np.concatenate([kept, q_pos[bi]])
            perm = rng.permutation(prefix + tq) if evicted else np.arange(prefix + tq)
            pos[bi, h, perm] = slots
    q_pos[-1, -2:] = -1  # padding queries (their keys are still in the cache)
    bad = pos < 0
    if lengths is not None:
        past = np.arange(c)[None, None, :] >= np.asarray(lengths)[:, :, None]
        bad |= past
        pos[past] = 0
    garbage = np.array([np.nan, np.inf, 1e30], np.float32)
    k[bad] = garbage[rng.integers(0, 3, size=int(bad.sum()))][:, None]
    v[bad] = garbage[rng.integers(0, 3, size=int(bad.sum()))][:, None]
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return dict(q=cast(rng.normal(size=(b, hkv * g, tq, d))), k=cast(k), v=cast(v), pos=jnp.asarray(pos),
                q_pos=jnp.asarray(q_pos), lengths=None if lengths is None else jnp.asarray(lengths, jnp.int32))


def test_reference_matches_naive_numpy():
    case = make_chunk(0, g=2, tq=6, prefix=10, c=24, d=16, lengths=[[24, 20], [13, 24]])
    for kw in ({}, {"window": 5, "logit_softcap": 3.0}):
        res = prefill_attention_with_scores_reference(case["q"], case["k"], case["v"], case["pos"], case["q_pos"],
                                                      lengths=case["lengths"], obs_window=4, **kw)
        p = naive_probs(case["q"], case["k"], case["pos"], case["q_pos"], case["lengths"], kw.get("window", 0),
                        kw.get("logit_softcap", 0.0))
        np.testing.assert_allclose(np.asarray(res.colsum), p.sum(axis=2), atol=1e-5)
        np.testing.assert_allclose(np.asarray(res.obs_probs), p[:, :, -4:], atol=1e-6)
        v = np.nan_to_num(np.asarray(case["v"], np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        g = p.shape[1] // v.shape[1]
        want = np.einsum("bhtc,bhcd->bhtd", p, np.repeat(v, g, axis=1))
        np.testing.assert_allclose(np.asarray(res.out), want, atol=1e-5)


# (g, d, dtype, tq, block_q, block_k, lengths, window, softcap, obs_window, strategy, evicted): GQA 1/4/8, head_dim
# 64/128, f32/bf16, ragged lengths not multiple of block_k, Tq not multiple of block_q, both strategies; an
# un-evicted (ordered) cache makes the pipeline strategy skip causally invisible blocks.
CASES = [
    (4, 64, jnp.float32, 24, 8, 32, [[96, 50], [70, 96]], 24, 0.0, 5, "pipeline", True),
    (1, 128, jnp.bfloat16, 20, 16, 32, None, 16, 30.0, 0, "loop", True),
    (8, 64, jnp.bfloat16, 21, 8, 16, None, 0, 0.0, 3, "pipeline", False),
    (4, 128, jnp.float32, 24, 8, 32, [[80, 96], [96, 60]], 20, 0.0, 8, "loop", True),
]


@pytest.mark.parametrize("g,d,dtype,tq,block_q,block_k,lengths,window,softcap,obs_window,strategy,evicted", CASES)
def test_prefill_with_scores_matches_reference(g, d, dtype, tq, block_q, block_k, lengths, window, softcap,
                                               obs_window, strategy, evicted):
    case = make_chunk(g + d + tq, g=g, tq=tq, d=d, dtype=dtype, lengths=lengths, evicted=evicted)
    kw = dict(lengths=case["lengths"], window=window, logit_softcap=softcap, obs_window=obs_window)
    res = prefill_attention_with_scores(case["q"], case["k"], case["v"], case["pos"], case["q_pos"], block_q=block_q,
                                        block_k=block_k, strategy=strategy, interpret=True, **kw)
    ref = ref_jit(case["q"], case["k"], case["v"], case["pos"], case["q_pos"], **kw)
    assert isinstance(res, PrefillOutput)
    b, hq, c = 2, 2 * g, case["k"].shape[2]
    assert res.out.shape == (b, hq, tq, d) and res.out.dtype == dtype
    assert res.colsum.shape == (b, hq, c) and res.colsum.dtype == jnp.float32
    for got in res:
        if got is not None:
            assert np.isfinite(np.asarray(got, np.float32)).all(), "garbage in empty slots leaked"
    np.testing.assert_allclose(np.asarray(res.out, np.float32), np.asarray(ref.out, np.float32), atol=TOL[dtype],
                               rtol=TOL[dtype])
    np.testing.assert_allclose(np.asarray(res.colsum), np.asarray(ref.colsum), atol=1e-5 * tq, rtol=1e-5)
    if obs_window:
        assert res.obs_probs.shape == (b, hq, obs_window, c)
        np.testing.assert_allclose(np.asarray(res.obs_probs), np.asarray(ref.obs_probs), atol=1e-5)
    else:
        assert res.obs_probs is None
    # every valid query with at least one visible key distributes exactly 1 over the keys
    p_rows = naive_probs(case["q"], case["k"], case["pos"], case["q_pos"], lengths, window, softcap)
    n_rows = (p_rows.sum(-1) > 0.5).sum(-1)  # (B, Hq)
    np.testing.assert_allclose(np.asarray(res.colsum).sum(-1), n_rows, rtol=1e-5)
    if lengths is None:  # causal chunk in the cache: every non-padding query sees at least itself
        np.testing.assert_array_equal(n_rows, (np.asarray(case["q_pos"]) >= 0).sum(-1)[:, None].repeat(hq, 1))
    assert (np.asarray(res.out, np.float32)[-1, :, -2:] == 0).all()  # padding queries
    assert (np.asarray(res.colsum)[np.broadcast_to(np.asarray(case["pos"]) < 0, (b, 2, c)).repeat(g, 1)] == 0).all()


def test_tpu_interpreter():
    """Both passes of the pipeline (TPU) strategy under the TPU interpreter (simulated memories and DMAs)."""
    from jax.experimental.pallas import tpu as pltpu

    case = make_chunk(3, g=2, tq=16, d=64, lengths=[[96, 50], [70, 96]])
    kw = dict(lengths=case["lengths"], obs_window=4)
    res = prefill_attention_with_scores(case["q"], case["k"], case["v"], case["pos"], case["q_pos"], block_q=8,
                                        block_k=32, interpret=pltpu.InterpretParams(), **kw)
    ref = ref_jit(case["q"], case["k"], case["v"], case["pos"], case["q_pos"], **kw)
    for got, want in zip(res, ref):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_prefill_validation_and_entry_point():
    case = make_chunk(1, tq=8, c=64)
    with pytest.raises(ValueError, match="obs_window"):
        prefill_attention_with_scores(case["q"], case["k"], case["v"], case["pos"], case["q_pos"], obs_window=9,
                                      interpret=True)
    with pytest.raises(ValueError, match="q_pos must have shape"):
        prefill_attention_with_scores(case["q"], case["k"], case["v"], case["pos"], case["q_pos"][:, :3],
                                      interpret=True)
    with pytest.raises(ValueError, match="block_q"):
        prefill_attention_with_scores(case["q"], case["k"], case["v"], case["pos"], case["q_pos"], block_q=0,
                                      interpret=True)
    assert attention_impl("prefill") is prefill_attention_with_scores
    assert attention_impl("prefill_attention_with_scores", "reference") is prefill_attention_with_scores_reference


@pytest.mark.parametrize("platform,strategy", [("tpu", "pipeline"), ("cuda", "loop")])
def test_lowers_for_tpu_and_gpu(platform, strategy):
    """Both passes lower through Mosaic TPU / Triton (jax.export on the CPU; no device compile)."""
    from jax import export

    sd = jax.ShapeDtypeStruct
    b, hkv, g, c, d, tq, w = 1, 2, 3, 1000, 128, 300, 5
    args = (sd((b, hkv * g, tq, d), jnp.bfloat16), sd((b, hkv, c, d), jnp.bfloat16), sd((b, hkv, c, d), jnp.bfloat16),
            sd((b, hkv, c), jnp.int32), sd((b, tq), jnp.int32), sd((b, hkv), jnp.int32))

    def f(q, k, v, pos, q_pos, lengths):
        return prefill_attention_with_scores(q, k, v, pos, q_pos, lengths=lengths, obs_window=w, window=512,
                                             interpret=False, backend=platform, strategy=strategy)

    exp = export.export(jax.jit(f), platforms=[platform], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    assert [a.shape for a in exp.out_avals] == [(b, hkv * g, tq, d), (b, hkv * g, c), (b, hkv * g, w, c)]

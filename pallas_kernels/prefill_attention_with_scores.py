"""Causal flash attention of a chunk of queries against the cache that ALSO returns per-key attention statistics.

The chunk's own keys are already in the cache (positioned by ``pos``), so causality is the usual position mask.
Besides the output, it returns

* ``colsum`` ``(B, Hq, C)``: the softmax probability each key slot received, summed over the chunk's valid queries
  (what H2O / Scissorhands / CAKE accumulate), and
* optionally ``obs_probs`` ``(B, Hq, W, C)``: the probabilities of the chunk's last ``W = obs_window`` queries
  (SnapKV's observation window),

without materialising the ``(Tq, C)`` probability matrix in HBM. Exact column sums need each row's final softmax
normaliser, hence two passes:

1. flash attention (the split-KV machinery of :mod:`pallas_kernels._flash` with one split) → output and the final
   row statistics ``m`` (max logit) and ``l`` (sum of ``exp(s - m)``);
2. grid ``(B, Hkv, KV blocks, query blocks)``: recompute the logits block by block, ``p = exp(s - m) / l``, and
   accumulate ``sum_rows p`` into the KV block's ``colsum`` tile (resident across the query-block axis). The
   observation-window probabilities of a KV block are written at its first query block.

Blocks that cannot hold a visible key (past the head's length, or entirely after / before the query block's
positions under causality / the window) are skipped in both passes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm
from pallas_kernels import _flash
from pallas_kernels._common import PrefillOutput
from pallas_kernels.decode_attention import check_dense_cache

_STATIC = ("sm_scale", "window", "logit_softcap", "obs_window", "block_q", "block_k", "interpret", "strategy",
           "backend")


def _probs(q, qp, m, l, k, kp, ok, *, sm_scale, softcap, window):
    """Final probabilities ``(R, N)`` of a block from pass-1 row statistics (same logits as pass 1)."""
    s, mask = cm.masked_scores(q, k, qp, kp, ok, sm_scale=sm_scale, softcap=softcap, window=window)
    inv_l = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
    return jnp.where(mask, jnp.exp(s - m), 0.0) * inv_l


def _colsum_pass(q5, qpos4, m_all, l_all, k, pos, lens, obs, tables, *, block_q, block_k, sm_scale, softcap,
                 window, plat, strategy, interpret):
    """Pass 2. Returns ``colsum (B, Hkv, G, C)`` and, if ``obs`` is given, ``obs_probs (B, Hkv, G, W, C)``."""
    b, hkv, g, tqp, d = q5.shape
    c = k.shape[2]
    bq, bk = block_q, block_k
    nq, nk = tqp // bq, cm.cdiv(c, bk)
    rows = g * bq
    probs = functools.partial(_probs, sm_scale=sm_scale, softcap=softcap, window=window)
    pos4 = pos.reshape(b, hkv, 1, c)
    out_shape = [jax.ShapeDtypeStruct((b, hkv, g, c), jnp.float32)]
    if obs is not None:
        qo, qpo, mo, lo = obs
        w = qo.shape[3]
        out_shape.append(jax.ShapeDtypeStruct((b, hkv, g, w, c), jnp.float32))
        obs_in = [qo, qpo, mo, lo]
    else:
        w, obs_in = 0, []

    def obs_block(obs_refs, k_blk, kp, ok):
        qo_ref, qpo_ref, mo_ref, lo_ref = obs_refs
        p = probs(qo_ref[...].reshape(g * w, d), qpo_ref[...].reshape(g * w, 1), mo_ref[...].reshape(g * w, 1),
                  lo_ref[...].reshape(g * w, 1), k_blk, kp, ok)
        return p.reshape(g, w, bk)

    if strategy == "pipeline":
        def kv_blk(b_, h_, kb, len_ref):
            last = jnp.maximum(cm.cdiv_nonneg(len_ref[b_ * hkv + h_], bk) - 1, 0)
            return jnp.minimum(kb, last)

        in_specs = [
            pl.BlockSpec((None, None, g, bq, d), lambda b_, h_, kb, qi, *_: (b_, h_, 0, qi, 0)),
            pl.BlockSpec((None, g, bq, 1), lambda b_, h_, kb, qi, *_: (b_, 0, qi, 0)),
            pl.BlockSpec((None, None, g, bq, 1), lambda b_, h_, kb, qi, *_: (b_, h_, 0, qi, 0)),
            pl.BlockSpec((None, None, g, bq, 1), lambda b_, h_, kb, qi, *_: (b_, h_, 0, qi, 0)),
            pl.BlockSpec((None, None, bk, d), lambda b_, h_, kb, qi, len_ref, *_: (b_, h_, kv_blk(b_, h_, kb,
                                                                                                    len_ref), 0)),
            pl.BlockSpec((None, None, 1, bk), lambda b_, h_, kb, qi, len_ref, *_: (b_, h_, 0, kv_blk(b_, h_, kb,
                                                                                                       len_ref))),
        ]
        if obs is not None:
            in_specs += [
                pl.BlockSpec((None, None, g, w, d), lambda b_, h_, kb, qi, *_: (b_, h_, 0, 0, 0)),
                pl.BlockSpec((None, g, w, 1), lambda b_, h_, kb, qi, *_: (b_, 0, 0, 0)),
                pl.BlockSpec((None, None, g, w, 1), lambda b_, h_, kb, qi, *_: (b_, h_, 0, 0, 0)),
                pl.BlockSpec((None, None, g, w, 1), lambda b_, h_, kb, qi, *_: (b_, h_, 0, 0, 0)),
            ]
        out_specs = [pl.BlockSpec((None, None, g, bk), lambda b_, h_, kb, qi, *_: (b_, h_, 0, kb))]
        if obs is not None:
            out_specs.append(pl.BlockSpec((None, None, g, w, bk), lambda b_, h_, kb, qi, *_: (b_, h_, 0, 0, kb)))

        def kernel(len_ref, kmin_ref, kmax_ref, qmin_ref, qmax_ref, q_ref, qp_ref, m_ref, l_ref, k_ref, pos_ref,
                   *rest):
            obs_refs = rest[:4] if obs is not None else ()
            cs_ref = rest[4] if obs is not None else rest[0]
            ob_ref = rest[5] if obs is not None else None
            b_, h_, kb, qi = (pl.program_id(i) for i in range(4))
            length = len_ref[b_ * hkv + h_]
            start = kb * bk
            live = start < length

            def block_inputs():
                ok = (start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)) < length
                return k_ref[...].astype(q_ref.dtype), pos_ref[...], ok

            @pl.when(qi == 0)
            def _init():
                cs_ref[...] = jnp.zeros(cs_ref.shape, jnp.float32)
                if ob_ref is not None:
                    ob_ref[...] = jnp.zeros(ob_ref.shape, jnp.float32)

                    @pl.when(live)
                    def _obs():
                        ob_ref[...] = obs_block(obs_refs, *block_inputs())

            needed = jnp.logical_and(live, _flash.block_needed((kmin_ref, kmax_ref, qmin_ref, qmax_ref),
                                                               b_ * hkv + h_, b_, qi, kb, nk=nk, nq=nq,
                                                               window=window))

            @pl.when(needed)
            def _accumulate():
                k_blk, kp, ok = block_inputs()
                p = probs(q_ref[...].reshape(rows, d), qp_ref[...].reshape(rows, 1), m_ref[...].reshape(rows, 1),
                          l_ref[...].reshape(rows, 1), k_blk, kp, ok)
                cs_ref[...] += jnp.sum(p.reshape(g, bq, bk), axis=1)

        from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

        grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=5, grid=(b, hkv, nk, nq), in_specs=in_specs,
                                                 out_specs=out_specs)
        outs = pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=interpret,
                              compiler_params=cm.compiler_params(plat, strategy, 3, 1))(
            lens.reshape(-1), *tables, q5, qpos4, m_all, l_all, k, pos4, *obs_in)
    else:  # "loop": grid (B, Hkv, KV blocks), loop over query blocks inside
        in_specs = [
            pl.BlockSpec((None, None, 1), lambda b_, h_, kb: (b_, h_, 0)),
            pl.BlockSpec((None, None, g, tqp, d), lambda b_, h_, kb: (b_, h_, 0, 0, 0)),
            pl.BlockSpec((None, g, tqp, 1), lambda b_, h_, kb: (b_, 0, 0, 0)),
            pl.BlockSpec((None, None, g, tqp, 1), lambda b_, h_, kb: (b_, h_, 0, 0, 0)),
            pl.BlockSpec((None, None, g, tqp, 1), lambda b_, h_, kb: (b_, h_, 0, 0, 0)),
            pl.BlockSpec((None, None, bk, d), lambda b_, h_, kb: (b_, h_, kb, 0)),
            pl.BlockSpec((None, None, 1, bk), lambda b_, h_, kb: (b_, h_, 0, kb)),
        ]
        if obs is not None:
            in_specs += [
                pl.BlockSpec((None, None, g, w, d), lambda b_, h_, kb: (b_, h_, 0, 0, 0)),
                pl.BlockSpec((None, g, w, 1), lambda b_, h_, kb: (b_, 0, 0, 0)),
                pl.BlockSpec((None, None, g, w, 1), lambda b_, h_, kb: (b_, h_, 0, 0, 0)),
                pl.BlockSpec((None, None, g, w, 1), lambda b_, h_, kb: (b_, h_, 0, 0, 0)),
            ]
        out_specs = [pl.BlockSpec((None, None, g, bk), lambda b_, h_, kb: (b_, h_, 0, kb))]
        if obs is not None:
            out_specs.append(pl.BlockSpec((None, None, g, w, bk), lambda b_, h_, kb: (b_, h_, 0, 0, kb)))

        def loop_kernel(len_ref, q_ref, qp_ref, m_ref, l_ref, k_ref, pos_ref, *rest):
            obs_refs = rest[:4] if obs is not None else ()
            cs_ref = rest[4] if obs is not None else rest[0]
            ob_ref = rest[5] if obs is not None else None
            kb = pl.program_id(2)
            length = len_ref[0]
            start = kb * bk
            live = start < length

            def compute():
                k_blk, kp = k_ref[...].astype(q_ref.dtype), pos_ref[...]
                ok = (start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)) < length

                def body(qi, acc):
                    sl = pl.ds(qi * bq, bq)
                    p = probs(q_ref[:, sl, :].reshape(rows, d), qp_ref[:, sl, :].reshape(rows, 1),
                              m_ref[:, sl, :].reshape(rows, 1), l_ref[:, sl, :].reshape(rows, 1), k_blk, kp, ok)
                    return acc + jnp.sum(p.reshape(g, bq, bk), axis=1)

                cs = lax.fori_loop(0, nq, body, jnp.zeros((g, bk), jnp.float32))
                if ob_ref is None:
                    return (cs,)
                return cs, obs_block(obs_refs, k_blk, kp, ok)

            zeros = (jnp.zeros((g, bk), jnp.float32),) + (
                (jnp.zeros((g, w, bk), jnp.float32),) if ob_ref is not None else ())
            res = lax.cond(live, compute, lambda: zeros)
            cs_ref[...] = res[0]
            if ob_ref is not None:
                ob_ref[...] = res[1]

        outs = pl.pallas_call(loop_kernel, grid=(b, hkv, nk), in_specs=in_specs, out_specs=out_specs,
                              out_shape=out_shape, interpret=interpret,
                              compiler_params=cm.compiler_params(plat, strategy, 3, 0))(
            lens.reshape(b, hkv, 1), q5, qpos4, m_all, l_all, k, pos4, *obs_in)
    return outs[0], (outs[1] if obs is not None else None)


@functools.partial(jax.jit, static_argnames=_STATIC)
def prefill_attention_with_scores(q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array, q_pos: jax.Array, *,
                                  lengths: jax.Array | None = None, sm_scale: float | None = None, window: int = 0,
                                  logit_softcap: float = 0.0, obs_window: int = 0, block_q: int | None = None,
                                  block_k: int | None = None, interpret: bool | None = None,
                                  strategy: str | None = None, backend: str | None = None) -> PrefillOutput:
    """Chunked-prefill attention with per-key score accumulation.

    Args:
      q: ``(B, Hq, Tq, D)`` the chunk's queries; ``q_pos`` ``(B, Tq)`` their positions (-1 = padding).
      k, v, pos: the dense cache layer (already holding the chunk's keys), as :func:`decode_attention`.
      lengths, sm_scale, window, logit_softcap: as :func:`decode_attention`.
      obs_window: ``W`` > 0 also returns the probabilities of the last ``W`` queries of the chunk (``W <= Tq``).
      block_q / block_k: query tokens / KV slots per tile (defaults: 128 tokens (GPU: 128 // G) / 512 slots on
        TPU, 128 on GPU and in interpret mode).

    Returns :class:`PrefillOutput` ``(out (B, Hq, Tq, Dv), colsum (B, Hq, C), obs_probs (B, Hq, W, C) | None)``.
    """
    b, hkv, c, dv = check_dense_cache(q, k, v, pos)
    g, scale = cm.check_common(q, q_pos, b=b, hkv=hkv, lengths=lengths, sm_scale=sm_scale, window=window,
                               logit_softcap=logit_softcap)
    tq, d = q.shape[2], q.shape[3]
    obs_window = int(obs_window)
    if obs_window < 0 or obs_window > tq:
        raise ValueError(f"obs_window must be in [0, Tq={tq}], got {obs_window}")
    interp = cm.resolve_interpret(interpret)
    plat = cm.platform(interp, backend)
    strat = cm.resolve_strategy(strategy, plat)
    cm.check_head_dims(plat, head_dim=d, v_head_dim=dv)
    bk = cm.choose_block_k(block_k, c, plat)
    gp = cm.gpu_heads(g, plat)
    if block_q is None:  # GPU: ~128 rows (G * block_q) per program to keep the score tile in registers
        bq = max(1, 128 // gp) if plat == "gpu" else 128
    else:
        bq = int(block_q)
    if bq <= 0:
        raise ValueError(f"block_q must be positive, got {block_q}")
    bq = min(bq, tq)
    if plat == "tpu" and bq < tq:
        bq = cm.cdiv(bq, 8) * 8  # sublane tiling of the (block_q, 1) position / statistics blocks
    if plat == "gpu":
        bq = max(cm.next_pow2(bq), cm.next_pow2(cm.cdiv(16, gp)))
    q5, qpos4 = _flash.prepare_queries(q, q_pos, hkv, bq, gp)
    tqp = q5.shape[3]
    lens = _flash.resolve_lengths(lengths, b, hkv, c)
    pos = pos.astype(jnp.int32)
    tables = None
    if strat == "pipeline":
        tables = _flash.block_skip_tables(pos, lens, qpos4[:, 0, :, 0].reshape(b, tqp // bq, bq), bk)
    common = dict(block_k=bk, sm_scale=scale, softcap=float(logit_softcap), window=int(window), plat=plat,
                  strategy=strat, interpret=interp)
    m, l, acc = _flash.flash_partials(q5, qpos4, pos, lens, [(k, 1), (v, 1)], _flash.cast_kv(q.dtype),
                                      block_q=bq, num_splits=1, blocks_per_split=cm.cdiv(c, bk), dv=dv,
                                      skip_tables=tables, **common)
    m, l, acc = m[:, :, 0], l[:, :, 0], acc[:, :, 0]  # (B, Hkv, Gp, Tqp, 1 | Dv)
    out = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)[:, :, :g, :tq]
    out = out.reshape(b, hkv * g, tq, dv).astype(q.dtype)
    obs = None
    if obs_window:
        sl = slice(tq - obs_window, tq)
        obs = [q5[:, :, :, sl], qpos4[:, :, sl], m[:, :, :, sl], l[:, :, :, sl]]
        wp = cm.next_pow2(obs_window) if plat == "gpu" else obs_window
        if wp != obs_window:  # Triton: power-of-two rows; padded rows have no visible key (probability 0)
            pad = ((0, 0), (0, 0), (0, 0), (0, wp - obs_window), (0, 0))
            obs = [jnp.pad(obs[0], pad), jnp.pad(obs[1], pad[1:], constant_values=-1),
                   jnp.pad(obs[2], pad, constant_values=cm.MASK_VALUE), jnp.pad(obs[3], pad)]
    colsum, obs_probs = _colsum_pass(q5, qpos4, m, l, k, pos, lens, obs, tables, block_q=bq, **common)
    colsum = colsum[:, :, :g].reshape(b, hkv * g, c)
    if obs_probs is not None:
        obs_probs = obs_probs[:, :, :g, :obs_window].reshape(b, hkv * g, obs_window, c)
    return PrefillOutput(out, colsum, obs_probs)

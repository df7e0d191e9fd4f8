"""The generic split-KV flash-attention ``pallas_call`` shared by the decode, quantized-decode and prefill kernels.

:func:`flash_partials` computes, for every ``(batch, KV head, query block, split)``, the un-normalised online
softmax partials ``m`` (row max), ``l`` (row sum) and ``acc`` (sum of ``p @ v``) over the KV blocks of that split.
All ``G`` query heads of a KV head are processed together (rows = ``G * block_q``), so each KV block is read once
per query block. How a KV block is turned into float ``(k, v)`` is a callback (``load_kv``), which lets the quantized
kernel unpack and dequantize inside the kernel; an optional ``load_extra`` block (the quantized cache's
full-precision residual window) is folded into the same online softmax once per ``(batch, head)``.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm


def _whole_spec(arr):
    """BlockSpec giving each program the whole ``(b, h)`` slice of ``arr`` ``(B, Hkv, ...)``."""
    rest = tuple(arr.shape[2:])
    zeros = (0,) * len(rest)
    return pl.BlockSpec((None, None) + rest, lambda b, h, *_: (b, h) + zeros)


def block_skip_tables(pos, lengths, q_pos_blocks, block_k: int):
    """Per-block position ranges for compute skipping (causal / window) in the pipeline strategy.

    ``pos`` ``(B, Hkv, C)``, ``lengths`` ``(B, Hkv)``, ``q_pos_blocks`` ``(B, NQ, bq)`` → flat int32 tables
    ``kmin, kmax`` ``(B * Hkv * NK,)`` (min / max valid key position per KV block; empty block: ``kmin`` = int32 max,
    ``kmax`` = -1) and ``qmin, qmax`` ``(B * NQ,)`` (over valid queries; none: ``qmin`` = int32 max, ``qmax`` = -1).
    """
    big = jnp.iinfo(jnp.int32).max
    b, hkv, c = pos.shape
    nk = cm.cdiv(c, block_k)
    pad = nk * block_k - c
    p = jnp.pad(pos, ((0, 0), (0, 0), (0, pad)), constant_values=-1).reshape(b, hkv, nk, block_k)
    slot = jnp.arange(nk * block_k, dtype=jnp.int32).reshape(nk, block_k)
    ok = (p >= 0) & (slot[None, None] < lengths[:, :, None, None])
    kmin = jnp.min(jnp.where(ok, p, big), axis=-1)
    kmax = jnp.max(jnp.where(ok, p, -1), axis=-1)
    qok = q_pos_blocks >= 0
    qmin = jnp.min(jnp.where(qok, q_pos_blocks, big), axis=-1)
    qmax = jnp.max(jnp.where(qok, q_pos_blocks, -1), axis=-1)
    return [t.reshape(-1).astype(jnp.int32) for t in (kmin, kmax, qmin, qmax)]


def block_needed(tables, bh, b, qi, blk, *, nk: int, nq: int, window: int):
    """Whether KV block ``blk`` can hold a key visible to some query of query block ``qi``."""
    kmin_ref, kmax_ref, qmin_ref, qmax_ref = tables
    kidx = bh * nk + jnp.minimum(blk, nk - 1)
    qidx = b * nq + qi
    need = kmin_ref[kidx] <= qmax_ref[qidx]
    if window:
        need = jnp.logical_and(need, kmax_ref[kidx] > qmin_ref[qidx] - window)
    return need


def flash_partials(q5, qpos4, pos, lengths, kv_arrays: Sequence[tuple[jax.Array, int]],
                   load_kv: Callable, *, block_k: int, block_q: int, num_splits: int, blocks_per_split: int,
                   dv: int, sm_scale: float, softcap: float, window: int, plat: str, strategy: str,
                   interpret: bool, extra_arrays: Sequence[jax.Array] = (), load_extra: Callable | None = None,
                   skip_tables: Sequence[jax.Array] | None = None):
    """Split-KV online-softmax partials.

    Args:
      q5: ``(B, Hkv, G, Tq, D)`` queries (``Tq`` a multiple of ``block_q``).
      qpos4: ``(B, G, Tq, 1)`` int32 query positions (-1 = padding).
      pos: ``(B, Hkv, C)`` int32 key positions.
      lengths: ``(B, Hkv)`` int32, already clipped to ``[0, C]``.
      kv_arrays: ``[(array (B, Hkv, N, X), tokens_per_row)]``: per-token-axis arrays; a KV block holds
        ``block_k // tokens_per_row`` rows of each (e.g. per-channel scales: ``tokens_per_row`` = key group).
      load_kv: ``load_kv(list of block values) -> (k (block_k, D), v (block_k, dv))``.
      extra_arrays / load_extra: arrays given whole per ``(b, h)`` and ``load_extra(values) -> (k, v, kpos (1, R))``,
        attended once per ``(b, h, query block)`` (in split 0).
      skip_tables: optional :func:`block_skip_tables` output (pipeline strategy only).

    Returns ``m``, ``l`` ``(B, Hkv, S, G, Tq, 1)`` and ``acc`` ``(B, Hkv, S, G, Tq, dv)``, all f32.
    """
    b, hkv, g, tq, d = q5.shape
    c = pos.shape[2]
    bk, bq, nbs, ns = block_k, block_q, blocks_per_split, num_splits
    nq = tq // bq
    nk = cm.cdiv(c, bk)
    rows = g * bq
    for arr, tpr in kv_arrays:
        if bk % tpr:
            raise ValueError(f"block_k={bk} must be a multiple of {tpr}")
    kv_rows = [bk // tpr for _, tpr in kv_arrays]
    n_kv, n_ex = len(kv_arrays), len(extra_arrays)
    pos4 = pos.reshape(b, hkv, 1, c)
    out_shape = [jax.ShapeDtypeStruct((b, hkv, ns, g, tq, 1), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, ns, g, tq, 1), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, ns, g, tq, dv), jnp.float32)]
    update = functools.partial(cm.online_softmax_update, sm_scale=sm_scale, softcap=softcap, window=window)

    def load_q(q_ref, qp_ref):
        return q_ref[...].reshape(rows, d), qp_ref[...].reshape(rows, 1)

    def extra_update(carry, q, qp, ex_refs):
        k, v, kp = load_extra([r[...] for r in ex_refs])
        ok = jnp.ones(kp.shape, jnp.bool_)
        return update(carry, q, k, v, qp, kp, ok)

    if strategy == "pipeline":
        use_tables = skip_tables is not None
        n_pref = 5 if use_tables else 1

        def kv_block(b_, h_, s_, j_, len_ref):
            last = jnp.maximum(cm.cdiv_nonneg(len_ref[b_ * hkv + h_], bk) - 1, 0)
            return jnp.minimum(s_ * nbs + j_, last)

        def kv_map(b_, h_, qi, s_, j_, len_ref, *_):
            return (b_, h_, kv_block(b_, h_, s_, j_, len_ref), 0)

        def pos_map(b_, h_, qi, s_, j_, len_ref, *_):
            return (b_, h_, 0, kv_block(b_, h_, s_, j_, len_ref))

        in_specs = [
            pl.BlockSpec((None, None, g, bq, d), lambda b_, h_, qi, s_, j_, *_: (b_, h_, 0, qi, 0)),
            pl.BlockSpec((None, g, bq, 1), lambda b_, h_, qi, s_, j_, *_: (b_, 0, qi, 0)),
            pl.BlockSpec((None, None, 1, bk), pos_map),
        ]
        in_specs += [pl.BlockSpec((None, None, r, arr.shape[3]), kv_map) for (arr, _), r in zip(kv_arrays, kv_rows)]
        in_specs += [_whole_spec(arr) for arr in extra_arrays]
        out_map = lambda b_, h_, qi, s_, j_, *_: (b_, h_, s_, 0, qi, 0)  # noqa: E731
        out_specs = [pl.BlockSpec((None, None, None, g, bq, 1), out_map),
                     pl.BlockSpec((None, None, None, g, bq, 1), out_map),
                     pl.BlockSpec((None, None, None, g, bq, dv), out_map)]

        def kernel(*refs):
            len_ref = refs[0]
            tables = refs[1:n_pref]
            q_ref, qp_ref, pos_ref = refs[n_pref:n_pref + 3]
            kv_refs = refs[n_pref + 3:n_pref + 3 + n_kv]
            ex_refs = refs[n_pref + 3 + n_kv:n_pref + 3 + n_kv + n_ex]
            m_ref, l_ref, acc_ref = refs[-3:]
            b_, h_, qi, s_, j_ = (pl.program_id(i) for i in range(5))
            length = len_ref[b_ * hkv + h_]
            blk = s_ * nbs + j_
            start = blk * bk

            @pl.when(j_ == 0)
            def _init():
                m_ref[...] = jnp.full(m_ref.shape, cm.MASK_VALUE, jnp.float32)
                l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
                acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

            def read():
                return (m_ref[...].reshape(rows, 1), l_ref[...].reshape(rows, 1), acc_ref[...].reshape(rows, dv))

            def write(carry):
                m_ref[...] = carry[0].reshape(m_ref.shape)
                l_ref[...] = carry[1].reshape(l_ref.shape)
                acc_ref[...] = carry[2].reshape(acc_ref.shape)

            needed = start < length
            if use_tables:
                needed = jnp.logical_and(
                    needed, block_needed(tables, b_ * hkv + h_, b_, qi, blk, nk=nk, nq=nq, window=window))

            @pl.when(needed)
            def _step():
                q, qp = load_q(q_ref, qp_ref)
                kp = pos_ref[...]
                ok = (start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)) < length
                k, v = load_kv([r[...] for r in kv_refs])
                write(update(read(), q, k, v, qp, kp, ok))

            if n_ex:
                @pl.when(jnp.logical_and(s_ == 0, j_ == 0))
                def _extra():
                    q, qp = load_q(q_ref, qp_ref)
                    write(extra_update(read(), q, qp, ex_refs))

        prefetch = [lengths.reshape(-1).astype(jnp.int32)] + (list(skip_tables) if use_tables else [])
        from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

        grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=n_pref, grid=(b, hkv, nq, ns, nbs),
                                                 in_specs=in_specs, out_specs=out_specs)
        call = pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=interpret,
                              compiler_params=cm.compiler_params(plat, strategy, 4, 1))
        return call(*prefetch, q5, qpos4, pos4, *[a for a, _ in kv_arrays], *extra_arrays)

    # ------------------------------------------------------------------ "loop" strategy (GPU / Triton)
    split = nbs * bk
    in_specs = [
        pl.BlockSpec((None, None, 1), lambda b_, h_, qi, s_: (b_, h_, 0)),
        pl.BlockSpec((None, None, g, bq, d), lambda b_, h_, qi, s_: (b_, h_, 0, qi, 0)),
        pl.BlockSpec((None, g, bq, 1), lambda b_, h_, qi, s_: (b_, 0, qi, 0)),
        pl.BlockSpec((None, None, 1, split), lambda b_, h_, qi, s_: (b_, h_, 0, s_)),
    ]
    in_specs += [pl.BlockSpec((None, None, nbs * r, arr.shape[3]), lambda b_, h_, qi, s_: (b_, h_, s_, 0))
                 for (arr, _), r in zip(kv_arrays, kv_rows)]
    in_specs += [_whole_spec(arr) for arr in extra_arrays]
    out_map = lambda b_, h_, qi, s_: (b_, h_, s_, 0, qi, 0)  # noqa: E731
    out_specs = [pl.BlockSpec((None, None, None, g, bq, 1), out_map),
                 pl.BlockSpec((None, None, None, g, bq, 1), out_map),
                 pl.BlockSpec((None, None, None, g, bq, dv), out_map)]

    def loop_kernel(*refs):
        len_ref, q_ref, qp_ref, pos_ref = refs[:4]
        kv_refs = refs[4:4 + n_kv]
        ex_refs = refs[4 + n_kv:4 + n_kv + n_ex]
        m_ref, l_ref, acc_ref = refs[-3:]
        s_ = pl.program_id(3)
        length = len_ref[0]
        split_start = s_ * split
        n_blk = jnp.clip(cm.cdiv_nonneg(length - split_start, bk), 0, nbs)
        q, qp = load_q(q_ref, qp_ref)

        def body(jj, carry):
            start = split_start + jj * bk
            kp = pos_ref[:, pl.ds(jj * bk, bk)]
            vals = [r[pl.ds(jj * n, n), :] for r, n in zip(kv_refs, kv_rows)]
            k, v = load_kv(vals)
            ok = (start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)) < length
            return update(carry, q, k, v, qp, kp, ok)

        carry = lax.fori_loop(0, n_blk, body, cm.init_carry(rows, dv))
        if n_ex:
            carry = lax.cond(s_ == 0, lambda cr: extra_update(cr, q, qp, ex_refs), lambda cr: cr, carry)
        m_ref[...] = carry[0].reshape(m_ref.shape)
        l_ref[...] = carry[1].reshape(l_ref.shape)
        acc_ref[...] = carry[2].reshape(acc_ref.shape)

    call = pl.pallas_call(loop_kernel, grid=(b, hkv, nq, ns), in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret,
                          compiler_params=cm.compiler_params(plat, strategy, 4, 0))
    return call(lengths.reshape(b, hkv, 1).astype(jnp.int32), q5, qpos4, pos4, *[a for a, _ in kv_arrays],
                *extra_arrays)


def prepare_queries(q, q_pos, hkv: int, block_q: int, g_pad: int | None = None):
    """``q (B, Hq, Tq, D)`` → ``q5 (B, Hkv, Gp, Tqp, D)`` and ``qpos4 (B, Gp, Tqp, 1)``: queries padded to a
    multiple of ``block_q`` with position -1 and query heads per KV head padded to ``g_pad`` with zero queries
    (their outputs are dropped by the caller)."""
    b, hq, tq, d = q.shape
    g = hq // hkv
    gp = g if g_pad is None else g_pad
    tqp = cm.cdiv(tq, block_q) * block_q
    q5 = q.reshape(b, hkv, g, tq, d)
    qp = q_pos.astype(jnp.int32)
    if tqp != tq or gp != g:
        q5 = jnp.pad(q5, ((0, 0), (0, 0), (0, gp - g), (0, tqp - tq), (0, 0)))
        qp = jnp.pad(qp, ((0, 0), (0, tqp - tq)), constant_values=-1)
    qpos4 = jnp.broadcast_to(qp[:, None, :, None], (b, gp, tqp, 1))
    return q5, qpos4


def cast_kv(dtype):
    """``load_kv`` of a dense cache: the ``(k, v)`` blocks cast to the compute dtype ``dtype`` (no-op if equal)."""
    def load(vals):
        return vals[0].astype(dtype), vals[1].astype(dtype)
    return load


def resolve_lengths(lengths, b: int, hkv: int, c: int):
    if lengths is None:
        return jnp.full((b, hkv), c, jnp.int32)
    return jnp.clip(lengths.astype(jnp.int32), 0, c)


def decode_block_q(tq: int, g: int, plat: str) -> int:
    """Query rows per program for decode: all ``Tq`` (GPU: padded so ``G * block_q`` is a power of two >= 16)."""
    if plat != "gpu":
        return tq
    return max(cm.next_pow2(tq), cm.next_pow2(cm.cdiv(16, g)))

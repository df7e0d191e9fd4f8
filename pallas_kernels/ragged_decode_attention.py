"""Split-KV GQA decode attention over a *ragged* cache: one flat buffer of all heads' tokens per batch row.

The layout of :class:`kvjax.state.RaggedKV`: ``k`` ``(B, N, D)``, ``v`` ``(B, N, Dv)``, ``pos`` ``(B, N)``; KV head
``h`` of row ``b`` owns the flat slots ``[starts[b, h], starts[b, h] + lengths[b, h])`` (as varlen / paged attention
address their sequences). Heads hold different numbers of tokens and nothing is padded to the largest head, so the
kernel reads exactly the tokens each head keeps.

Grid ``(B, Hkv, query blocks, splits)`` (the dense kernel's ``"loop"`` strategy): all ``G = Hq / Hkv`` query heads
of a KV head are the rows of one program; split ``s`` covers blocks ``[s * nbs, (s + 1) * nbs)`` of ``block_k``
tokens of the head's segment and runs an online softmax over them with a trip count from the head's length (blocks
past it are neither read nor computed). Segments start at arbitrary flat slots: a block is read at
``min(start, N - block_k)`` and the slots before the block's start or past the segment's end are masked, so no read
leaves the buffer. A jnp reduction merges the splits (log-sum-exp), as in :mod:`pallas_kernels.decode_attention`.

Visibility of flat slot ``n`` of head ``h`` for query ``t``: ``starts <= n < starts + lengths``, ``pos[n] >= 0``,
``pos[n] <= q_pos[t]``, ``q_pos[t] >= 0`` and, with a window, ``q_pos[t] - pos[n] < window``. Rows with no visible
key output zeros.

Backends: interpret mode (CPU) and GPU (Triton: each program receives the whole flat row as its block and loads
``block_k``-token slices by pointer offset). On TPU a whole-row VMEM block does not scale to long caches; the TPU
version would stream each block from HBM with a manual DMA at the segment's offset (``memory_space=pl.ANY`` +
``pltpu.make_async_copy``), which is not implemented here: ``backend="tpu"`` raises.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm
from pallas_kernels import _flash

def _update(carry, q, k, v, qp, kp, ok, bias, *, sm_scale, softcap, window):
    """:func:`pallas_kernels._common.online_softmax_update` with a per-key logit ``bias`` ``(1, N)``."""
    m_prev, l_prev, acc_prev = carry
    s, mask = cm.masked_scores(q, k, qp, kp, ok, sm_scale=sm_scale, softcap=softcap, window=window)
    s = jnp.where(mask, s + bias, s)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    v32 = v if v.dtype == jnp.float32 else v.astype(jnp.float32)
    v = jnp.where(jnp.isfinite(v32), v, jnp.zeros_like(v))
    return m_new, l_new, alpha * acc_prev + cm.dot_nn(p.astype(v.dtype), v)


_STATIC = ("max_len", "sm_scale", "window", "logit_softcap", "block_k", "num_splits", "interpret", "backend")


def check_ragged_cache(q, k, v, pos, starts, lengths):
    """Validates a ragged cache against ``q``; returns ``(B, Hkv, N, Dv)``."""
    cm.check_rank("k", k, 3, "(B, N, D)")
    cm.check_rank("v", v, 3, "(B, N, Dv)")
    cm.check_rank("pos", pos, 2, "(B, N)")
    cm.check_rank("starts", starts, 2, "(B, Hkv)")
    cm.check_rank("lengths", lengths, 2, "(B, Hkv)")
    for name, x in (("k", k), ("v", v)):
        cm.check_float(name, x)
    for name, x in (("pos", pos), ("starts", starts), ("lengths", lengths)):
        cm.check_int(name, x)
    b, n, d = k.shape
    if v.shape[:2] != (b, n):
        raise ValueError(f"v {v.shape} does not match k {k.shape} in (B, N)")
    if pos.shape != (b, n):
        raise ValueError(f"pos must have shape (B, N) = {(b, n)}, got {pos.shape}")
    if starts.shape != lengths.shape or starts.shape[0] != b:
        raise ValueError(f"starts {starts.shape} and lengths {lengths.shape} must both be (B, Hkv) with B = {b}")
    if k.dtype != v.dtype:
        raise TypeError(f"k and v must share a dtype, got k {k.dtype}, v {v.dtype}")
    if getattr(q, "ndim", None) == 4 and q.shape[3] != d:
        raise ValueError(f"q head_dim {q.shape[3]} does not match k head_dim {d}")
    if n == 0:
        raise ValueError("the flat buffer size N must be positive")
    return b, starts.shape[1], n, v.shape[2]


@functools.partial(jax.jit, static_argnames=_STATIC)
def ragged_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array, q_pos: jax.Array,
                            starts: jax.Array, lengths: jax.Array, *, max_len: int | None = None,
                            sm_scale: float | None = None, window: int = 0, logit_softcap: float = 0.0,
                            block_k: int | None = None, num_splits: int | None = None,
                            interpret: bool | None = None, backend: str | None = None,
                            weight_slot: jax.Array | None = None, log_weight: jax.Array | None = None) -> jax.Array:
    """GQA decode attention over a ragged (flat, per-head segment) cache layer.

    Args:
      q: ``(B, Hq, Tq, D)`` queries, ``Hq = G * Hkv``.
      k, v: ``(B, N, D)`` / ``(B, N, Dv)`` flat buffers (one float dtype).
      pos: ``(B, N)`` int32 original positions (-1 = empty).
      q_pos: ``(B, Tq)`` int32 query positions (-1 = padding query → zeros).
      starts, lengths: ``(B, Hkv)`` int32: head ``h``'s tokens are flat slots ``[starts, starts + lengths)``.
      max_len: static bound on ``lengths`` (default ``N``): sizes the split plan, never read past.
      sm_scale, window, logit_softcap, block_k, num_splits, interpret, backend: as
        :func:`pallas_kernels.decode_attention`.
      weight_slot, log_weight: optional ``(B, Hkv)`` int32 / float: flat slot ``weight_slot`` of head ``h`` counts
        ``exp(log_weight)`` times in the softmax (its logit gets ``+ log_weight``; ``-1`` = no such slot).

    Returns ``(B, Hq, Tq, Dv)`` in ``q.dtype``.
    """
    b, hkv, n, dv = check_ragged_cache(q, k, v, pos, starts, lengths)
    g, scale = cm.check_common(q, q_pos, b=b, hkv=hkv, lengths=lengths, sm_scale=sm_scale, window=window,
                               logit_softcap=logit_softcap)
    interp = cm.resolve_interpret(interpret)
    plat = cm.platform(interp, backend)
    if plat == "tpu":
        raise NotImplementedError("ragged_decode_attention has no TPU lowering (needs a manual-DMA variant); use "
                                  "interpret mode or a GPU")
    cm.check_head_dims(plat, head_dim=q.shape[3], v_head_dim=dv)
    max_len = n if max_len is None else max(1, min(int(max_len), n))
    bk = cm.choose_block_k(block_k, max_len, plat)
    if n < bk:  # tiny buffers: pad so that every block read stays inside the buffer
        k = jnp.pad(k, ((0, 0), (0, bk - n), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, bk - n), (0, 0)))
        pos = jnp.pad(pos, ((0, 0), (0, bk - n)), constant_values=-1)
        n = bk
    ns, nbs = cm.split_plan(cm.cdiv(max_len, bk), num_splits, b, hkv, plat)
    tq = q.shape[2]
    gp = cm.gpu_heads(g, plat)
    bq = _flash.decode_block_q(tq, gp, plat)
    q5, qpos4 = _flash.prepare_queries(q, q_pos, hkv, bq, gp)
    _, _, _, tqp, d = q5.shape
    nq = tqp // bq
    rows = gp * bq
    starts = jnp.clip(starts.astype(jnp.int32), 0, n)
    lens = jnp.clip(lengths.astype(jnp.int32), 0, n - starts)
    update = functools.partial(_update, sm_scale=scale, softcap=float(logit_softcap), window=int(window))
    split = nbs * bk
    if weight_slot is None:
        wslot = jnp.full((b, hkv), -1, jnp.int32)
        wlog = jnp.zeros((b, hkv), jnp.float32)
    else:
        wslot, wlog = weight_slot.astype(jnp.int32), log_weight.astype(jnp.float32)

    def kernel(start_ref, len_ref, ws_ref, wl_ref, q_ref, qp_ref, pos_ref, k_ref, v_ref, m_ref, l_ref, acc_ref):
        s_ = pl.program_id(3)
        seg0 = start_ref[0]
        length = len_ref[0]
        ws = ws_ref[0]
        wl = wl_ref[0]
        first = s_ * split
        n_blk = jnp.clip(cm.cdiv_nonneg(length - first, bk), 0, nbs)
        qv = q_ref[...].reshape(rows, d)
        qp = qp_ref[...].reshape(rows, 1)

        def body(jj, carry):
            begin = seg0 + first + jj * bk  # flat slot of the block's first token
            at = jnp.minimum(begin, n - bk)  # read window inside the buffer
            slot = at + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            ok = (slot >= begin) & (slot < seg0 + length)
            kp = pos_ref[:, pl.ds(at, bk)]
            kb = k_ref[pl.ds(at, bk), :].astype(q_ref.dtype)
            vb = v_ref[pl.ds(at, bk), :].astype(q_ref.dtype)
            bias = jnp.where(slot == ws, wl, 0.0)
            return update(carry, qv, kb, vb, qp, kp, ok, bias)

        carry = lax.fori_loop(0, n_blk, body, cm.init_carry(rows, dv))
        m_ref[...] = carry[0].reshape(m_ref.shape)
        l_ref[...] = carry[1].reshape(l_ref.shape)
        acc_ref[...] = carry[2].reshape(acc_ref.shape)

    out_map = lambda b_, h_, qi, s_: (b_, h_, s_, 0, qi, 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, None, 1), lambda b_, h_, qi, s_: (b_, h_, 0)),
        pl.BlockSpec((None, None, 1), lambda b_, h_, qi, s_: (b_, h_, 0)),
        pl.BlockSpec((None, None, 1), lambda b_, h_, qi, s_: (b_, h_, 0)),
        pl.BlockSpec((None, None, 1), lambda b_, h_, qi, s_: (b_, h_, 0)),
        pl.BlockSpec((None, None, gp, bq, d), lambda b_, h_, qi, s_: (b_, h_, 0, qi, 0)),
        pl.BlockSpec((None, gp, bq, 1), lambda b_, h_, qi, s_: (b_, 0, qi, 0)),
        pl.BlockSpec((None, 1, n), lambda b_, h_, qi, s_: (b_, 0, 0)),
        pl.BlockSpec((None, n, d), lambda b_, h_, qi, s_: (b_, 0, 0)),
        pl.BlockSpec((None, n, dv), lambda b_, h_, qi, s_: (b_, 0, 0)),
    ]
    out_specs = [pl.BlockSpec((None, None, None, gp, bq, 1), out_map),
                 pl.BlockSpec((None, None, None, gp, bq, 1), out_map),
                 pl.BlockSpec((None, None, None, gp, bq, dv), out_map)]
    out_shape = [jax.ShapeDtypeStruct((b, hkv, ns, gp, tqp, 1), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, ns, gp, tqp, 1), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, ns, gp, tqp, dv), jnp.float32)]
    call = pl.pallas_call(kernel, grid=(b, hkv, nq, ns), in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interp,
                          compiler_params=cm.compiler_params(plat, "loop", 4, 0))
    m, l, acc = call(starts.reshape(b, hkv, 1), lens.reshape(b, hkv, 1), wslot.reshape(b, hkv, 1),
                     wlog.reshape(b, hkv, 1), q5, qpos4,
                     pos.astype(jnp.int32).reshape(b, 1, n), k, v)
    out = cm.combine_splits(m, l, acc, axis=2)[:, :, :g, :tq]
    return out.reshape(b, hkv * g, tq, dv).astype(q.dtype)

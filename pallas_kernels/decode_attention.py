"""Split-KV (flash-decoding) GQA attention of a few query tokens over the dense KV cache.

Grid ``(B, Hkv, query blocks, splits[, KV blocks])``: all ``G = Hq / Hkv`` query heads of a KV head (times the
``Tq`` query tokens) form the rows of one program, so every KV block is read once per KV head. Each split runs an
online softmax over its KV blocks and writes partial ``(m, l, acc)``; a small jnp reduction merges the splits with
the log-sum-exp trick. Per-head ``lengths`` make blocks past a head's length free (neither read nor computed), which
is what keeps evicted caches with per-head budgets cheap.

Visibility of key slot ``c`` for query ``t``: ``pos >= 0``, ``c < lengths``, ``pos <= q_pos[t]``, ``q_pos[t] >= 0``
and, with a window, ``q_pos[t] - pos < window``. Rows with no visible key output zeros.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common as cm
from pallas_kernels import _flash

_STATIC = ("sm_scale", "window", "logit_softcap", "block_k", "num_splits", "interpret", "strategy", "backend")


def check_dense_cache(q, k, v, pos):
    """Validates a dense cache layer against ``q``; returns ``(B, Hkv, C, Dv)``."""
    cm.check_rank("k", k, 4, "(B, Hkv, C, D)")
    cm.check_rank("v", v, 4, "(B, Hkv, C, Dv)")
    cm.check_rank("pos", pos, 3, "(B, Hkv, C)")
    cm.check_float("k", k)
    cm.check_float("v", v)
    cm.check_int("pos", pos)
    b, hkv, c, d = k.shape
    if v.shape[:3] != (b, hkv, c):
        raise ValueError(f"v {v.shape} does not match k {k.shape} in (B, Hkv, C)")
    if pos.shape != (b, hkv, c):
        raise ValueError(f"pos must have shape (B, Hkv, C) = {(b, hkv, c)}, got {pos.shape}")
    if getattr(q, "ndim", None) == 4 and q.shape[3] != d:
        raise ValueError(f"q head_dim {q.shape[3]} does not match k head_dim {d}")
    if k.dtype != v.dtype:
        raise TypeError(f"k and v must share a dtype, got k {k.dtype}, v {v.dtype}")
    if c == 0:
        raise ValueError("the cache capacity C must be positive")
    return b, hkv, c, v.shape[3]


@functools.partial(jax.jit, static_argnames=_STATIC)
def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array, q_pos: jax.Array, *,
                     lengths: jax.Array | None = None, sm_scale: float | None = None, window: int = 0,
                     logit_softcap: float = 0.0, block_k: int | None = None, num_splits: int | None = None,
                     interpret: bool | None = None, strategy: str | None = None,
                     backend: str | None = None) -> jax.Array:
    """GQA decode attention over a dense cache layer.

    Args:
      q: ``(B, Hq, Tq, D)`` queries (Tq small, e.g. 1-8), ``Hq = G * Hkv``.
      k, v: ``(B, Hkv, C, D)`` / ``(B, Hkv, C, Dv)`` cache (one float dtype; blocks are cast to ``q.dtype`` in
        the kernel, which is exact when upcasting, e.g. a bf16 cache with f32 queries).
      pos: ``(B, Hkv, C)`` int32 original position of every slot (-1 = empty).
      q_pos: ``(B, Tq)`` int32 query positions (-1 = padding query → zeros).
      lengths: optional ``(B, Hkv)`` int32 number of leading slots that may hold data; later slots are never read.
      sm_scale: logit scale (default ``D ** -0.5``); window: sliding window (0 = global);
      logit_softcap: tanh soft-capping of the logits (0 = off).
      block_k: KV block size (default 512 on TPU, 128 on GPU / interpret); num_splits: KV splits (default: enough
        programs to fill the device); interpret: ``None`` → interpret mode on CPU (``True``, or interpreter
        parameters such as ``pltpu.InterpretParams()``); strategy: ``"pipeline"`` (TPU, interpret) or ``"loop"``
        (GPU), see :mod:`pallas_kernels._common`; backend: ``"tpu"`` / ``"gpu"`` to lower for a platform other
        than ``jax.default_backend()`` (e.g. ``jax.export`` on a CPU host). All keyword options are static (Python
        values).

    Returns ``(B, Hq, Tq, Dv)`` in ``q.dtype``.
    """
    b, hkv, c, dv = check_dense_cache(q, k, v, pos)
    g, scale = cm.check_common(q, q_pos, b=b, hkv=hkv, lengths=lengths, sm_scale=sm_scale, window=window,
                               logit_softcap=logit_softcap)
    interp = cm.resolve_interpret(interpret)
    plat = cm.platform(interp, backend)
    strat = cm.resolve_strategy(strategy, plat)
    cm.check_head_dims(plat, head_dim=q.shape[3], v_head_dim=dv)
    bk = cm.choose_block_k(block_k, c, plat)
    ns, nbs = cm.split_plan(cm.cdiv(c, bk), num_splits, b, hkv, plat)
    tq = q.shape[2]
    gp = cm.gpu_heads(g, plat)
    bq = _flash.decode_block_q(tq, gp, plat)
    q5, qpos4 = _flash.prepare_queries(q, q_pos, hkv, bq, gp)
    lens = _flash.resolve_lengths(lengths, b, hkv, c)
    m, l, acc = _flash.flash_partials(
        q5, qpos4, pos.astype(jnp.int32), lens, [(k, 1), (v, 1)], _flash.cast_kv(q.dtype),
        block_k=bk, block_q=bq, num_splits=ns, blocks_per_split=nbs, dv=dv, sm_scale=scale,
        softcap=float(logit_softcap), window=int(window), plat=plat, strategy=strat, interpret=interp)
    out = cm.combine_splits(m, l, acc, axis=2)[:, :, :g, :tq]  # (B, Hkv, G, Tq, Dv)
    return out.reshape(b, hkv * g, tq, dv).astype(q.dtype)

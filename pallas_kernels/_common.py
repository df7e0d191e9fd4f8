"""Shared helpers of the kvjax Pallas kernels: backend selection, validation, the online-softmax block update.

Two execution strategies share the same in-kernel math (:func:`online_softmax_update`):

* ``"pipeline"`` (TPU, and the default in interpret mode): the KV blocks are a grid axis (innermost, sequential);
  BlockSpecs stream one ``(block_k, D)`` block per step, per-head ``lengths`` are scalar-prefetched and the KV
  index maps clamp to the last valid block, so blocks past a head's length are neither fetched (the pipeline skips a
  copy whose block index did not change) nor computed (``pl.when``). Accumulators live in the output blocks, which
  stay resident across the sequential axis.
* ``"loop"`` (GPU / Triton): the grid covers ``(B, Hkv, q-blocks, splits)``; each program receives its whole split
  as a block and runs a ``fori_loop`` over ``block_k`` sub-blocks whose trip count comes from ``lengths`` (on GPU,
  loads are issued inside the loop, so blocks past the length are never read).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
STRATEGIES = ("pipeline", "loop")


def resolve_interpret(interpret):
    """``None`` → interpret mode exactly when the default backend is the CPU. Interpreter parameter objects (e.g.
    ``pltpu.InterpretParams()``, which simulates TPU memory spaces and DMAs) are passed through to ``pallas_call``."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    if isinstance(interpret, (bool, int, np.bool_)):
        return bool(interpret)
    return interpret


def platform(interpret: bool, backend: str | None = None) -> str:
    """``'interpret'``, ``'tpu'`` or ``'gpu'``. ``backend`` overrides ``jax.default_backend()`` (e.g. to lower for
    a TPU / GPU with ``jax.export`` on another machine)."""
    if interpret is not False:
        return "interpret"
    backend = jax.default_backend() if backend is None else backend
    if backend == "tpu":
        return "tpu"
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu"
    raise RuntimeError(f"Pallas kernels need a TPU or GPU backend (got {backend!r}); pass interpret=True on CPU")


def resolve_strategy(strategy: str | None, plat: str) -> str:
    if strategy is None:
        return "loop" if plat == "gpu" else "pipeline"
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "pipeline" and plat == "gpu":
        raise ValueError("the 'pipeline' strategy needs scalar prefetch (TPU or interpret mode); use 'loop' on GPU")
    return strategy


def default_block_k(plat: str) -> int:
    return {"tpu": 512, "gpu": 128}.get(plat, 128)


def compiler_params(plat: str, strategy: str, n_parallel: int, n_sequential: int):
    """Backend compiler parameters (``None`` in interpret mode)."""
    if plat == "tpu":
        from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

        return pltpu.CompilerParams(
            dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_sequential)
    if plat == "gpu":
        from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415

        return pltriton.CompilerParams(num_warps=4, num_stages=2)
    return None


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a, b):
    """Ceiling division of Python ints."""
    return -(-a // b)


def cdiv_nonneg(a, b: int):
    """In-kernel ceiling division of a traced int32 by a positive constant, truncating (``lax.div``): exact for
    ``a >= 0``, ``<= 0`` for ``a <= 0``. (jnp's floor division lowers through ``sign``, which Mosaic TPU can only
    lower when it knows the device kind.)"""
    return lax.div(a + (b - 1), jnp.int32(b))


def dot_nt(a, b):
    """``a (M, K) @ b (N, K)^T`` with f32 accumulation (exact f32 for f32 inputs)."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=prec)


def dot_nn(a, b):
    """``a (M, K) @ b (K, N)`` with f32 accumulation."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=prec)


def visible_mask(qp, kp, slot_ok, window: int):
    """``qp (R, 1)``, ``kp (1, N)``, ``slot_ok (1, N)`` → ``(R, N)`` visibility."""
    mask = slot_ok & (kp >= 0) & (kp <= qp) & (qp >= 0)
    if window:
        mask = mask & ((qp - kp) < window)
    return mask


def masked_scores(q, k, qp, kp, slot_ok, *, sm_scale: float, softcap: float, window: int):
    """f32 logits ``(R, N)`` (masked entries = ``MASK_VALUE``) and the visibility mask."""
    s = dot_nt(q, k) * sm_scale
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    mask = visible_mask(qp, kp, slot_ok, window)
    return jnp.where(mask, s, MASK_VALUE), mask


def online_softmax_update(carry, q, k, v, qp, kp, slot_ok, *, sm_scale: float, softcap: float, window: int):
    """One flash-attention step. ``carry = (m (R,1), l (R,1), acc (R,Dv))`` f32; ``k (N, D)``, ``v (N, Dv)``.

    Masked keys get probability exactly 0 and non-finite values of ``v`` are zeroed (so NaN/Inf garbage in empty
    slots cannot leak through ``0 * NaN``).
    """
    m_prev, l_prev, acc_prev = carry
    s, mask = masked_scores(q, k, qp, kp, slot_ok, sm_scale=sm_scale, softcap=softcap, window=window)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    finite = jnp.isfinite(v if v.dtype == jnp.float32 else v.astype(jnp.float32))  # (TPU: no bf16 isfinite)
    v = jnp.where(finite, v, jnp.zeros_like(v))
    acc_new = alpha * acc_prev + dot_nn(p.astype(v.dtype), v)
    return m_new, l_new, acc_new


def init_carry(rows: int, dv: int):
    return (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, dv), jnp.float32))


def combine_splits(m, l, acc, axis: int):
    """Log-sum-exp merge of split partials along ``axis`` (``m``/``l`` end in 1, ``acc`` in ``Dv``)."""
    m_max = jnp.max(m, axis=axis, keepdims=True)
    w = jnp.exp(m - m_max)
    l_tot = jnp.sum(w * l, axis=axis)
    acc_tot = jnp.sum(w * acc, axis=axis)
    return jnp.where(l_tot > 0, acc_tot / jnp.where(l_tot > 0, l_tot, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------------------------
# validation helpers


def check_rank(name: str, x, ndim: int, layout: str):
    if getattr(x, "ndim", None) != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} axes), got {getattr(x, 'shape', type(x))}")


def check_int(name: str, x):
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array (int32 positions), got {x.dtype}")


def check_float(name: str, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array, got {x.dtype}")


def check_common(q, q_pos, *, b: int, hkv: int, lengths, sm_scale, window, logit_softcap):
    """Validates queries, positions, lengths and scalar options; returns ``(G, sm_scale)``."""
    check_rank("q", q, 4, "(B, Hq, Tq, D)")
    check_float("q", q)
    bq, hq, tq, d = q.shape
    if bq != b:
        raise ValueError(f"q batch {bq} does not match the cache batch {b}")
    if hkv <= 0 or hq % hkv:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of KV heads ({hkv})")
    check_rank("q_pos", q_pos, 2, "(B, Tq)")
    check_int("q_pos", q_pos)
    if q_pos.shape != (b, tq):
        raise ValueError(f"q_pos must have shape (B, Tq) = {(b, tq)}, got {q_pos.shape}")
    if lengths is not None:
        check_rank("lengths", lengths, 2, "(B, Hkv)")
        check_int("lengths", lengths)
        if lengths.shape != (b, hkv):
            raise ValueError(f"lengths must have shape (B, Hkv) = {(b, hkv)}, got {lengths.shape}")
    if int(window) < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if float(logit_softcap) < 0:
        raise ValueError(f"logit_softcap must be >= 0 (0 = off), got {logit_softcap}")
    scale = d ** -0.5 if sm_scale is None else float(sm_scale)
    return hq // hkv, scale


def split_plan(n_blocks: int, num_splits: int | None, b: int, hkv: int, plat: str) -> tuple[int, int]:
    """``(splits, blocks_per_split)`` with every split owning at least one block."""
    if num_splits is None:
        if plat == "tpu":
            target = 2  # megacore: the grid is sequential per core; splits only help when B * Hkv is tiny
        else:
            target = 264  # ~2 waves of H100 SMs
        num_splits = max(1, min(n_blocks, math.ceil(target / max(1, b * hkv))))
        if plat == "interpret":
            num_splits = min(num_splits, 4)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    num_splits = min(num_splits, n_blocks)
    per = cdiv(n_blocks, num_splits)
    if plat == "gpu":
        per = next_pow2(per)  # Triton blocks must have power-of-two shapes
    return cdiv(n_blocks, per), per


def gpu_heads(g: int, plat: str) -> int:
    """Query heads per KV head as processed: padded to a power of two on GPU (Triton array shapes)."""
    return next_pow2(g) if plat == "gpu" else g


def check_head_dims(plat: str, **dims: int):
    if plat == "gpu":
        for name, n in dims.items():
            if n != next_pow2(n):
                raise ValueError(f"{name}={n}: the GPU (Triton) kernels need power-of-two head dims")


def choose_block_k(block_k: int | None, c: int, plat: str, multiple: int = 1, tpu_multiple: int = 128) -> int:
    """KV block size: ``block_k`` (default per backend), capped at the capacity ``c``.

    ``multiple``: required divisor everywhere (the key quantization group); ``tpu_multiple``: required divisor on
    TPU (128 lanes for the position block; the quantized kernel adds its scale blocks' sublane tiling).
    """
    if plat == "tpu":
        multiple = math.lcm(multiple, tpu_multiple)
    bk = default_block_k(plat) if block_k is None else int(block_k)
    if bk <= 0:
        raise ValueError(f"block_k must be positive, got {block_k}")
    if block_k is None and multiple > 1:
        bk = max(multiple, bk // multiple * multiple)
    if bk >= c:
        return next_pow2(c) if plat == "gpu" else c  # Triton: power-of-two blocks (the tail is masked)
    if plat == "gpu" and bk != next_pow2(bk):
        raise ValueError(f"block_k={bk} must be a power of two on GPU (Triton)")
    if bk % multiple:
        raise ValueError(f"block_k={bk} must be a multiple of {multiple} (the key quantization group"
                         f"{' and the TPU tiling' if plat == 'tpu' else ''})")
    if bk % 8:
        raise ValueError(f"block_k={bk} must be a multiple of 8 (or >= the capacity {c})")
    return bk


class PrefillOutput(NamedTuple):
    """Result of :func:`pallas_kernels.prefill_attention_with_scores`.

    ``out`` ``(B, Hq, Tq, Dv)`` in ``q.dtype``; ``colsum`` ``(B, Hq, C)`` f32: softmax probability of every key slot
    summed over the chunk's queries; ``obs_probs`` ``(B, Hq, W, C)`` f32: probabilities of the last ``W`` queries
    (``None`` when ``obs_window == 0``).
    """

    out: jax.Array
    colsum: jax.Array
    obs_probs: jax.Array | None

"""Quantization helpers shared by the quantized cache classes (on top of :mod:`kvjax.quant.packing`).

:mod:`kvjax.quant.packing` holds the storage format (bit packing, asymmetric min/max quantization per token or per
channel group). This module adds what the caches need around it:

* :func:`quantize` / :func:`dequantize` dispatch on the granularity (``axis="token"``: groups of channels of one
  token; ``axis="channel"``: one scale per channel over a group of tokens) and ignore invalid slots (padding,
  outliers kept elsewhere) when computing the min/max;
* :func:`hadamard_matrix` (normalised Sylvester Hadamard, block-diagonal when the dimension is not a power of two);
* :func:`lowrank_power_iteration` (GEAR's low-rank approximation of a quantization residual);
* :func:`topk_outliers` (GEAR's sparse outliers: the largest and the smallest entries of a matrix).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.quant import packing

Array = jax.Array
AXES = ("token", "channel")


def check_bits(bits: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in packing.SUPPORTED_BITS:
        raise ValueError(f"{what} must be one of {packing.SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def check_axis(axis: str) -> str:
    if axis not in AXES:
        raise ValueError(f"quantization axis must be one of {AXES}, got {axis!r}")
    return axis


def resolve_group(group: int, dim: int, bits: int, what: str = "group") -> int:
    """``group`` channels per scale over a ``dim``-wide axis (``0`` = the whole axis); clear error if it cannot work."""
    g = dim if group == 0 else group
    if g <= 0 or dim % g:
        raise ValueError(f"{what} {group} does not divide head_dim {dim}")
    ppb = 8 // bits
    if g % ppb:
        raise ValueError(f"{what} {g} must be a multiple of {ppb} ({bits}-bit codes are packed {ppb} per byte)")
    return g


def masked_group_fill(x: Array, valid: Array, axis: int) -> Array:
    """Replaces entries where ``valid`` is False with the min of the valid entries along ``axis`` (0 if none).

    Quantizing the result gives the same scale/zero as min/max over the valid entries only.
    """
    big = jnp.asarray(jnp.finfo(jnp.float32).max, jnp.float32)
    x32 = x.astype(jnp.float32)
    mn = jnp.min(jnp.where(valid, x32, big), axis=axis, keepdims=True)
    mn = jnp.where(mn == big, 0.0, mn)
    return jnp.where(valid, x32, mn)


def quantize(x: Array, valid: Array | None, *, bits: int, group: int, axis: str, scale_dtype=jnp.float16):
    """Packed codes, scale, zero of ``x`` ``(..., T, D)``.

    ``axis="token"``: every token has ``D // group`` scales (shape ``(..., T, D // group)``); ``axis="channel"``: every
    group of ``group`` tokens has one scale per channel (``(..., T // group, D)``). ``valid`` ``(..., T)`` or
    ``(..., T, D)`` marks the entries that count for the min/max (others are reconstructed arbitrarily).
    """
    if valid is not None:
        if valid.ndim == x.ndim - 1:
            valid = valid[..., None]
        if axis == "channel":
            t, d = x.shape[-2:]
            xg = x.reshape(*x.shape[:-2], t // group, group, d)
            vg = jnp.broadcast_to(valid, x.shape).reshape(xg.shape)
            x = masked_group_fill(xg, vg, axis=-2).reshape(x.shape)
        else:
            d = x.shape[-1]
            xg = x.reshape(*x.shape[:-1], d // group, group)
            vg = jnp.broadcast_to(valid, x.shape).reshape(xg.shape)
            x = masked_group_fill(xg, vg, axis=-1).reshape(x.shape)
    if axis == "channel":
        return packing.quantize_per_channel(x, bits, group, scale_dtype=scale_dtype)
    return packing.quantize_per_token(x, bits, group, scale_dtype=scale_dtype)


def dequantize(codes: Array, scale: Array, zero: Array, *, bits: int, group: int, axis: str, dtype=jnp.float32):
    if axis == "channel":
        return packing.dequantize_per_channel(codes, scale, zero, bits, group, dtype=dtype)
    return packing.dequantize_per_token(codes, scale, zero, bits, group, dtype=dtype)


def scale_rows(n_tokens: int, group: int, axis: str) -> int:
    """Rows of the scale array for ``n_tokens`` tokens."""
    return n_tokens // group if axis == "channel" else n_tokens


@functools.lru_cache(maxsize=None)
def _hadamard_np(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def hadamard_block(dim: int, block: int = 0) -> int:
    """Size of the Hadamard blocks used over ``dim`` channels: ``block`` (a power of two dividing ``dim``) or, with
    ``block=0``, the largest power of two dividing ``dim``."""
    if block:
        if block & (block - 1) or dim % block:
            raise ValueError(f"hadamard block {block} must be a power of two dividing head_dim {dim}")
        return block
    return dim & -dim


def hadamard_matrix(dim: int, block: int = 0) -> np.ndarray:
    """Orthonormal, symmetric ``(dim, dim)`` matrix: block-diagonal normalised Sylvester Hadamard blocks.

    ``H @ H = I`` (it is its own inverse), so ``x @ H`` rotates and ``y @ H`` rotates back.
    """
    b = hadamard_block(dim, block)
    h = _hadamard_np(b)
    out = np.zeros((dim, dim), np.float64)
    for i in range(0, dim, b):
        out[i:i + b, i:i + b] = h
    return out.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _paley(q: int) -> np.ndarray:
    """Paley construction I: a Hadamard matrix of order ``q + 1`` for a prime ``q = 3 (mod 4)``."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in squares else -1 for i in range(1, q)], np.float64)
    jac = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])
    s = np.zeros((q + 1, q + 1))
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    return np.eye(q + 1) + s


def rotation_matrix(n: int) -> np.ndarray:
    """Orthonormal Hadamard rotation ``(n, n)`` over ``n = 2^k * m`` channels, ``m`` in {1, 12, 20} (Sylvester, or
    Paley-I of order 12/20 Kronecker Sylvester, as QuaRot-style code builds non-power-of-two sizes). ``x @ R``
    rotates, ``y @ R.T`` rotates back. Clear error for other sizes."""
    for m, q in ((1, 0), (12, 11), (20, 19)):
        if n % m == 0 and (n // m) & (n // m - 1) == 0:
            base = np.ones((1, 1)) if m == 1 else _paley(q)
            h = np.kron(base / math.sqrt(m), _hadamard_np(n // m))
            if not np.allclose(h @ h.T, np.eye(n), atol=1e-9):  # the construction is exact; guard anyway
                raise AssertionError(f"rotation of size {n} is not orthonormal")
            return h.astype(np.float32)
    raise ValueError(f"no Hadamard rotation of size {n}: need 2^k, 12 * 2^k or 20 * 2^k channels")


def lowrank_power_iteration(e: Array, rank: int, iters: int = 3) -> tuple[Array, Array]:
    """Rank-``rank`` approximation ``e ≈ a @ b`` of matrices ``e`` ``(..., L, D)`` by subspace (power) iteration.

    Returns ``a`` ``(..., L, r)`` (orthonormal columns) and ``b = a^T e`` ``(..., r, D)`` — the best approximation
    within the found subspace. Deterministic start (a fixed Gaussian matrix), so results are reproducible.
    """
    e = e.astype(jnp.float32)
    d = e.shape[-1]
    p0 = jax.random.normal(jax.random.PRNGKey(0), (d, rank), jnp.float32)
    p = jnp.broadcast_to(p0, e.shape[:-2] + (d, rank))
    q = None
    for _ in range(max(iters, 1)):
        q, _ = jnp.linalg.qr(e @ p)
        p = jnp.swapaxes(e, -1, -2) @ q
    return q, jnp.swapaxes(p, -1, -2)


def topk_outliers(x: Array, valid: Array, k_each: int) -> tuple[Array, Array]:
    """The ``k_each`` largest and ``k_each`` smallest valid entries of each matrix ``x`` ``(..., L, D)``.

    Returns flat indices ``(..., 2 * k_each)`` into ``L * D`` (int32) and their values (float32). When a matrix has
    fewer valid entries, some returned indices point at invalid entries (their value is the entry itself, harmless).
    """
    flat = x.astype(jnp.float32).reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
    ok = jnp.broadcast_to(valid if valid.ndim == x.ndim else valid[..., None], x.shape).reshape(flat.shape)
    inf = jnp.float32(jnp.inf)
    _, top = jax.lax.top_k(jnp.where(ok, flat, -inf), k_each)
    _, bot = jax.lax.top_k(jnp.where(ok, -flat, -inf), k_each)  # may repeat a top index in tiny matrices: harmless
    idx = jnp.concatenate([top, bot], axis=-1).astype(jnp.int32)
    return idx, jnp.take_along_axis(flat, idx, axis=-1)


def index_dtype(n: int):
    """Smallest unsigned/int dtype able to hold flat indices ``< n``."""
    if n <= 256:
        return jnp.uint8
    if n <= 65536:
        return jnp.uint16
    return jnp.int32


__all__ = ["AXES", "check_axis", "check_bits", "dequantize", "hadamard_block", "hadamard_matrix", "index_dtype",
           "lowrank_power_iteration", "masked_group_fill", "quantize", "resolve_group", "scale_rows",
           "topk_outliers"]

"""Bit packing and KIVI-style asymmetric quantization of KV caches (plain jnp).

Packing (the layout the Pallas kernels read): codes are ``uint8`` values ``< 2**bits`` along the LAST axis. For 2 and
4 bits, ``8 // bits`` consecutive codes go into one ``uint8``; code ``j`` of a byte sits at bit offset
``(j % (8 // bits)) * bits`` (little-endian within the byte). 8 bits is plain ``uint8``.

Quantization is asymmetric min/max: ``zero = min``, ``scale = (max - min) / (2**bits - 1)``,
``codes = clip(round((x - zero) / scale), 0, 2**bits - 1)``, dequantized as ``codes * scale + zero``. A group whose
values are all equal has ``scale = 0`` (its codes are 0 and it dequantizes exactly to ``zero``).

* :func:`quantize_per_token`: groups of ``group`` consecutive channels (last axis); every token has its own
  scale/zero: shape ``(..., T, D // group)`` (KIVI's value cache).
* :func:`quantize_per_channel`: groups of ``group`` consecutive tokens (axis -2) share a scale/zero per channel:
  shape ``(..., T // group, D)`` (KIVI's key cache).

Both return ``(packed_codes, scale, zero)``; ``packed_codes`` has shape ``(..., T, D * bits // 8)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

SUPPORTED_BITS = (2, 4, 8)


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def codes_per_byte(bits: int) -> int:
    """Number of codes stored in one ``uint8``."""
    return 8 // check_bits(bits)


def packed_dim(dim: int, bits: int) -> int:
    """Length of the packed last axis for ``dim`` codes."""
    ppb = codes_per_byte(bits)
    if dim % ppb:
        raise ValueError(f"the packed axis ({dim}) must be a multiple of {ppb} for {bits}-bit packing")
    return dim // ppb


def pack(codes: Array, bits: int) -> Array:
    """Packs ``uint8`` codes ``(..., D)`` (values ``< 2**bits``) into ``(..., D * bits // 8)`` bytes."""
    ppb = codes_per_byte(bits)
    codes = jnp.asarray(codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"codes must be an integer array, got {codes.dtype}")
    if codes.ndim == 0:
        raise ValueError("codes must have at least one axis")
    d = codes.shape[-1]
    packed_dim(d, bits)
    codes = codes.astype(jnp.uint8)
    if ppb == 1:
        return codes
    c = codes.reshape(*codes.shape[:-1], d // ppb, ppb).astype(jnp.uint32)
    c = c & jnp.uint32((1 << bits) - 1)
    shifts = (jnp.arange(ppb, dtype=jnp.uint32) * bits).astype(jnp.uint32)
    return jnp.sum(c << shifts, axis=-1).astype(jnp.uint8)


def unpack(packed: Array, bits: int, dim: int) -> Array:
    """Inverse of :func:`pack`: ``(..., dim * bits // 8)`` bytes → ``(..., dim)`` ``uint8`` codes."""
    ppb = codes_per_byte(bits)
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_dim(dim, bits):
        raise ValueError(f"packed last axis is {packed.shape[-1]}, expected {dim} * {bits} / 8 = {dim * bits // 8}")
    if ppb == 1:
        return packed
    shifts = jnp.arange(ppb, dtype=jnp.uint8) * jnp.uint8(bits)
    planes = (packed[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
    return planes.reshape(*packed.shape[:-1], dim)


def _minmax_codes(x: Array, axis: int, bits: int, scale_dtype):
    x32 = x.astype(jnp.float32)
    mn = jnp.min(x32, axis=axis, keepdims=True)
    mx = jnp.max(x32, axis=axis, keepdims=True)
    qmax = float((1 << bits) - 1)
    scale = ((mx - mn) / qmax).astype(scale_dtype)
    zero = mn.astype(scale_dtype)
    s32, z32 = scale.astype(jnp.float32), zero.astype(jnp.float32)  # codes against the stored (rounded) values
    safe = jnp.where(s32 > 0, s32, 1.0)
    codes = jnp.clip(jnp.round((x32 - z32) / safe), 0, qmax)
    codes = jnp.where(s32 > 0, codes, 0.0).astype(jnp.uint8)
    return codes, jnp.squeeze(scale, axis), jnp.squeeze(zero, axis)


def _check_float(x: Array, min_ndim: int) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a float array, got {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"x must have at least {min_ndim} axes (..., T, D), got shape {x.shape}")
    return x


def quantize_per_token(x: Array, bits: int, group: int, *, scale_dtype=jnp.float32) -> tuple[Array, Array, Array]:
    """Per-token quantization over groups of ``group`` channels: ``x (..., T, D)`` → ``(packed, scale, zero)``.

    ``packed`` ``(..., T, D * bits // 8)`` uint8, ``scale``/``zero`` ``(..., T, D // group)`` in ``scale_dtype``.
    """
    check_bits(bits)
    x = _check_float(x, 1)
    d = x.shape[-1]
    if group <= 0 or d % group:
        raise ValueError(f"channel axis {d} must be divisible by the quantization group {group}")
    packed_dim(d, bits)
    xg = x.reshape(*x.shape[:-1], d // group, group)
    codes, scale, zero = _minmax_codes(xg, -1, bits, scale_dtype)
    return pack(codes.reshape(x.shape), bits), scale, zero


def dequantize_per_token(packed: Array, scale: Array, zero: Array, bits: int, group: int | None = None,
                         dtype=jnp.float32) -> Array:
    """Inverse of :func:`quantize_per_token` → ``(..., T, D)`` in ``dtype`` (computed in f32)."""
    check_bits(bits)
    d = packed.shape[-1] * 8 // bits
    ng = scale.shape[-1]
    if group is None:
        if ng == 0 or d % ng:
            raise ValueError(f"cannot infer the group: D={d}, {ng} scale groups")
        group = d // ng
    if group <= 0 or d % group or d // group != ng:
        raise ValueError(f"D={d} with group {group} needs {d // max(group, 1)} scale groups, got {ng}")
    if scale.shape != zero.shape or scale.shape[:-1] != packed.shape[:-1]:
        raise ValueError(f"scale {scale.shape} / zero {zero.shape} do not match packed codes {packed.shape}")
    codes = unpack(packed, bits, d).astype(jnp.float32).reshape(*packed.shape[:-1], ng, group)
    x = codes * scale.astype(jnp.float32)[..., None] + zero.astype(jnp.float32)[..., None]
    return x.reshape(*packed.shape[:-1], d).astype(dtype)


def quantize_per_channel(x: Array, bits: int, group: int, *, scale_dtype=jnp.float32) -> tuple[Array, Array, Array]:
    """Per-channel quantization over groups of ``group`` tokens: ``x (..., T, D)`` → ``(packed, scale, zero)``.

    ``packed`` ``(..., T, D * bits // 8)`` uint8, ``scale``/``zero`` ``(..., T // group, D)`` in ``scale_dtype``.
    """
    check_bits(bits)
    x = _check_float(x, 2)
    t, d = x.shape[-2:]
    if group <= 0 or t % group:
        raise ValueError(f"token axis {t} must be divisible by the quantization group {group}")
    packed_dim(d, bits)
    xg = x.reshape(*x.shape[:-2], t // group, group, d)
    codes, scale, zero = _minmax_codes(xg, -2, bits, scale_dtype)
    return pack(codes.reshape(x.shape), bits), scale, zero


def dequantize_per_channel(packed: Array, scale: Array, zero: Array, bits: int, group: int | None = None,
                           dtype=jnp.float32) -> Array:
    """Inverse of :func:`quantize_per_channel` → ``(..., T, D)`` in ``dtype`` (computed in f32)."""
    check_bits(bits)
    t = packed.shape[-2]
    d = packed.shape[-1] * 8 // bits
    ng = scale.shape[-2]
    if group is None:
        if ng == 0 or t % ng:
            raise ValueError(f"cannot infer the group: T={t}, {ng} scale groups")
        group = t // ng
    if group <= 0 or t % group or t // group != ng:
        raise ValueError(f"T={t} with group {group} needs {t // max(group, 1)} scale groups, got {ng}")
    if scale.shape != zero.shape or scale.shape[-1] != d or scale.shape[:-2] != packed.shape[:-2]:
        raise ValueError(f"scale {scale.shape} / zero {zero.shape} do not match packed codes {packed.shape} (D={d})")
    codes = unpack(packed, bits, d).astype(jnp.float32).reshape(*packed.shape[:-2], ng, group, d)
    x = codes * scale.astype(jnp.float32)[..., None, :] + zero.astype(jnp.float32)[..., None, :]
    return x.reshape(*packed.shape[:-2], t, d).astype(dtype)


__all__ = ["SUPPORTED_BITS", "check_bits", "codes_per_byte", "dequantize_per_channel", "dequantize_per_token",
           "pack", "packed_dim", "quantize_per_channel", "quantize_per_token", "unpack"]

"""Rotary position embeddings (RoPE) with the HF scaling types: default, linear, dynamic NTK and llama3."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling(),
                    max_position_embeddings: int = 0) -> np.ndarray:
    """Inverse frequencies ``(head_dim // 2,)`` for the static scaling types (default, linear, llama3).

    ``dynamic`` depends on the sequence length and is handled by :func:`dynamic_inv_frequencies`.
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    t = scaling.rope_type
    if t == "linear":
        inv = inv / scaling.factor
    elif t == "llama3":
        old = scaling.original_max_position_embeddings or max_position_embeddings
        low_wl = old / scaling.low_freq_factor
        high_wl = old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / scaling.factor, inv)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def dynamic_inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling, max_position_embeddings: int,
                            seq_len: jax.Array) -> jax.Array:
    """Dynamic-NTK frequencies for a call whose largest position is ``seq_len - 1`` (as HF computes them).

    Like HF, keys already in the cache keep the frequencies they were rotated with.
    """
    base = jnp.where(
        seq_len > max_position_embeddings,
        theta * ((scaling.factor * seq_len / max_position_embeddings) - (scaling.factor - 1)) ** (head_dim / (head_dim - 2)),
        theta)
    return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates ``x`` ``(B, T, H, D)`` by ``positions`` ``(B, T)`` (rotate-half convention, as HF Llama)."""
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, D/2)
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def rerotate_keys(k: jax.Array, delta: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Moves post-RoPE keys ``(B, H, C, D)`` by ``delta`` positions ``(B, H, C)`` (RoPE is a rotation: R(a+d)=R(d)R(a)).

    Used by methods that re-assign positions within the cache (StreamingLLM).
    """
    ang = delta[..., None].astype(jnp.float32) * inv_freq
    ang = jnp.concatenate([ang, ang], axis=-1)
    kf = k.astype(jnp.float32)
    return (kf * jnp.cos(ang) + rotate_half(kf) * jnp.sin(ang)).astype(k.dtype)

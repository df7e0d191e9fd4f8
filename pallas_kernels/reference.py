"""Plain-jnp references of the kvjax Pallas kernels (the semantics the kernels are tested against).

They materialise the ``(Tq, C)`` score matrix in f32 and are meant for tests, the benchmarks' baseline and CPU runs.
Masking contract (shared by every kernel): key slot ``c`` of KV head ``h`` is visible to query ``t`` iff
``c < lengths[b, h]`` (when given), ``pos >= 0``, ``q_pos[t] >= 0``, ``pos <= q_pos[t]`` and, with a window,
``q_pos[t] - pos < window``. Logits are ``sm_scale * q.k`` (f32), optionally soft-capped ``cap * tanh(s / cap)``;
softmax in f32; rows with no visible key output zeros. Invisible slots never contribute, whatever they hold (NaN).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kvjax.quant import packing
from pallas_kernels._common import PrefillOutput

_HI = lax.Precision.HIGHEST


def _probs(q, k, pos, q_pos, slot_ok, *, sm_scale, window, logit_softcap, bias=None):
    """``q (B, Hq, Tq, D)``, ``k (B, Hkv, C, D)`` → probabilities ``(B, Hkv, G, Tq, C)`` f32 and visibility."""
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = d ** -0.5 if sm_scale is None else sm_scale
    qg = q.reshape(b, hkv, g, tq, d).astype(jnp.float32)
    s = jnp.einsum("bhgtd,bhcd->bhgtc", qg, k.astype(jnp.float32), precision=_HI) * scale
    if logit_softcap:
        s = logit_softcap * jnp.tanh(s / logit_softcap)
    if bias is not None:  # (B, Hkv, C) log-multiplicity of a slot
        s = s + bias[:, :, None, None, :].astype(jnp.float32)
    qp = q_pos[:, None, None, :, None]
    kp = pos[:, :, None, None, :]
    vis = slot_ok[:, :, None, None, :] & (kp >= 0) & (qp >= 0) & (kp <= qp)
    if window:
        vis &= (qp - kp) < window
    s = jnp.where(vis, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(vis, jnp.exp(s - m), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(den > 0, den, 1.0), vis


def _slot_ok(lengths, b, hkv, c):
    if lengths is None:
        return jnp.ones((b, hkv, c), jnp.bool_)
    return jnp.arange(c, dtype=jnp.int32)[None, None, :] < lengths[:, :, None]


def _attend(q, k, v, pos, q_pos, slot_ok, *, sm_scale, window, logit_softcap, bias=None):
    b, hq, tq, _ = q.shape
    hkv = k.shape[1]
    p, _ = _probs(q, k, pos, q_pos, slot_ok, sm_scale=sm_scale, window=window, logit_softcap=logit_softcap,
                  bias=bias)
    valid = slot_ok & (pos >= 0)
    v32 = jnp.where(valid[..., None], v.astype(jnp.float32), 0.0)  # invisible slots may hold NaN
    out = jnp.einsum("bhgtc,bhcd->bhgtd", p, v32, precision=_HI)
    return out.reshape(b, hq, tq, -1).astype(q.dtype), p


def attention_reference(q, k, v, pos, q_pos, *, lengths=None, sm_scale=None, window: int = 0,
                        logit_softcap: float = 0.0):
    """Masked GQA attention ``(B, Hq, Tq, Dv)`` over a dense cache (any number of queries)."""
    b, hkv, c, _ = k.shape
    out, _ = _attend(q, k, v, pos, q_pos, _slot_ok(lengths, b, hkv, c), sm_scale=sm_scale, window=window,
                     logit_softcap=logit_softcap)
    return out


def decode_attention_reference(q, k, v, pos, q_pos, *, lengths=None, sm_scale=None, window: int = 0,
                               logit_softcap: float = 0.0, **_ignored):
    """Reference of :func:`pallas_kernels.decode_attention` (kernel-only options are ignored)."""
    return attention_reference(q, k, v, pos, q_pos, lengths=lengths, sm_scale=sm_scale, window=window,
                               logit_softcap=logit_softcap)


def prefill_attention_with_scores_reference(q, k, v, pos, q_pos, *, lengths=None, sm_scale=None, window: int = 0,
                                            logit_softcap: float = 0.0, obs_window: int = 0,
                                            **_ignored) -> PrefillOutput:
    """Reference of :func:`pallas_kernels.prefill_attention_with_scores`."""
    b, hq, tq, _ = q.shape
    hkv, c = k.shape[1], k.shape[2]
    out, p = _attend(q, k, v, pos, q_pos, _slot_ok(lengths, b, hkv, c), sm_scale=sm_scale, window=window,
                     logit_softcap=logit_softcap)
    p = p.reshape(b, hq, tq, c)
    colsum = jnp.sum(p, axis=2)
    obs = p[:, :, tq - obs_window:] if obs_window else None
    return PrefillOutput(out, colsum, obs)


def dequantize_cache(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, *, bits: int, v_bits: int | None = None,
                     dtype=jnp.float32):
    """Float ``(k, v)`` of a KIVI cache (keys per-channel, values per-token), computed in f32, cast to ``dtype``."""
    v_bits = bits if v_bits is None else v_bits
    k = packing.dequantize_per_channel(k_codes, k_scale, k_zero, bits, dtype=jnp.float32)
    v = packing.dequantize_per_token(v_codes, v_scale, v_zero, v_bits, dtype=jnp.float32)
    return k.astype(dtype), v.astype(dtype)


def quantized_decode_attention_reference(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos, q_pos, *,
                                         bits: int, v_bits: int | None = None, k_res=None, v_res=None,
                                         res_pos=None, lengths=None, sm_scale=None, window: int = 0,
                                         logit_softcap: float = 0.0, **_ignored):
    """Reference of :func:`pallas_kernels.quantized_decode_attention`: dequantize (f32, then ``q.dtype``), append
    the residual window, attend."""
    k, v = dequantize_cache(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits=bits, v_bits=v_bits,
                            dtype=q.dtype)
    b, hkv, c, _ = k.shape
    ok = _slot_ok(lengths, b, hkv, c)
    if k_res is not None:
        r = k_res.shape[2]
        k = jnp.concatenate([k, k_res.astype(q.dtype)], axis=2)
        v = jnp.concatenate([v, v_res.astype(q.dtype)], axis=2)
        pos = jnp.concatenate([pos, res_pos], axis=2)
        ok = jnp.concatenate([ok, jnp.ones((b, hkv, r), jnp.bool_)], axis=2)
    out, _ = _attend(q, k, v, pos, q_pos, ok, sm_scale=sm_scale, window=window, logit_softcap=logit_softcap)
    return out


def ragged_decode_attention_reference(q, k, v, pos, q_pos, starts, lengths, *, max_len=None, sm_scale=None,
                                      window: int = 0, logit_softcap: float = 0.0, weight_slot=None,
                                      log_weight=None, **_ignored):
    """Reference of :func:`pallas_kernels.ragged_decode_attention`: every KV head attends over the whole flat
    buffer with the slots outside its segment ``[starts, starts + lengths)`` masked (``H`` times the work of the
    kernel, no gather)."""
    b, n, _ = k.shape
    hkv = starts.shape[1]
    slot = jnp.arange(n, dtype=jnp.int32)[None, None, :]
    ok = (slot >= starts[:, :, None]) & (slot < (starts + lengths)[:, :, None])  # (B, Hkv, N)
    kh = jnp.broadcast_to(k[:, None], (b, hkv) + k.shape[1:])
    vh = jnp.broadcast_to(v[:, None], (b, hkv) + v.shape[1:])
    ph = jnp.broadcast_to(pos[:, None], (b, hkv, n))
    bias = None if weight_slot is None else jnp.where(slot == weight_slot[:, :, None], log_weight[:, :, None], 0.0)
    out, _ = _attend(q, kh, vh, ph, q_pos, ok, sm_scale=sm_scale, window=window, logit_softcap=logit_softcap,
                     bias=bias)
    return out


__all__ = ["attention_reference", "decode_attention_reference", "dequantize_cache",
           "prefill_attention_with_scores_reference", "quantized_decode_attention_reference",
           "ragged_decode_attention_reference"]

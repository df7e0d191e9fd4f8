"""MiKV — "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed Precision Quantization",
Yang et al., arXiv 2402.18096.

An eviction policy picks the important tokens; instead of dropping the others, MiKV keeps them in low precision:

* importance: ``scorer="h2o"`` (default) — H2O's accumulated attention, the prefill column sums summed over the query
  heads of a KV head; ``"snapkv"`` — SnapKV's pooled observation-window votes (:meth:`SnapKV.scores`). The
  high-precision set is H2O's: the ``hi_ratio`` share of the prompt's tokens, of which ``recent_ratio`` are the most
  recent tokens and the rest the top scorers.
* high precision (``hi_bits``): 16 = the cache dtype (FP16 in the paper), or per-token int8/int4; stored in a
  :class:`kvjax.quant.cache.KeepBlock`.
* low precision (``lo_bits``, 2 by default; the paper uses INT2-INT4): per-token asymmetric round-to-nearest over
  groups of ``group`` channels (0 = whole head), packed codes.
* outlier-aware channel balancing (``balance=True``, the paper's Section 3.2): per layer, KV head and channel,
  ``b = sqrt(max|q| / max|k|)`` from the prefill (queries of the last ``window`` prompt tokens, all valid keys); keys
  are stored as ``k * b`` (their outlier channels shrink before quantization) and queries use ``q / b``, so
  ``q·k`` is unchanged.

Decoded tokens enter a full-precision recent window of ``residual`` tokens (H2O's recent window) and are flushed to
the low-precision part ``residual`` at a time. Deviation: the importance split is decided once, after prefill (the
paper follows H2O's per-step re-scoring; here generated tokens are not promoted/demoted later). Global layers only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp

from kvjax.attention import Observe
from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.compress.evict import group_to_kv_heads, map_global_layers, recent_mask, select_keep
from kvjax.compress.kivi import convert_obs, room_for
from kvjax.quant import quantizers as qz
from kvjax.quant.cache import QuantSpec, quantize_dense_layer


def compact_rest(valid, idx, keep, max_len: int):
    """Slots that are valid and not in ``idx[keep]``, compacted in slot order: ``(order (B, H, max_len), count)``."""
    b, h, c = valid.shape
    kept = jnp.zeros((b, h, c), jnp.int32)
    kept = kept.at[jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], idx].max(keep.astype(jnp.int32)) > 0
    rest = valid & ~kept
    slot = jnp.arange(c, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(rest, slot, c + slot), axis=-1).astype(jnp.int32)
    return order[..., :max_len], jnp.sum(rest, axis=-1, dtype=jnp.int32)


def channel_balancer(layer, window_q, num_kv_heads: int, eps: float = 1e-6):
    """MiKV's per-channel balancer ``sqrt(max|q| / max|k|)`` ``(B, H, D)`` (1 where undefined)."""
    qmax = group_to_kv_heads(jnp.max(jnp.abs(window_q.astype(jnp.float32)), axis=2), num_kv_heads, "max")
    kmax = jnp.max(jnp.where(layer.valid[..., None], jnp.abs(layer.k.astype(jnp.float32)), 0.0), axis=2)
    ok = (qmax > eps) & (kmax > eps)
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, qmax, 1.0) / jnp.where(ok, kmax, 1.0)), 1.0)


@register
@dataclasses.dataclass(frozen=True)
class MiKV(Method):
    """Importance-aware mixed-precision KV cache (see module docstring)."""

    hi_ratio: float = 0.2
    recent_ratio: float = 0.5
    hi_bits: int = 16
    lo_bits: int = 2
    group: int = 0
    residual: int = 32
    scorer: str = "h2o"
    window: int = 32
    balance: bool = True
    scale_dtype: str = "float16"
    name: ClassVar[str] = "mikv"
    kind: ClassVar[str] = "quantized"

    def __post_init__(self):
        if not 0.0 < self.hi_ratio <= 1.0:
            raise ValueError(f"mikv hi_ratio must be in (0, 1], got {self.hi_ratio}")
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"mikv recent_ratio must be in [0, 1], got {self.recent_ratio}")
        if self.hi_bits != 16:
            qz.check_bits(self.hi_bits, "mikv hi_bits (16 = full precision)")
        qz.check_bits(self.lo_bits, "mikv lo_bits")
        if self.residual < 0:
            raise ValueError(f"mikv residual must be >= 0, got {self.residual}")
        if self.group < 0:
            raise ValueError(f"mikv group must be >= 0 (0 = whole head), got {self.group}")
        if self.scorer not in ("h2o", "snapkv"):
            raise ValueError(f"mikv scorer must be 'h2o' or 'snapkv', got {self.scorer!r}")
        check_positive("window", self.window)

    def observe(self) -> Observe:
        need_window = self.balance or self.scorer == "snapkv"
        return Observe(window=self.window if need_window else 0, colsum=self.scorer == "h2o")

    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.lo_bits, v_bits=self.lo_bits, k_group=self.group, v_group=self.group,
                         k_axis="token", residual=self.residual, scale_dtype=self.scale_dtype)

    def validate(self, ctx: Context) -> None:
        d = ctx.cfg.head_dim
        self.spec().resolve(d, d)
        if self.hi_bits != 16:
            qz.resolve_group(self.group, d, self.hi_bits, "mikv group")

    def budget(self, capacity: int, prompt_len: int) -> tuple[int, int]:
        """High-precision tokens per head and how many of them are the most recent ones."""
        n = min(capacity, prompt_len) if prompt_len else capacity
        n_hi = min(max(1, math.ceil(self.hi_ratio * n)), capacity)
        return n_hi, min(int(round(self.recent_ratio * n_hi)), n_hi)

    def scores(self, layer, o, next_pos):
        h = layer.k.shape[1]
        if self.scorer == "h2o":
            return group_to_kv_heads(o["colsum"], h, "sum")
        from kvjax.compress.snapkv import SnapKV  # noqa: PLC0415

        return SnapKV(budget=self.window + 1, window=self.window).scores(layer, o, next_pos)[0]

    def prefill(self, state, obs, ctx: Context):
        spec = self.spec()

        def one(i, layer, o):
            c = layer.capacity
            n_hi, n_rec = self.budget(c, ctx.prompt_len)
            force = recent_mask(layer, state.next_pos, n_rec)
            idx, keep = select_keep(self.scores(layer, o, state.next_pos), layer.valid, n_hi, force)
            order, count = compact_rest(layer.valid, idx, keep, c - idx.shape[-1])
            bal = channel_balancer(layer, o["window_q"], layer.k.shape[1]) if self.balance else None
            cache, src, ok = quantize_dense_layer(layer, spec, room=room_for(layer, ctx), stream_idx=order,
                                                  stream_n=count, keep_idx=idx, keep_ok=keep, keep_bits=self.hi_bits,
                                                  keep_group=self.group, k_balance=bal)
            return cache, convert_obs(o, src, ok)

        return map_global_layers(state, obs, one)

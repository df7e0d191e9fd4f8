"""MiKV — "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed Precision Quantization",
Yang et al., arXiv 2402.18096.

An eviction policy (H2O) decides which tokens are important; instead of dropping the others, MiKV keeps them in low
precision:

* importance follows H2O at every step: each head keeps a high-precision set of ``n_hi`` tokens — the ``n_recent``
  most recent tokens (H2O's recent window, which slides: every generated token enters it in high precision) plus the
  heavy hitters, the older tokens with the largest accumulated attention. Scores are the prefill column sums
  (``scorer="h2o"``, summed over the query heads of a KV head) and then every decode step's attention is added; after
  each step the high-precision token with the lowest score outside the recent window is demoted to low precision
  (H2O evicts it), so a token that leaves the recent window stays in high precision while its accumulated score beats
  the weakest heavy hitter. ``scorer="snapkv"`` scores the prompt with SnapKV's pooled window votes instead.
* high precision (``hi_bits``): 16 = the cache dtype (FP16 in the paper), or per-token int8/int4; stored in a
  :class:`kvjax.quant.cache.KeepBlock` of ``n_hi + 1`` slots (one free slot receives the next generated token).
* low precision (``lo_bits``, 2 by default; the paper uses INT2-INT4): per-token asymmetric round-to-nearest over
  groups of ``group`` channels, packed codes; demoted tokens are quantized when they are demoted.
* outlier-aware channel balancing (``balance=True``, Section 3.2): per layer, KV head and channel,
  ``b = sqrt(max|q| / max|k|)`` with the maxima over **all** prompt queries and keys (the ``q_absmax`` observation);
  keys are stored as ``k * b`` (their outlier channels shrink before quantization) and queries use ``q / b``, so
  ``q·k`` is unchanged. The balancer is fixed after prefill.

``hi_budget`` (tokens per head, > 0) overrides ``hi_ratio`` (share of the prompt), so that MiKV can be compared with
H2O at the same high-precision budget (``configs/quantization.py`` runs both).
Budgets are per row: each row's high-precision budget and recent window come from its own prompt length (its valid
tokens), so a row left-padded in a batch keeps exactly what it keeps alone.

Remaining deviations: no authors' code is public, so choices the text leaves open are kvjax's: the low-bit group is
32 channels per token (the paper's group size could not be verified; 32 is KIVI's and the common choice — the whole
64-dim head, kvjax's earlier default, is far coarser); with GQA the column sums are summed and the query maxima taken
over the query heads of a KV head; a low-precision token is never promoted back (its full-precision values no longer
exist in a real cache — H2O never re-admits an evicted token either); the decode-time demotion is one token per
generated token (exactly H2O's one eviction per step). Global layers only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import Observe
from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.compress.evict import group_to_kv_heads, map_global_layers, select_keep
from kvjax.compress.kivi import convert_obs, room_for
from kvjax.quant import quantizers as qz
from kvjax.quant.cache import KeepBlock, QuantizedKV, QuantSpec, gather_slots, key_forward, quantize_dense_layer, \
    scatter_slots, value_forward

BIG = 3e30


def compact_rest(valid, idx, keep, max_len: int):
    """Slots that are valid and not in ``idx[keep]``, compacted in slot order: ``(order (B, H, max_len), count)``."""
    b, h, c = valid.shape
    kept = jnp.zeros((b, h, c), jnp.int32)
    kept = kept.at[jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], idx].max(keep.astype(jnp.int32)) > 0
    rest = valid & ~kept
    slot = jnp.arange(c, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(rest, slot, c + slot), axis=-1).astype(jnp.int32)
    return order[..., :max_len], jnp.sum(rest, axis=-1, dtype=jnp.int32)


def channel_balancer(layer, q_absmax, num_kv_heads: int, eps: float = 1e-6):
    """MiKV's per-channel balancer ``sqrt(max|q| / max|k|)`` ``(B, H, D)`` (1 where undefined); ``q_absmax``
    ``(B, Hq, D)`` or ``(B, Hq, W, D)`` queries (the max is then taken over ``W``)."""
    qa = jnp.abs(q_absmax.astype(jnp.float32))
    if qa.ndim == 4:
        qa = jnp.max(qa, axis=2)
    qmax = group_to_kv_heads(qa, num_kv_heads, "max")
    kmax = jnp.max(jnp.where(layer.valid[..., None], jnp.abs(layer.k.astype(jnp.float32)), 0.0), axis=2)
    ok = (qmax > eps) & (kmax > eps)
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, qmax, 1.0) / jnp.where(ok, kmax, 1.0)), 1.0)


# ------------------------------------------------------------------------------------------------- the layer


def _keep_write(keep: KeepBlock, slots, k, v, ok) -> KeepBlock:
    """Writes stored-space ``k``/``v`` ``(B, H, n, D)`` at keep slots ``slots`` ``(B, H, n)`` where ``ok``."""
    s = keep.size
    tgt = jnp.where(ok, slots, s)  # out of range: dropped
    if keep.bits == 16:
        return keep.replace(k=scatter_slots(keep.k, tgt, k), v=scatter_slots(keep.v, tgt, v))
    new = KeepBlock.build(k, v, ok, bits=keep.bits, group=keep.group, scale_dtype=keep.k_scale.dtype)
    return keep.replace(k=scatter_slots(keep.k, tgt, new.k), v=scatter_slots(keep.v, tgt, new.v),
                        k_scale=scatter_slots(keep.k_scale, tgt, new.k_scale),
                        k_zero=scatter_slots(keep.k_zero, tgt, new.k_zero),
                        v_scale=scatter_slots(keep.v_scale, tgt, new.v_scale),
                        v_zero=scatter_slots(keep.v_zero, tgt, new.v_zero))


@struct.dataclass
class MixedPrecisionKV(QuantizedKV):
    """MiKV's layer: a :class:`QuantizedKV` whose keep block is the high-precision set (H2O's heavy hitters + recent
    window, at most ``n_hi`` tokens + one free slot) with per-slot accumulated attention ``hi_score``
    ``(B, H, n_hi + 1)``, and whose per-token low-bit stream (no residual) receives demoted tokens. ``fill`` counts the
    keep block as allocated (``n_hi + 1 + low-precision tokens``); empty keep slots have ``pos = -1``.

    ``n_hi`` is the static size of the keep block (the largest row's budget); each row's own high-precision budget
    ``hi_limit`` and recent window ``n_recent`` ``(B, H)`` come from that row's own prompt length, so a row left-padded
    in a batch keeps exactly what it keeps alone."""

    hi_score: jax.Array | None = None
    hi_limit: jax.Array | None = None
    n_recent: jax.Array | None = None
    n_hi: int = struct.field(pytree_node=False, default=0)

    def hi_pos(self):
        return self.pos[..., :self.n_keep]

    def demote(self, target, k_max: int, newest):
        """Moves the lowest-scoring high-precision tokens outside the recent window (each row's last ``n_recent``
        positions up to ``newest`` ``(B,)``) to low precision until at most ``target`` (int or ``(B, H)``) remain (at
        most ``k_max`` per call, static). The oldest recent tokens go first if the window alone exceeds the target."""
        hp = self.hi_pos()
        valid = hp >= 0
        recent = valid & (hp > newest[:, None, None] - self.n_recent[..., None])
        pri = jnp.where(valid, jnp.where(recent, BIG / 2 + hp.astype(jnp.float32), self.hi_score), BIG)
        k_max = min(k_max, self.n_keep)
        _, low = jax.lax.top_k(-pri, k_max)  # lowest priority first
        used = jnp.sum(valid, axis=-1, dtype=jnp.int32)
        m = jnp.clip(used - target, 0, k_max)
        sel = jnp.arange(k_max, dtype=jnp.int32) < m[..., None]
        kk, vv = self.keep.dequant()
        dk, dv, dp = gather_slots(kk, low), gather_slots(vv, low), jnp.where(sel, gather_slots(hp, low), -1)
        q = self.fill - self.n_keep
        slots = q[..., None] + jnp.arange(k_max, dtype=jnp.int32)
        arrays = (self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero, self.pos)
        kc, ks, kz, vc, vs, vz, p = self._write_quantized(arrays, dk, dv, dp, slots, sel)
        freed = jnp.zeros(hp.shape, bool).at[
            jnp.arange(hp.shape[0])[:, None, None], jnp.arange(hp.shape[1])[None, :, None], low].max(sel)
        p = p.at[..., :self.n_keep].set(jnp.where(freed, -1, p[..., :self.n_keep]))
        return self.replace(k_codes=kc, k_scale=ks, k_zero=kz, v_codes=vc, v_scale=vs, v_zero=vz, pos=p,
                            fill=self.fill + m)

    def append(self, k, v, pos) -> "MixedPrecisionKV":
        """New tokens enter the high-precision set (H2O's recent window); to make room the weakest older tokens are
        demoted first (one decode token always fits: the decode hook leaves one slot free). A chunk longer than a
        row's high-precision set (``hi_limit + 1``) sends its oldest tokens straight to low precision."""
        n = k.shape[2]
        s = self.n_keep
        nk = min(n, s)  # static: at most the newest nk tokens enter high precision
        nk_row = jnp.minimum(n, self.hi_limit + 1)  # (B, H): those of each row
        layer = self.demote(self.hi_limit + 1 - nk_row, nk, jnp.max(pos, axis=1))
        kt = key_forward(k, self.spec, self.k_balance, self.k_perm).astype(jnp.float32)
        vt = value_forward(v, self.spec)
        pos_h = jnp.broadcast_to(pos[:, None, :], kt.shape[:3]).astype(jnp.int32)
        i = jnp.arange(n, dtype=jnp.int32)
        to_hi = i >= (n - nk_row)[..., None]  # (B, H, n)
        if n > 1:  # the oldest tokens of a long chunk go straight to low precision
            ok = (pos_h >= 0) & ~to_hi
            slots = (layer.fill - s)[..., None] + jnp.cumsum(ok, axis=-1, dtype=jnp.int32) - 1
            arrays = (layer.k_codes, layer.k_scale, layer.k_zero, layer.v_codes, layer.v_scale, layer.v_zero,
                      layer.pos)
            kc, ks, kz, vc, vs, vz, p = layer._write_quantized(arrays, kt, vt, pos_h, slots, ok)
            layer = layer.replace(k_codes=kc, k_scale=ks, k_zero=kz, v_codes=vc, v_scale=vs, v_zero=vz, pos=p,
                                  fill=layer.fill + jnp.sum(ok, axis=-1, dtype=jnp.int32))
        kt, vt, pos_h, to_hi = kt[:, :, n - nk:], vt[:, :, n - nk:], pos_h[..., n - nk:], to_hi[..., n - nk:]
        hp = layer.hi_pos()
        free_order = jnp.argsort(jnp.where(hp < 0, 0, 1) * s + jnp.arange(s), axis=-1).astype(jnp.int32)
        ok = (pos_h >= 0) & to_hi
        slots = gather_slots(free_order, jnp.maximum(jnp.cumsum(ok, axis=-1, dtype=jnp.int32) - 1, 0))
        keep = _keep_write(layer.keep, slots, kt, vt, ok)
        tgt = jnp.where(ok, slots, s)
        p = layer.pos.at[..., :s].set(scatter_slots(hp, tgt, pos_h))
        score = scatter_slots(layer.hi_score, tgt, jnp.zeros(pos_h.shape, jnp.float32))
        return layer.replace(keep=keep, pos=p, hi_score=score)


def to_mixed(cache: QuantizedKV, hi_score, n_hi: int, hi_limit, n_recent) -> MixedPrecisionKV:
    """``cache`` with MiKV's high-precision bookkeeping: keep-block size ``n_hi`` (static), per-head budgets
    ``hi_limit`` and recent windows ``n_recent`` (ints broadcastable to ``(B, H)``)."""
    fields = {f.name: getattr(cache, f.name) for f in dataclasses.fields(QuantizedKV)}
    bh = cache.fill.shape
    as_bh = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.int32), bh)  # noqa: E731
    return MixedPrecisionKV(**fields, hi_score=hi_score.astype(jnp.float32), hi_limit=as_bh(hi_limit),
                            n_recent=as_bh(n_recent), n_hi=n_hi)


# ------------------------------------------------------------------------------------------------- the method


@register
@dataclasses.dataclass(frozen=True)
class MiKV(Method):
    """Importance-aware mixed-precision KV cache (see module docstring)."""

    hi_ratio: float = 0.2
    recent_ratio: float = 0.5
    hi_budget: int = 0
    hi_bits: int = 16
    lo_bits: int = 2
    group: int = 32
    scorer: str = "h2o"
    window: int = 32
    balance: bool = True
    scale_dtype: str = "float16"
    name: ClassVar[str] = "mikv"
    kind: ClassVar[str] = "quantized"
    stacked_decode: ClassVar[bool] = True

    def __post_init__(self):
        if not 0.0 < self.hi_ratio <= 1.0:
            raise ValueError(f"mikv hi_ratio must be in (0, 1], got {self.hi_ratio}")
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"mikv recent_ratio must be in [0, 1], got {self.recent_ratio}")
        if isinstance(self.hi_budget, bool) or not isinstance(self.hi_budget, int) or self.hi_budget < 0:
            raise ValueError(f"mikv hi_budget must be an integer >= 0 (0 = use hi_ratio), got {self.hi_budget!r}")
        if self.hi_bits != 16:
            qz.check_bits(self.hi_bits, "mikv hi_bits (16 = full precision)")
        qz.check_bits(self.lo_bits, "mikv lo_bits")
        if self.group < 0:
            raise ValueError(f"mikv group must be >= 0 (0 = whole head), got {self.group}")
        if self.scorer not in ("h2o", "snapkv"):
            raise ValueError(f"mikv scorer must be 'h2o' or 'snapkv', got {self.scorer!r}")
        if self.every != 1:
            raise ValueError(f"mikv re-scores after every generated token (H2O): every must be 1, got {self.every}")
        check_positive("window", self.window)

    def observe(self) -> Observe:
        return Observe(window=self.window if self.scorer == "snapkv" else 0, colsum=self.scorer == "h2o",
                       qmax=self.balance)

    def decode_observe(self) -> Observe:
        return Observe(colsum=True)

    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.lo_bits, v_bits=self.lo_bits, k_group=self.group, v_group=self.group,
                         k_axis="token", residual=0, scale_dtype=self.scale_dtype)

    def validate(self, ctx: Context) -> None:
        d = ctx.cfg.head_dim
        self.spec().resolve(d, d)
        if self.hi_bits != 16:
            qz.resolve_group(self.group, d, self.hi_bits, "mikv group")

    def budget(self, capacity: int, prompt_len: int) -> tuple[int, int]:
        """High-precision tokens per head and how many of them are the most recent ones."""
        return self.row_budget(min(capacity, prompt_len) if prompt_len else capacity)

    def row_budget(self, n: int) -> tuple[int, int]:
        """``(n_hi, n_recent)`` for a row holding ``n`` tokens: ``hi_budget`` (at most ``n``), else
        ``ceil(hi_ratio * n)`` (at least 1); ``round(recent_ratio * n_hi)`` of them the most recent."""
        if n <= 0:
            return 0, 0
        n_hi = min(self.hi_budget, n) if self.hi_budget else min(max(1, math.ceil(self.hi_ratio * n)), n)
        return n_hi, min(int(round(self.recent_ratio * n_hi)), n_hi)

    def row_budgets(self, n_rows, n_max: int):
        """Per-row ``row_budget`` of ``n_rows`` (traced ints ``<= n_max``) by table look-up (exactly the Python
        arithmetic of a batch of one)."""
        table = jnp.asarray([self.row_budget(n) for n in range(n_max + 1)], jnp.int32)
        rows = table[jnp.clip(n_rows, 0, n_max)]
        return rows[..., 0], rows[..., 1]

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
            n_hi, _ = self.budget(c, ctx.prompt_len)  # static: the keep block of the largest row
            # each row's budget from its own length (valid tokens), so that left padding changes nothing
            n_row = jnp.max(jnp.sum(layer.valid, axis=-1, dtype=jnp.int32), axis=1)
            hi_row, rec_row = self.row_budgets(jnp.minimum(n_row, min(c, ctx.prompt_len or c)), c)
            score = self.scores(layer, o, state.next_pos)
            force = layer.valid & (layer.pos >= (state.next_pos - rec_row)[:, None, None])  # recent window
            idx, keep = select_keep(score, layer.valid, n_hi, force, limit=hi_row)
            order, count = compact_rest(layer.valid, idx, keep, max(c - idx.shape[-1], 1))
            # one more (empty) high-precision slot for the next generated token
            idx = jnp.pad(idx, ((0, 0), (0, 0), (0, 1)))
            keep = jnp.pad(keep, ((0, 0), (0, 0), (0, 1)))
            bal = channel_balancer(layer, o["q_absmax"], layer.k.shape[1]) if self.balance else None
            cache, src, ok = quantize_dense_layer(layer, spec, room=room_for(layer, ctx), stream_idx=order,
                                                  stream_n=count, keep_idx=idx, keep_ok=keep, keep_bits=self.hi_bits,
                                                  keep_group=self.group, k_balance=bal)
            hi_score = jnp.where(keep, gather_slots(score, idx), 0.0)
            return (to_mixed(cache, hi_score, idx.shape[-1] - 1, hi_row[:, None], rec_row[:, None]),
                    convert_obs(o, src, ok))

        return map_global_layers(state, obs, one)

    def decode(self, state, obs, ctx: Context):
        def one(i, layer, o):
            if not isinstance(layer, MixedPrecisionKV):
                return layer, o
            s = layer.n_keep
            add = group_to_kv_heads(o["colsum"][..., :s], layer.pos.shape[1], "sum")
            layer = layer.replace(hi_score=layer.hi_score + jnp.where(layer.hi_pos() >= 0, add, 0.0))
            return layer.demote(layer.hi_limit, 1, state.next_pos - 1), o

        return map_global_layers(state, obs, one)[0]

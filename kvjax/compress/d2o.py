"""D2O — "D2O: Dynamic Discriminative Operations for Efficient Long-Context Inference of Large Language Models",
Wan et al., arXiv 2406.13035.

Two levels of discrimination:

* **Layers** — attention density differs between shallow and deep layers. Each layer's density statistic is the
  variance (over keys) of the attention each key received from the prompt's queries, per head, min-max normalized
  across the layer's heads and averaged; layers get budgets proportional to ``softmax(-statistic)`` over layers
  (denser, lower-variance layers avoid excessive eviction), out of the total ``L * budget``.
* **Tokens** — within a layer, H2O-style eviction: accumulated attention (prompt column sums, then every decoding
  step), the first ``n_sink`` tokens and a recent window (``1 - heavy_ratio`` of the layer budget) always kept.
  Evicted tokens are not simply dropped: the *compensation mechanism* finds, for each evicted token, its most similar
  kept token (cosine similarity of keys) and, if the similarity reaches the threshold ``tau``, **merges** it into
  that token: ``k_c <- (e k_c + sum_i e^{u_i} k_i) / (e + sum_i e^{u_i})`` and likewise for values, ``u_i`` being the
  similarities of the tokens merged into ``c`` (the kept token enters with its self-similarity 1). ``tau`` is an
  exponential moving average of the mean best similarity of the evicted tokens:
  ``tau <- (1 - ema_beta) tau + ema_beta * mean_i max_c u_ic``, initialized by the first eviction.

Defaults follow the authors' code (AIoT-MLSys-Lab/d2o): equal heavy/recent split (``hh_ratio = recent_ratio``),
4 protected sink tokens, EMA weights 0.5/0.5, unbiased variances as ``torch.var``; the budget is 1024 tokens per layer
on average. Deviations: the reference compresses at the first decoding step and leaves layers 0, 1 and the last
uncompressed, kvjax compresses every global layer right after prefill; merge weights are the paper's normalized
exponential weights (the reference scales by similarity and takes a running mean); the threshold is kept per KV head
(the reference keeps one per layer and tests the head-averaged similarity); budgets are rounded by water-filling (sum
exactly ``L * budget``, at most the prompt, at least 1% of it as the reference's clamp and enough for the sinks) per
batch row; at most one evicted token per decoding step is merged (the cache exceeds its budget by one token per
step). The layer allocation needs concrete statistics, so the prefill runs eagerly (``jittable = False``). State: ``extras["d2o_score"]``,
``["d2o_budget"]``, ``["d2o_recent"]``, ``["d2o_tau"]``, ``["d2o_tau_set"]``.

GQA: the token scores (accumulated column sums) of the query heads sharing a KV head are reduced to one score per KV
head with ``gqa_reduce`` (mean, default; max or sum), no pooling involved; the layer statistic is computed per query
head before the head average. The authors' code runs MHA models (Llama-2, hard-coded 32 heads) and keeps one
selection per head, so kvjax's reduction is exact there.

Sharded (``kvjax.sharding``): the attention-density statistics of all layers are gathered to the host before the
layer budgets are allocated, so the allocation is exactly the unsharded one; the decode-time merging is per head
(jitted, partitioned by XLA); compacted layers go back on the mesh by the partition rules.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention import Observe
from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.compress.evict import compact_ragged, compaction_index, evict_capacity, gather_layer, group_to_kv_heads, \
    lowest_mask, size_bucket, map_decode_layers, map_global_layers, proportional_budgets

_scatter_add = jax.vmap(jax.vmap(lambda buf, idx, upd: buf.at[idx].add(upd)))


@functools.partial(jax.jit, static_argnames=("beta", "max_evicted", "max_kept"))
@functools.partial(jax.jit, static_argnames=("beta", "max_evicted", "max_kept"))
def merge_evicted(k, v, keep, evicted, tau, tau_set, beta: float, max_evicted: int, max_kept: int | None = None):
    """D2O's compensation: merges up to ``max_evicted`` evicted slots per head into their most similar kept slot.

    ``k``/``v`` ``(B, H, C, D)``, ``keep``/``evicted`` bool ``(B, H, C)``, ``tau`` ``(B, H)`` float and ``tau_set``
    ``(B, H)`` bool (threshold initialized); ``max_kept`` bounds the kept slots per head (similarities are computed
    against those only: ``(E, K)`` per head). Returns ``(k, v, tau, tau_set)``; kept slots that receive nothing are
    bit-exact copies.
    """
    ei, ev = compaction_index(evicted, max_evicted)  # (B, H, E)
    ci, cv = compaction_index(keep, max_kept)  # (B, H, K)
    kf = k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    ke = jnp.take_along_axis(kf, ei[..., None], axis=2)
    ve = jnp.take_along_axis(vf, ei[..., None], axis=2)
    kc = jnp.take_along_axis(kf, ci[..., None], axis=2)
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    sim = jnp.einsum("bhed,bhcd->bhec", unit(ke), unit(kc))
    sim = jnp.where(cv[:, :, None, :], sim, -jnp.inf)
    target = jnp.take_along_axis(ci, jnp.argmax(sim, axis=-1), axis=-1)  # slot index of the most similar kept token
    best = jnp.max(sim, axis=-1)
    live = ev & jnp.isfinite(best)
    n = jnp.sum(live, axis=-1)
    mean_best = jnp.sum(jnp.where(live, best, 0.0), axis=-1) / jnp.maximum(n, 1)
    has = n > 0
    tau = jnp.where(has, jnp.where(tau_set, (1.0 - beta) * tau + beta * mean_best, mean_best), tau)
    tau_set = tau_set | has
    merge = live & (best >= tau[..., None])
    w = jnp.where(merge, jnp.exp(jnp.where(merge, best, 0.0)), 0.0)  # (B, H, E)
    den = _scatter_add(jnp.zeros(keep.shape, jnp.float32), target, w)
    num_k = _scatter_add(jnp.zeros_like(kf), target, w[..., None] * ke)
    num_v = _scatter_add(jnp.zeros_like(vf), target, w[..., None] * ve)
    hit = (den > 0)[..., None]
    e = math.e
    k = jnp.where(hit, ((e * kf + num_k) / (e + den[..., None])).astype(k.dtype), k)
    v = jnp.where(hit, ((e * vf + num_v) / (e + den[..., None])).astype(v.dtype), v)
    return k, v, tau, tau_set


@jax.jit
def density(colsum: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    """Layer statistic ``(B,)``: per-head variance over valid keys of ``colsum`` ``(B, Hq, S)``, min-max normalized
    across heads, averaged over heads. ``valid`` ``(B, S)``."""
    n = jnp.sum(valid, axis=-1)[:, None]
    x = jnp.where(valid[:, None, :], colsum, 0.0)
    mean = jnp.sum(x, axis=-1) / jnp.maximum(n, 1)
    var = jnp.sum(jnp.where(valid[:, None, :], (colsum - mean[..., None]) ** 2, 0.0), axis=-1) / jnp.maximum(n - 1, 1)
    lo, hi = var.min(axis=1, keepdims=True), var.max(axis=1, keepdims=True)
    return ((var - lo) / (hi - lo + 1e-6)).mean(axis=1)


@functools.partial(jax.jit, static_argnums=(0,))
def _select(method, layer, colsum, n_keep, b_l, next_pos):
    """Prefill token selection of one layer: accumulated scores, recent windows ``(B, Hkv)`` and the keep mask."""
    score = group_to_kv_heads(colsum, layer.k.shape[1], method.gqa_reduce)
    recent = (b_l - jnp.round(b_l * method.heavy_ratio).astype(jnp.int32))[:, None]
    recent = jnp.broadcast_to(recent, layer.fill.shape)
    protect = method._protect(layer, next_pos, recent[..., None])
    n_more = n_keep[:, None] - jnp.sum(protect, axis=-1)
    keep = protect | lowest_mask(-score, layer.valid & ~protect, n_more)
    return score, recent, keep & layer.valid


@register
@dataclasses.dataclass(frozen=True)
class D2O(Method):
    """Density-based layer budgets + H2O-style eviction with similarity-threshold merging (see module docstring)."""

    budget: int = 1024  # average tokens per layer and head
    heavy_ratio: float = 0.5  # fraction of a layer's budget for heavy hitters; the rest is the recent window
    n_sink: int = 4  # first tokens never evicted
    ema_beta: float = 0.5  # weight of the newest evictions in the threshold's moving average
    merge: bool = True  # the compensation mechanism (False: plain eviction)
    gqa_reduce: str = "mean"
    name: ClassVar[str] = "d2o"
    family: ClassVar[str] = "merging"
    stacked_decode: ClassVar[bool] = True
    jittable: ClassVar[bool] = False

    def __post_init__(self):
        check_positive("budget", self.budget)
        check_positive("n_sink", self.n_sink, allow_zero=True)
        if not 0.0 <= self.heavy_ratio <= 1.0:
            raise ValueError(f"d2o heavy_ratio must be in [0, 1], got {self.heavy_ratio}")
        if not 0.0 < self.ema_beta <= 1.0:
            raise ValueError(f"d2o ema_beta must be in (0, 1], got {self.ema_beta}")
        if self.n_sink and round(self.budget * self.heavy_ratio) < self.n_sink:
            raise ValueError(f"d2o heavy part of the budget (round(budget * heavy_ratio) = "
                             f"{round(self.budget * self.heavy_ratio)}) must hold the {self.n_sink} sink tokens")
        if self.gqa_reduce not in ("mean", "sum", "max"):
            raise ValueError(f"d2o gqa_reduce must be mean, sum or max, got {self.gqa_reduce!r}")

    def observe(self) -> Observe:
        return Observe(colsum=True)

    def decode_observe(self) -> Observe:
        return Observe(colsum=True)

    def layer_budgets(self, stats: np.ndarray, n_valid: np.ndarray) -> np.ndarray:
        """Budgets ``(L, B)`` from the density statistics ``(L, B)`` and each row's valid prompt length."""
        out = np.zeros(stats.shape, np.int64)
        for b in range(stats.shape[1]):
            n = int(n_valid[b])
            if n <= self.budget:
                out[:, b] = n
                continue
            z = -stats[:, b]
            w = np.exp(z - z.max())
            floor = max(1, int(0.01 * n), math.ceil(self.n_sink / self.heavy_ratio) if self.n_sink else 1)
            out[:, b] = proportional_budgets(w / w.sum(), stats.shape[0] * self.budget, n, min(floor, n))
        return out

    def _protect(self, layer, next_pos, recent):
        rec = layer.pos >= next_pos[:, None, None] - recent
        return layer.valid & ((layer.pos < self.n_sink) | rec)

    def _evict(self, layer, score, keep, max_evicted: int, max_kept: int | None = None):
        """Drops the valid slots outside ``keep``, merging them first (returns the new k, v and extras)."""
        ex = dict(layer.extras)
        k, v = layer.k, layer.v
        if self.merge:
            evicted = layer.valid & ~keep
            k, v, ex["d2o_tau"], ex["d2o_tau_set"] = merge_evicted(
                k, v, keep & layer.valid, evicted, ex["d2o_tau"], ex["d2o_tau_set"], self.ema_beta, max_evicted,
                max_kept)
        ex["d2o_score"] = score
        return k, v, ex

    def prefill(self, state, obs, ctx: Context):
        idx_g = [i for i, layer in enumerate(state.layers) if not layer.window]
        if not idx_g:
            return state, obs
        first = state.layers[idx_g[0]]
        n_valid = np.asarray(jnp.sum(first.valid[:, 0], axis=-1))
        stats = np.stack([np.asarray(density(obs[i]["colsum"], state.layers[i].valid[:, 0])) for i in idx_g])
        budgets = dict(zip(idx_g, self.layer_budgets(stats, n_valid)))

        def one(i, layer, o):
            b_l = np.where(n_valid <= self.budget, self.budget, budgets[i])  # decode budget per row
            score, recent, keep = _select(self, layer, o["colsum"], jnp.asarray(budgets[i], jnp.int32),
                                          jnp.asarray(b_l, jnp.int32), state.next_pos)
            layer = layer.replace(extras={
                **layer.extras, "d2o_score": score,
                "d2o_budget": jnp.broadcast_to(jnp.asarray(b_l, jnp.int32)[:, None], layer.fill.shape),
                "d2o_recent": recent,
                "d2o_tau": jnp.zeros(layer.fill.shape, jnp.float32),
                "d2o_tau_set": jnp.zeros(layer.fill.shape, bool)})
            counts = np.asarray(jnp.stack([jnp.sum(keep, axis=-1), jnp.sum(layer.valid & ~keep, axis=-1)]))
            size, n_evicted = max(1, int(counts[0].max())), max(1, int(counts[1].max()))  # concrete: runs eagerly
            k, v, ex = self._evict(layer, score, keep, size_bucket(n_evicted, layer.capacity),
                                   size_bucket(size, layer.capacity))  # bounds only: bucketed, compiled once each
            room = evict_capacity(size, int(b_l.max()), ctx.decode_room) - size
            return compact_ragged(layer.replace(k=k, v=v, extras=ex), o, keep, size=size, room=room)

        return map_global_layers(state, obs, one, per_layer=True)

    def decode(self, state, obs, ctx: Context):
        def one(i, layer, o):
            score = layer.extras["d2o_score"] + group_to_kv_heads(o["colsum"], layer.k.shape[1], self.gqa_reduce)
            protect = self._protect(layer, state.next_pos, layer.extras["d2o_recent"][..., None])
            n = jnp.sum(layer.valid, axis=-1) - layer.extras["d2o_budget"]
            keep = layer.valid & ~lowest_mask(score, layer.valid & ~protect, n)
            k, v, ex = self._evict(layer, score, keep, 1)
            idx, kept = compaction_index(keep)
            return gather_layer(layer.replace(extras=ex), idx, kept, k=k, v=v)

        return map_decode_layers(state, obs, one, "d2o_score")

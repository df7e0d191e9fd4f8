"""CAKE — "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences", Qin et al., arXiv 2503.12491.

Cache allocation as cake slicing: every layer states a *preference* from its observation-window attention ``A``
(last ``window`` prompt queries over the prefix keys):

* spatial dispersion ``H = -sum A log A`` (entropy: broad attention needs more tokens),
* temporal shift ``V = sum_keys var_queries(A)`` (attention that moves between queries needs more tokens),
* preference ``P = H^(1/tau1) * V^(1/tau2)``,

and gets a prefix budget proportional to it, out of the total ``L (budget - window)`` (capped at the prompt). The
allocation is *cascading*: when layer ``m`` is prefilled, the budgets of layers ``0..m`` are recomputed from their
preferences so far (out of the same total), so memory never exceeds the total budget during prefill. As eviction
within a layer keeps the top tokens of a fixed indicator (so successive evictions are nested), kvjax computes the
cascade's outcome in one pass after the whole prefill: each layer keeps its smallest budget over the steps ``m >= l``.
With a fixed total a layer's share can only shrink as layers join, so this equals the final allocation up to rounding
(``cascade=False`` uses the final allocation directly); kvjax does not reproduce the cascade's lower peak memory
during prefill, since its prefill materializes all layers before the transform runs.

Tokens are ranked by the eviction indicator ``mean_q(A) + gamma * var_q(A)`` (pooled, kernel 5), which favours tokens
whose importance shifts between queries; the window is always kept. During decoding each layer evicts
the lowest-scoring non-window token whenever it exceeds its budget, scoring with the new token's pooled attention, as
the authors' decoding cache does.

Defaults follow the authors' code (cakekv, ``experiments/LongBench/pred_cake.py``): window 32, ``gamma = 200``,
``tau1 = tau2 = 1`` (their tuned per-model values are in ``model2tau.json``), kernel 5 average pooling, variances
unbiased as ``torch.var``, a budget of 1024 tokens per layer (``pooling="maxpool"`` and ``gamma = 0``, an indicator
equal to the mean window attention, give SnapKV's ranking: the eviction comparison uses them to isolate CAKE's
allocation). Deviations: budgets are rounded by water-filling and largest
remainder (the reference truncates, then spreads the excess of clipped layers evenly); a prompt no longer than the
budget is kept whole (the reference waits for ``budget + window``); each batch row gets its own allocation (the
reference runs batch 1); with GQA, the preference is computed over all query heads and the eviction indicators are pooled per query head,
then averaged over the query heads of a KV head (pool, then mean; ``gqa_reduce`` also offers max / sum), as the
authors' code does (``attn_cache.reshape(...).mean(-2)`` after pooling); global layers only.
The allocation needs concrete statistics, so the prefill runs eagerly (``jittable = False``). Per-head budgets live in
``extras["cake_budget"]``.

Sharded (``kvjax.sharding``): the layer statistics are gathered to the host (``np.asarray`` of the global, sharded
arrays), so the cascading allocation over layers and heads is exactly the unsharded one; the compacted layers are
placed back on the mesh by the partition rules (``Model.shard_state``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention import Observe
from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.compress.evict import compact_layer, compact_ragged, evict_capacity, group_to_kv_heads, lowest_mask, \
    map_decode_layers, map_global_layers, pool1d, proportional_budgets, recent_mask


@functools.partial(jax.jit, static_argnames=("gamma", "tau1", "tau2"))
def window_stats(win: jnp.ndarray, prefix: jnp.ndarray, gamma: float, tau1: float, tau2: float):
    """Preference ``(B,)`` and raw eviction indicator ``(B, Hq, S)`` from window attention ``win`` ``(B, Hq, W, S)``
    and the prefix mask ``(B, Hq, S)`` (keys outside the observation window)."""
    w = win.shape[2]
    ddof = 1 if w > 1 else 0
    a = jnp.where(prefix[:, :, None, :], win, 0.0)
    disp = -jnp.sum(a * jnp.log(a + 1e-10), axis=(1, 2, 3))
    var = jnp.sum(jnp.var(a, axis=2, ddof=ddof), axis=(1, 2))
    pref = jnp.maximum(disp, 0.0) ** (1.0 / tau1) * jnp.maximum(var, 0.0) ** (1.0 / tau2)
    indicator = jnp.mean(win, axis=2) + gamma * jnp.var(win, axis=2, ddof=ddof)
    return pref, jnp.where(prefix, indicator, 0.0)


def cascade_budgets(prefs: np.ndarray, total: int, cap: int, cascade: bool = True) -> np.ndarray:
    """Prefix budgets of layers with preferences ``prefs`` (bottom first) out of ``total``, each at most ``cap``."""
    final = proportional_budgets(prefs, total, cap)
    if not cascade:
        return final
    out = final.copy()
    for m in range(len(prefs) - 1):  # step m allocates the total among layers 0..m
        out[:m + 1] = np.minimum(out[:m + 1], proportional_budgets(prefs[:m + 1], total, cap))
    return out


@functools.partial(jax.jit, static_argnums=(0,))
def _layer_stats(method, layer, win, next_pos):
    """Preference ``(B,)``, pooled eviction indicator ``(B, Hkv, S)`` and prefix mask of one layer."""
    g = win.shape[1] // layer.k.shape[1]
    prefix = layer.valid & ~recent_mask(layer, next_pos, method.window)
    pref, raw = window_stats(win, jnp.repeat(prefix, g, axis=1), method.gamma, method.tau1, method.tau2)
    return pref, method._score(raw, layer.k.shape[1]), prefix


@jax.jit
def _keep(layer, score, prefix, n_keep):
    return (layer.valid & ~prefix) | lowest_mask(-score, prefix, n_keep)


@register
@dataclasses.dataclass(frozen=True)
class CAKE(Method):
    """Preference-proportional, cascading layer budgets with a variance-aware indicator (see module docstring)."""

    budget: int = 1024  # average tokens per layer and head, observation window included
    window: int = 32
    kernel: int = 5
    pooling: str = "avgpool"  # the authors' avg_pool1d; "maxpool" for comparisons with SnapKV-family settings
    tau1: float = 1.0
    tau2: float = 1.0
    gamma: float = 200.0
    cascade: bool = True
    gqa_reduce: str = "mean"
    name: ClassVar[str] = "cake"
    stacked_decode: ClassVar[bool] = True
    jittable: ClassVar[bool] = False

    def __post_init__(self):
        check_positive("window", self.window)
        check_positive("kernel", self.kernel)
        check_positive("tau1", self.tau1)
        check_positive("tau2", self.tau2)
        check_positive("gamma", self.gamma, allow_zero=True)
        if self.kernel % 2 == 0:
            raise ValueError(f"cake pooling kernel must be odd (same-length pooling), got {self.kernel}")
        if self.budget <= self.window:
            raise ValueError(f"cake budget ({self.budget}) must exceed the observation window ({self.window})")
        if self.gqa_reduce not in ("mean", "sum", "max"):
            raise ValueError(f"cake gqa_reduce must be mean, sum or max, got {self.gqa_reduce!r}")
        if self.pooling not in ("avgpool", "maxpool"):
            raise ValueError(f"cake pooling must be 'avgpool' or 'maxpool', got {self.pooling!r}")

    def observe(self) -> Observe:
        return Observe(window=self.window)

    def decode_observe(self) -> Observe:
        return Observe(colsum=True)

    def _score(self, raw, hkv):
        return group_to_kv_heads(pool1d(raw, self.kernel, self.pooling), hkv, self.gqa_reduce)

    def layer_budgets(self, prefs: np.ndarray, n_valid: np.ndarray) -> np.ndarray:
        """Prefix budgets ``(L, B)`` from preferences ``(L, B)`` and each row's number of valid prompt tokens."""
        out = np.zeros(prefs.shape, np.int64)
        for b in range(prefs.shape[1]):
            prefix = max(int(n_valid[b]) - self.window, 0)
            if n_valid[b] <= self.budget:
                out[:, b] = prefix  # nothing to evict
            else:
                out[:, b] = cascade_budgets(prefs[:, b], prefs.shape[0] * (self.budget - self.window), prefix,
                                            self.cascade)
        return out

    def prefill(self, state, obs, ctx: Context):
        stats = {}
        for i, layer in enumerate(state.layers):
            if layer.window:
                continue
            pref, score, prefix = _layer_stats(self, layer, obs[i]["window"], state.next_pos)
            stats[i] = (np.asarray(pref, np.float64), score, prefix)
        if not stats:
            return state, obs
        order = sorted(stats)
        n_valid = np.asarray(jnp.sum(state.layers[order[0]].valid[:, 0], axis=-1))
        budgets = self.layer_budgets(np.stack([stats[i][0] for i in order]), n_valid)
        budgets = dict(zip(order, budgets))

        def one(i, layer, o):
            _, score, prefix = stats[i]
            n_keep = jnp.asarray(budgets[i], jnp.int32)[:, None]  # (B, 1)
            keep = _keep(layer, score, prefix, n_keep)
            size = max(1, int(jnp.max(jnp.sum(keep, axis=-1))))  # concrete: the prefill runs eagerly
            per_head = jnp.broadcast_to(jnp.where(jnp.asarray(n_valid <= self.budget)[:, None], self.budget,
                                                  n_keep + self.window), layer.fill.shape).astype(jnp.int32)
            room = evict_capacity(size, int(jnp.max(per_head)), ctx.decode_room) - size
            layer = layer.replace(extras={**layer.extras, "cake_budget": per_head})
            return compact_ragged(layer, o, keep, size=size, room=room)

        return map_global_layers(state, obs, one, per_layer=True)

    def decode(self, state, obs, ctx: Context):
        def one(i, layer, o):
            protect = recent_mask(layer, state.next_pos, self.window)
            g = o["colsum"].shape[1] // layer.k.shape[1]
            raw = jnp.where(jnp.repeat(protect | ~layer.valid, g, axis=1), 0.0, o["colsum"])
            score = self._score(raw, layer.k.shape[1])
            n = jnp.sum(layer.valid, axis=-1) - layer.extras["cake_budget"]
            return compact_layer(layer, ~lowest_mask(score, layer.valid & ~protect, n))

        return map_decode_layers(state, obs, one, "cake_budget")

"""Scissorhands — "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache Compression at
Test Time", Liu et al., arXiv 2305.17118.

Persistence of importance: tokens that were pivotal once stay pivotal. For every cached token kvjax counts, over the
last ``history_window`` steps, the steps at which it was *unimportant*: its attention from that step's query was below
the uniform level ``1/t`` (``t`` = number of tokens the query attended to). The cache grows freely until a head holds
``budget`` tokens; it is then compressed by dropping the ``m = drop_fraction * budget`` tokens with the largest
unimportance counts (older tokens first among ties), never one of the ``recent_window`` newest tokens. During
decoding memory thus oscillates between ``budget - m`` and ``budget`` tokens per head.

The history lives in ``extras["sh_hist"]``: one bit per slot and history step (a ring of ``history_window`` bits
packed in uint32 words, indexed by the query position modulo the window), so counting is a population count. At
prefill the history is filled from the last ``history_window`` prompt queries (observation ``window``); a prompt of
more than ``budget`` tokens is compressed right away to exactly ``budget`` tokens per head (the highest counts
dropped, the recent window protected), so that "budget B" means the same number of kept tokens right after prefill
as for every other kvjax method (``prefill_target="budget_minus_drop"`` compresses the prompt like any other overflow,
to ``budget - m``, which is what running the algorithm over the prompt as a stream of buffer overflows gives).

Defaults: the paper's algorithm leaves the budget ``B``, history window ``w``, recent window ``r`` and drop amount
``m`` as hyper-parameters and no reference code was released; kvjax uses ``w = B/2``, ``r = B/4`` (rounded down) and
``m = B/2`` unless given. Deviations: with GQA the attention of the query heads sharing a KV head is averaged (``gqa_reduce``: mean, default,
max or sum; no pooling; the paper's OPT models are MHA, where this is exact) before
thresholding; the threshold uses the tokens actually attended (``1/t`` without compression, the cache size with it);
acts on global layers only.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.attention import Observe
from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.compress.evict import compact_layer, compaction_index, evict_capacity, gather_layer, gather_obs, \
    group_to_kv_heads, lowest_mask, map_decode_layers, map_global_layers, recent_mask


@register
@dataclasses.dataclass(frozen=True)
class Scissorhands(Method):
    """Persistence-of-importance eviction (see module docstring)."""

    budget: int = 1024  # most tokens a head may hold
    history_window: int | None = None  # steps whose attention counts (None: budget // 2)
    recent_window: int | None = None  # newest tokens never dropped (None: budget // 4)
    drop_fraction: float = 0.5  # m / budget: tokens dropped at each compression
    gqa_reduce: str = "mean"
    prefill_target: str = "budget"  # tokens kept after prefill: "budget" or "budget_minus_drop"
    name: ClassVar[str] = "scissorhands"
    stacked_decode: ClassVar[bool] = True

    def __post_init__(self):
        check_positive("budget", self.budget)
        if self.history_window is not None:
            check_positive("history_window", self.history_window)
        if self.recent_window is not None:
            check_positive("recent_window", self.recent_window, allow_zero=True)
        if not 0.0 < self.drop_fraction <= 1.0:
            raise ValueError(f"scissorhands drop_fraction must be in (0, 1], got {self.drop_fraction}")
        if self.recent > self.budget - self.drop:
            raise ValueError(f"scissorhands recent_window ({self.recent}) must leave room for the {self.drop} dropped "
                             f"tokens: recent_window + drop_fraction * budget <= budget ({self.budget})")
        if self.gqa_reduce not in ("mean", "sum", "max"):
            raise ValueError(f"scissorhands gqa_reduce must be mean, sum or max, got {self.gqa_reduce!r}")
        if self.prefill_target not in ("budget", "budget_minus_drop"):
            raise ValueError("scissorhands prefill_target must be 'budget' or 'budget_minus_drop', got "
                             f"{self.prefill_target!r}")

    @property
    def history(self) -> int:
        return max(1, self.budget // 2) if self.history_window is None else self.history_window

    @property
    def recent(self) -> int:
        return self.budget // 4 if self.recent_window is None else self.recent_window

    @property
    def drop(self) -> int:
        return max(1, min(self.budget, int(round(self.drop_fraction * self.budget))))

    @property
    def words(self) -> int:
        return -(-self.history // 32)

    def observe(self) -> Observe:
        return Observe(window=self.history)

    def decode_observe(self) -> Observe:
        return Observe(colsum=True)

    # -- history bits ------------------------------------------------------------------------------------------------
    def _bits(self, qpos: jax.Array, below: jax.Array) -> jax.Array:
        """Packs ``below`` ``(B, H, W, S)`` (step ``j`` at query position ``qpos`` ``(B, W)``) as ``(B, H, S, words)``.

        Query positions are distinct and at most ``history`` apart, so their ring bits never collide.
        """
        r = jnp.mod(jnp.maximum(qpos, 0), self.history)
        word = jax.nn.one_hot(r // 32, self.words, dtype=jnp.uint32)  # (B, W, words)
        bit = jnp.left_shift(jnp.uint32(1), (r % 32).astype(jnp.uint32))  # (B, W)
        contrib = below.astype(jnp.uint32) * bit[:, None, :, None]  # (B, H, W, S)
        return jnp.einsum("bhws,bwk->bhsk", contrib, word, preferred_element_type=jnp.uint32)

    def counts(self, hist: jax.Array) -> jax.Array:
        """Unimportance count per slot ``(B, H, S)`` from the packed history."""
        return jnp.sum(jax.lax.population_count(hist), axis=-1).astype(jnp.int32)

    def _to_drop(self, layer, count, next_pos, target: int | None = None):
        """The highest-count slots to drop: with ``target=None`` (decoding) heads holding ``budget`` tokens or more go
        down to ``budget - m``; with a ``target`` every head above it goes down to ``target`` (prefill)."""
        held = jnp.sum(layer.valid, axis=-1, dtype=jnp.int32)
        if target is None:
            n = jnp.where(held >= self.budget, held - (self.budget - self.drop), 0)
        else:
            n = jnp.maximum(held - target, 0)
        candidates = layer.valid & ~recent_mask(layer, next_pos, self.recent)
        return lowest_mask(-count.astype(jnp.float32), candidates, n)

    def prefill(self, state, obs, ctx: Context):
        def one(i, layer, o):
            hkv = layer.k.shape[1]
            att = group_to_kv_heads(o["window"], hkv, self.gqa_reduce)  # (B, Hkv, W, S)
            w = att.shape[2]
            qpos = state.next_pos[:, None] - w + jnp.arange(w, dtype=jnp.int32)  # (B, W)
            vis = layer.valid[:, :, None, :] & (layer.pos[:, :, None, :] <= qpos[:, None, :, None]) \
                & (qpos[:, None, :, None] >= 0)
            n_vis = jnp.maximum(jnp.sum(vis, axis=-1, keepdims=True), 1)
            below = vis & (att * n_vis < 1.0)
            hist = self._bits(qpos, below)
            layer = layer.replace(extras={**layer.extras, "sh_hist": hist})
            target = self.budget if self.prefill_target == "budget" else None
            drop = self._to_drop(layer, self.counts(hist), state.next_pos, target)
            c = layer.capacity
            kept = min(c, self.budget)  # a row below the budget keeps everything
            room = evict_capacity(kept, self.budget, ctx.decode_room) - kept
            idx, keep = compaction_index(layer.valid & ~drop, kept)
            return gather_layer(layer, idx, keep, room), gather_obs(o, idx, keep, room)

        return map_global_layers(state, obs, one)

    def decode(self, state, obs, ctx: Context):
        qpos = state.next_pos - 1  # position of the query that produced these observations
        r = jnp.mod(qpos, self.history)
        word = jax.nn.one_hot(r // 32, self.words, dtype=bool)[:, None, None, :]  # (B, 1, 1, words)
        bit = jnp.left_shift(jnp.uint32(1), (r % 32).astype(jnp.uint32))[:, None, None, None]

        def one(i, layer, o):
            att = group_to_kv_heads(o["colsum"], layer.k.shape[1], self.gqa_reduce)  # (B, Hkv, C)
            n_vis = jnp.maximum(jnp.sum(layer.valid, axis=-1, keepdims=True), 1)
            below = (layer.valid & (att * n_vis < 1.0)).astype(jnp.uint32)[..., None]
            hist = layer.extras["sh_hist"]
            hist = jnp.where(word, (hist & ~bit) | (below * bit), hist)
            layer = layer.replace(extras={**layer.extras, "sh_hist": hist})
            return compact_layer(layer, ~self._to_drop(layer, self.counts(hist), state.next_pos))

        return map_decode_layers(state, obs, one, "sh_hist")

"""H2O — "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models", Zhang et al.,
arXiv 2306.14048.

Every slot accumulates the attention it receives: the column sums of the whole prompt's attention at prefill, then
the new token's attention at every decode step. Each head keeps ``budget`` tokens: the most recent
``budget - heavy`` tokens plus the ``heavy = round(heavy_ratio * budget)`` "heavy hitters" with the largest
accumulated attention among the older ones. The prompt is compressed once after prefill; during decoding every
token beyond the budget evicts the lowest-scoring non-recent slot (the remaining slots stay in temporal order).

Defaults follow the paper ("half heavy hitters, half recent tokens", ``heavy_ratio = 0.5``) and the authors'
``h2o_hf`` real-drop code (scores summed over the prompt's queries, one eviction per generated token). Deviations:
the budget is a token count per layer and head rather than a fraction of the prompt; with GQA the accumulated scores of
the query heads sharing a KV head are averaged into one score per KV head (``gqa_reduce``: mean, default, or max / sum;
no pooling, so the order question does not arise; the paper's and authors' models are MHA, where this is exact); acts on global layers only (sliding-window layers are left
alone). Accumulated scores live in ``extras["h2o"]`` (one float per slot).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.attention import Observe
from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.compress.evict import compact_layer, evict_capacity, gather_layer, gather_obs, group_to_kv_heads, \
    lowest_mask, map_decode_layers, map_global_layers, recent_mask, select_keep


@register
@dataclasses.dataclass(frozen=True)
class H2O(Method):
    """Heavy hitters + recent window with decode-time eviction (see module docstring)."""

    budget: int = 1024  # tokens per layer and head (heavy hitters + recent window)
    heavy_ratio: float = 0.5  # fraction of the budget for heavy hitters; the rest is the recent window
    gqa_reduce: str = "mean"
    name: ClassVar[str] = "h2o"
    stacked_decode: ClassVar[bool] = True

    def __post_init__(self):
        check_positive("budget", self.budget)
        if not 0.0 <= self.heavy_ratio <= 1.0:
            raise ValueError(f"h2o heavy_ratio must be in [0, 1], got {self.heavy_ratio}")
        if self.gqa_reduce not in ("mean", "sum", "max"):
            raise ValueError(f"h2o gqa_reduce must be mean, sum or max, got {self.gqa_reduce!r}")

    @property
    def heavy(self) -> int:
        return int(round(self.heavy_ratio * self.budget))

    @property
    def recent(self) -> int:
        return self.budget - self.heavy

    def observe(self) -> Observe:
        return Observe(colsum=True)

    def decode_observe(self) -> Observe:
        return Observe(colsum=True)

    def prefill(self, state, obs, ctx: Context):
        def one(i, layer, o):
            score = group_to_kv_heads(o["colsum"], layer.k.shape[1], self.gqa_reduce)
            protect = recent_mask(layer, state.next_pos, self.recent)
            idx, keep = select_keep(score, layer.valid, self.budget, protect)
            kept = idx.shape[-1]
            room = evict_capacity(kept, self.budget, ctx.decode_room) - kept
            layer = layer.replace(extras={**layer.extras, "h2o": score})
            return gather_layer(layer, idx, keep, room), gather_obs(o, idx, keep, room)

        return map_global_layers(state, obs, one)

    def decode(self, state, obs, ctx: Context):
        def one(i, layer, o):
            score = layer.extras["h2o"] + group_to_kv_heads(o["colsum"], layer.k.shape[1], self.gqa_reduce)
            layer = layer.replace(extras={**layer.extras, "h2o": score})
            candidates = layer.valid & ~recent_mask(layer, state.next_pos, self.recent)
            drop = lowest_mask(score, candidates, jnp.sum(layer.valid, axis=-1) - self.budget)
            return compact_layer(layer, ~drop)

        return map_decode_layers(state, obs, one, "h2o")

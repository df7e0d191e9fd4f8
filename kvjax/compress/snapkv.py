"""SnapKV — "SnapKV: LLM Knows What You are Looking for Before Generation", Li et al., arXiv 2404.14469.

After prefill, the last ``window`` prompt queries (the observation window) vote for prefix positions: their attention
probabilities are summed over the window, smoothed with a 1-D pooling of size ``kernel`` along the positions, and
each head keeps its top ``budget - window`` prefix positions plus the whole window.

Defaults follow the authors' reference code: window 32, kernel 5, average pooling. Deviation: with GQA the votes of
the query heads that share a KV head are averaged (the paper targets MHA; kvpress does the same). Acts on global
layers only; sliding-window (local) layers are left alone.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.attention import Observe
from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.compress.evict import gather_layer, gather_obs, group_to_kv_heads, map_global_layers, pool1d, \
    recent_mask, select_keep


@register
@dataclasses.dataclass(frozen=True)
class SnapKV(Method):
    """SnapKV one-shot prompt compression (see module docstring)."""

    budget: int = 1024  # kept tokens per layer and head, observation window included
    window: int = 32
    kernel: int = 5
    pooling: str = "avgpool"
    gqa_reduce: str = "mean"
    name: ClassVar[str] = "snapkv"

    def __post_init__(self):
        check_positive("window", self.window)
        check_positive("kernel", self.kernel)
        if self.kernel % 2 == 0:
            raise ValueError(f"snapkv pooling kernel must be odd (same-length pooling), got {self.kernel}")
        if self.budget <= self.window:
            raise ValueError(f"snapkv budget ({self.budget}) must exceed the observation window ({self.window})")
        if self.pooling not in ("avgpool", "maxpool"):
            raise ValueError(f"snapkv pooling must be 'avgpool' or 'maxpool', got {self.pooling!r}")

    def observe(self) -> Observe:
        return Observe(window=self.window)

    def scores(self, layer, layer_obs, next_pos) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Per-KV-head keep scores ``(B, Hkv, S)`` and the always-kept window mask."""
        protect = recent_mask(layer, next_pos, self.window)
        votes = layer_obs["window"].sum(axis=2)  # (B, Hq, S)
        votes = jnp.where(jnp.repeat(protect, votes.shape[1] // protect.shape[1], axis=1), 0.0, votes)
        votes = pool1d(votes, self.kernel, self.pooling)
        return group_to_kv_heads(votes, layer.k.shape[1], self.gqa_reduce), protect

    def prefill(self, state, obs, ctx: Context):
        def one(i, layer, o):
            score, protect = self.scores(layer, o, state.next_pos)
            idx, keep = select_keep(score, layer.valid, self.budget, protect)
            return gather_layer(layer, idx, keep, ctx.decode_room), gather_obs(o, idx, keep, ctx.decode_room)

        return map_global_layers(state, obs, one)

"""SnapKV — "SnapKV: LLM Knows What You are Looking for Before Generation", Li et al., arXiv 2404.14469.

After prefill, the last ``window`` prompt queries (the observation window) vote for prefix positions: their attention
probabilities are summed over the window, smoothed with a 1-D pooling of size ``kernel`` along the positions, and
each head keeps its top ``budget - window`` prefix positions plus the whole window.

Defaults follow the authors' reference code: window 32, kernel 5, average pooling (the paper's LongBench runs use
max pooling with kernel 7; the paper reports no significant difference). Acts on global layers only; sliding-window
(local) layers are left alone.

GQA (grouped-query attention): kvjax keeps one selection per KV head, so the votes of the ``G`` query heads that share
a KV head are reduced to one score: ``gqa_reduce`` (``"mean"``, default, as kvpress; ``"max"``; ``"sum"``, which
ranks like the mean) and ``gqa_order``: ``"pool_then_reduce"`` (default: each query head's votes are pooled, then
reduced, as kvpress) or ``"reduce_then_pool"`` (reduce, then pool, as FFY0/AdaKV's and KVCache-Factory's GQA modes).
The two orders are identical for average pooling with the mean (both linear) and differ for max pooling. The
authors' SnapKV code has no GQA reduction: it repeats the KV heads and keeps a separate selection per *query* head
(``G`` times the memory on GQA models), which kvjax's cache layout does not offer; on MHA models (the paper's
Mistral-7B is GQA, LWM-Text-Chat-1M is MHA) all options coincide.

MLA models (:class:`~kvjax.state.LatentKV` caches of an upcycled model, :mod:`kvjax.models.mla`): the observation
window's probabilities come from the absorbed latent attention, the latent is one shared "KV head", so the votes of
all query heads are reduced to one score per token and the kept tokens' latents and RoPE keys are gathered.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.attention import Observe
from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.compress.evict import GQA_ORDER, GQA_REDUCE, gather_layer, gather_obs, map_global_layers, recent_mask, \
    reduce_and_pool, select_keep


@register
@dataclasses.dataclass(frozen=True)
class SnapKV(Method):
    """SnapKV one-shot prompt compression (see module docstring)."""

    budget: int = 1024  # kept tokens per layer and head, observation window included
    window: int = 32
    kernel: int = 5
    pooling: str = "avgpool"
    gqa_reduce: str = "mean"  # how the query heads of a KV head are combined: mean, max or sum
    gqa_order: str = "pool_then_reduce"  # or "reduce_then_pool"
    name: ClassVar[str] = "snapkv"
    latent_ok: ClassVar[bool] = True

    def __post_init__(self):
        check_positive("window", self.window)
        check_positive("kernel", self.kernel)
        if self.kernel % 2 == 0:
            raise ValueError(f"snapkv pooling kernel must be odd (same-length pooling), got {self.kernel}")
        if self.budget <= self.window:
            raise ValueError(f"snapkv budget ({self.budget}) must exceed the observation window ({self.window})")
        if self.pooling not in ("avgpool", "maxpool"):
            raise ValueError(f"snapkv pooling must be 'avgpool' or 'maxpool', got {self.pooling!r}")
        if self.gqa_reduce not in GQA_REDUCE:
            raise ValueError(f"{self.name} gqa_reduce must be one of {', '.join(GQA_REDUCE)}, got {self.gqa_reduce!r}")
        if self.gqa_order not in GQA_ORDER:
            raise ValueError(f"{self.name} gqa_order must be one of {', '.join(GQA_ORDER)}, got {self.gqa_order!r}")

    def observe(self) -> Observe:
        return Observe(window=self.window)

    def scores(self, layer, layer_obs, next_pos) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Per-KV-head keep scores ``(B, Hkv, S)`` and the always-kept window mask."""
        protect = recent_mask(layer, next_pos, self.window)
        votes = layer_obs["window"].sum(axis=2)  # (B, Hq, S)
        votes = jnp.where(jnp.repeat(protect, votes.shape[1] // protect.shape[1], axis=1), 0.0, votes)
        return reduce_and_pool(votes, layer.fill.shape[1], self.kernel, self.pooling, self.gqa_reduce,
                               self.gqa_order), protect

    def prefill(self, state, obs, ctx: Context):
        def one(i, layer, o):
            score, protect = self.scores(layer, o, state.next_pos)
            idx, keep = select_keep(score, layer.valid, self.budget, protect)
            return gather_layer(layer, idx, keep, ctx.decode_room), gather_obs(o, idx, keep, ctx.decode_room)

        return map_global_layers(state, obs, one)

"""Ada-KV — "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference",
Feng et al., arXiv 2407.11550 — as the ``head_budgets="adaptive"`` option of SnapKV-style scoring.

SnapKV gives every head of a layer the same budget. Ada-KV allocates the layer's total ``H (budget - window)`` prefix
slots across its heads jointly: the top scores over all heads of the layer win, so heads whose attention is
concentrated give slots to heads whose attention is spread. A safeguard first reserves, in every head, its top
``floor_alpha * (budget - window)`` tokens. Every head keeps its whole observation window, as in SnapKV.

The result is ragged: heads hold different numbers of tokens (each head's ``fill``; unused slots have ``pos = -1``),
while the number of valid entries of the layer equals the uniform budget. The layer's capacity is the largest head's
count (plus the decode room), found on the host: with ``head_budgets="adaptive"`` the prefill runs eagerly
(``jittable`` is False; traced anyway, e.g. inside a jitted chain, the capacity falls back to the worst case
``window + H (budget - window)``). ``head_budgets="uniform"`` is exactly :class:`~kvjax.compress.snapkv.SnapKV`.

Storage (``storage``): ``"ragged"`` (the default) stores the layer as a :class:`~kvjax.state.RaggedKV`: one flat
buffer of all heads' tokens per batch row with per-head offsets, every head followed by its own ``decode_room``
slots, so the cache's bytes are those of the tokens kept (``H * budget`` per layer and row) plus the decode room and
the offsets — what Ada-KV's memory claim assumes (the authors' code stores the heads flattened with cumulative
lengths for a varlen kernel too). ``"padded"`` keeps the earlier :class:`~kvjax.state.DenseKV` of the largest
head's count plus room (other heads' slots past their ``fill`` are empty): same tokens, same attention, more bytes;
kept for comparison (``benchmarks/ragged_adakv.py``). A chain converts a ragged layer back to its exact padded view
before a method that needs dense caches (e.g. a quantizer), so those methods' bytes are padded again.

Defaults follow the authors' code (FFY0/AdaKV, and its port in NVIDIA/kvpress): safeguard ``floor_alpha = 0.2``,
window 32, pooling kernel 7, max pooling; scores are SnapKV's window votes. Deviations: scores are compared across the
KV heads of a layer after averaging the votes of the query heads that share a KV head (GQA); acts on global layers
only.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.compress.base import Context, register
from kvjax.compress.evict import BIG, compact_ragged, map_global_layers
from kvjax.compress.snapkv import SnapKV
from kvjax.state import RaggedKV, ragged_from_dense, resize_obs


def adaptive_keep(score: jax.Array, candidates: jax.Array, per_head: int, floor: int) -> jax.Array:
    """Bool ``(B, H, S)``: ``H * per_head`` candidates chosen jointly over the heads of each row, every head first
    guaranteed its own top ``floor`` candidates (fewer candidates than that: all of them)."""
    b, h, s = score.shape
    sc = jnp.where(candidates, score.astype(jnp.float32), -BIG)
    if floor > 0:
        kth = jax.lax.top_k(sc, min(floor, s))[1]  # (B, H, floor)
        safe = jnp.zeros((b, h, s), bool).at[jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], kth].set(True)
        sc = jnp.where(safe & candidates, BIG, sc)
    n = min(h * per_head, h * s)
    top_i = jax.lax.top_k(sc.reshape(b, h * s), n)[1]  # joint selection over the heads of the row
    keep = jnp.zeros((b, h * s), bool).at[jnp.arange(b)[:, None], top_i].set(True).reshape(b, h, s)
    return keep & candidates


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _keep(method, layer, layer_obs, next_pos, per_head: int, floor: int):
    score, protect = method.scores(layer, layer_obs, next_pos)
    return (protect | adaptive_keep(score, layer.valid & ~protect, per_head, floor)) & layer.valid


@register
@dataclasses.dataclass(frozen=True)
class AdaKV(SnapKV):
    """SnapKV scoring with per-head budgets allocated jointly over a layer's heads (see module docstring)."""

    window: int = 32
    kernel: int = 7
    pooling: str = "maxpool"
    head_budgets: str = "adaptive"  # "adaptive" (Ada-KV) or "uniform" (SnapKV)
    floor_alpha: float = 0.2  # safeguard: fraction of the per-head budget every head keeps for itself
    storage: str = "ragged"  # "ragged" (RaggedKV, bytes of the kept tokens) or "padded" (DenseKV of the largest head)
    name: ClassVar[str] = "adakv"
    family: ClassVar[str] = "eviction"  # (``kind`` is per instance: "ragged" or "dense")

    def __post_init__(self):
        super().__post_init__()
        if self.head_budgets not in ("uniform", "adaptive"):
            raise ValueError(f"adakv head_budgets must be 'uniform' or 'adaptive', got {self.head_budgets!r}")
        if not 0.0 <= self.floor_alpha <= 1.0:
            raise ValueError(f"adakv floor_alpha must be in [0, 1], got {self.floor_alpha}")
        if self.storage not in ("ragged", "padded"):
            raise ValueError(f"adakv storage must be 'ragged' or 'padded', got {self.storage!r}")

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "ragged" if self.head_budgets == "adaptive" and self.storage == "ragged" else "dense"

    @property
    def jittable(self) -> bool:  # the ragged capacity is found on the host
        return self.head_budgets == "uniform"

    def prefill(self, state, obs, ctx: Context):
        if self.head_budgets == "uniform":
            return super().prefill(state, obs, ctx)
        per_head = self.budget - self.window
        floor = int(per_head * self.floor_alpha)

        ragged = self.storage == "ragged"

        def one(i, layer, o):
            keep = _keep(self, layer, o, state.next_pos, per_head, floor)
            h = layer.k.shape[1]
            traced = isinstance(keep, jax.core.Tracer)
            if traced:  # traced (e.g. inside a jitted chain): static worst case
                size = min(layer.capacity, self.window + h * per_head)
            else:  # eager prefill: the largest head's count
                size = max(1, int(jnp.max(jnp.sum(keep, axis=-1))))
            if not ragged:
                return compact_ragged(layer, o, keep, size=size, room=ctx.decode_room)
            dense, o = compact_ragged(layer, o, keep, size=size, room=0)
            bound = dict(size=h * (min(self.budget, layer.capacity) + ctx.decode_room),
                         max_len=size + ctx.decode_room) if traced else {}
            return ragged_from_dense(dense, ctx.decode_room, **bound), o

        state, obs = map_global_layers(state, obs, one, per_layer=True)
        return (unify_ragged(state, obs) if ragged else (state, obs))


def unify_ragged(state, obs):
    """Gives every ragged layer the largest ``max_len`` of them (a static bound: sizes the padded view and the kernel's
    loop, never storage), so that layers with equal flat sizes stack into one scan; observations (padded-view order)
    are zero-padded to it."""
    idx = [i for i, layer in enumerate(state.layers) if isinstance(layer, RaggedKV)]
    if not idx:
        return state, obs
    m = max(state.layers[i].max_len for i in idx)
    layers, obs = list(state.layers), list(obs)
    for i in idx:
        layers[i] = layers[i].replace(max_len=m)
        obs[i] = resize_obs(obs[i], m)
    return state.replace(layers=tuple(layers)), tuple(obs)

"""Ada-KV — "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference",
Feng et al., arXiv 2407.11550 — as the ``head_budgets="adaptive"`` option of SnapKV-style scoring.

SnapKV gives every head of a layer the same budget. Ada-KV allocates the layer's total ``H (budget - window)`` prefix
slots across its ``H`` heads jointly: heads whose attention is concentrated give slots to heads whose attention is
spread. Every head also keeps its whole observation window, as in SnapKV. With ``b = budget - window`` and
``alpha = floor_alpha``, two allocation rules are offered:

* ``allocation="ffy0"`` (default; the authors' code, FFY0/AdaKV ``AdaptiveSnapKVCluster.update_kv``): count how many
  of the joint top ``H b`` prefix scores of the layer fall in each head (``n_h``, no safeguard in this count), then
  give head ``h`` the budget ``round((1 - alpha) n_h + floor(alpha b))`` (round half to even, as ``torch.round``) and
  keep that head's own top tokens. The safeguard thus shrinks every allocation toward the uniform one by ``1 - alpha``.
  As in the reference the rounded budgets can sum to a few tokens more or fewer than ``H b`` (at most ``H / 2``).
* ``allocation="safeguard"`` (the rule of NVIDIA/kvpress's ``AdaKVPress``, kvjax's previous default): reserve in
  every head its top ``floor(alpha b)`` tokens, then choose the remaining slots of the layer's total ``H b`` jointly
  over all heads by score. Extreme allocations are kept as they are (a head owning ``3 b`` of the joint top gets about
  ``3 b``, where ``ffy0`` gives it ``2.6 b + 0.2 b`` at ``alpha = 0.2``). kvpress counts the observation window inside
  its reserve (``int(alpha * budget)``); kvjax reserves prefix tokens on top of the window.

The result is ragged: heads hold different numbers of tokens, found on the host: with ``head_budgets="adaptive"``
the prefill runs eagerly (``jittable`` is False; traced anyway, e.g. inside a jitted chain, the sizes fall back to the
worst case). ``head_budgets="uniform"`` is exactly :class:`~kvjax.compress.snapkv.SnapKV` with these settings.

Shapes (``fixed_shapes``): by default the ragged sizes are exact, found on the host per prompt (the flat size of
each layer and the largest head segment ``max_len``), so every prompt gets its own compiled decode program (about
2 min per prompt on a 2-core CPU). ``fixed_shapes=True`` uses the static worst case instead, as a traced prefill
does (flat size ``H (budget + 1 + room)`` per layer, ``max_len`` = ``window + H (budget - window) + H + room``):
the same tokens are kept and attended, all prompts of one shape share one program, and the allocated bytes include
up to ``H`` slack slots per layer (at most ``H / 2`` are used by FFY0's rounding); the valid bytes do not change.
The experiment configs set it.

Storage (``storage``): ``"ragged"`` (the default) stores the layer as a :class:`~kvjax.state.RaggedKV`: one flat
buffer of all heads' tokens per batch row with per-head offsets, every head followed by its own ``decode_room``
slots, so the cache's bytes are those of the tokens kept (``H * budget`` per layer and row) plus the decode room and
the offsets — what Ada-KV's memory claim assumes (the authors' code stores the heads flattened with cumulative
lengths for a varlen kernel too). ``"padded"`` keeps the earlier :class:`~kvjax.state.DenseKV` of the largest
head's count plus room (other heads' slots past their ``fill`` are empty): same tokens, same attention, more bytes;
kept for comparison (``benchmarks/ragged_adakv.py``). A chain converts a ragged layer back to its exact padded view
before a method that needs dense caches (e.g. a quantizer), so those methods' bytes are padded again.

Defaults follow the authors' code (FFY0/AdaKV ``experiments/LongBench/pred.py`` and ``snapkv_utils.py``):
``floor_alpha = 0.2``, window 32, pooling kernel 7, max pooling, scores = the window's attention to each prefix token
(FFY0 averages over the window, SnapKV sums: the same ranking). GQA: the authors' default keeps one selection per
*query* head on repeated KV heads (``G`` times the memory; kvjax's layout has one selection per KV head); their
``--gqa_support`` mode averages the query heads of a group *before* pooling, which is kvjax's default here
(``gqa_reduce="mean"``, ``gqa_order="reduce_then_pool"``; kvpress pools first: ``gqa_order="pool_then_reduce"``).
Not implemented: FFY0's ``normalize`` and ``skip`` options (both off in its scripts). Acts on global layers only.

Sharded (``kvjax.sharding``): the budget allocation compares scores across all KV heads of a layer. Jitted, XLA
reduces across the ``model`` shards (a top-k over the gathered head axis); with adaptive host-side budgets the
scores are gathered to the host. Either way the allocation equals the unsharded one (tested on 8 devices with
``data:2,model:4``). Ragged storage keeps all heads of a row in one flat buffer, which the rules shard over
``data`` only.
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
    """``allocation="safeguard"``: bool ``(B, H, S)``, ``H * per_head`` candidates chosen jointly over the heads of
    each row, every head first guaranteed its own top ``floor`` candidates (fewer candidates than that: all of them)."""
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


def ffy0_head_budgets(score: jax.Array, candidates: jax.Array, per_head: int, alpha: float) -> jax.Array:
    """``allocation="ffy0"``: int ``(B, H)`` budgets ``round((1 - alpha) n_h + floor(alpha per_head))``, ``n_h`` =
    head ``h``'s share of the row's joint top ``H * per_head`` candidate scores."""
    b, h, s = score.shape
    sc = jnp.where(candidates, score.astype(jnp.float32), -BIG)
    top_s, top_i = jax.lax.top_k(sc.reshape(b, h * s), min(h * per_head, h * s))
    counts = jnp.zeros((b, h), jnp.float32).at[jnp.arange(b)[:, None], top_i // s].add(
        (top_s > -BIG).astype(jnp.float32))
    return jnp.round(counts * (1.0 - alpha) + int(per_head * alpha)).astype(jnp.int32)


def ffy0_keep(score: jax.Array, candidates: jax.Array, per_head: int, alpha: float) -> jax.Array:
    """Bool ``(B, H, S)``: each head's own top :func:`ffy0_head_budgets` candidates."""
    cap = ffy0_head_budgets(score, candidates, per_head, alpha)
    sc = jnp.where(candidates, score.astype(jnp.float32), -BIG)
    rank = jnp.argsort(jnp.argsort(-sc, axis=-1, stable=True), axis=-1)  # 0 = best; ties: lower slot first
    return candidates & (rank < cap[..., None])


@functools.partial(jax.jit, static_argnums=(0, 4))
def _keep(method, layer, layer_obs, next_pos, per_head: int):
    score, protect = method.scores(layer, layer_obs, next_pos)
    cand = layer.valid & ~protect
    if method.allocation == "ffy0":
        chosen = ffy0_keep(score, cand, per_head, method.floor_alpha)
    else:
        chosen = adaptive_keep(score, cand, per_head, int(per_head * method.floor_alpha))
    return (protect | chosen) & layer.valid


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
    allocation: str = "ffy0"  # "ffy0" (authors' code) or "safeguard" (kvpress's rule)
    gqa_order: str = "reduce_then_pool"  # FFY0's GQA mode; kvpress: "pool_then_reduce"
    fixed_shapes: bool = False  # ragged sizes at their static worst case (one compiled program per prompt shape)
    name: ClassVar[str] = "adakv"
    latent_ok: ClassVar[bool] = False  # not checked on MLA latent caches (SnapKV is)
    family: ClassVar[str] = "eviction"  # (``kind`` is per instance: "ragged" or "dense")

    def __post_init__(self):
        super().__post_init__()
        if self.head_budgets not in ("uniform", "adaptive"):
            raise ValueError(f"adakv head_budgets must be 'uniform' or 'adaptive', got {self.head_budgets!r}")
        if not 0.0 <= self.floor_alpha <= 1.0:
            raise ValueError(f"adakv floor_alpha must be in [0, 1], got {self.floor_alpha}")
        if self.allocation not in ("ffy0", "safeguard"):
            raise ValueError(f"adakv allocation must be 'ffy0' or 'safeguard', got {self.allocation!r}")
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

        ragged = self.storage == "ragged"

        def one(i, layer, o):
            keep = _keep(self, layer, o, state.next_pos, per_head)
            h = layer.k.shape[1]
            traced = isinstance(keep, jax.core.Tracer)
            if traced or self.fixed_shapes:  # traced (e.g. inside a jitted chain) or asked for: static worst case
                size = min(layer.capacity, self.window + h * per_head + h)  # ffy0's rounding: <= H/2 more
            else:  # eager prefill: the largest head's count
                size = max(1, int(jnp.max(jnp.sum(keep, axis=-1))))
            if not ragged:
                return compact_ragged(layer, o, keep, size=size, room=ctx.decode_room)
            dense, o = compact_ragged(layer, o, keep, size=size, room=0)
            bound = dict(size=h * (min(self.budget, layer.capacity) + 1 + ctx.decode_room),
                         max_len=size + ctx.decode_room) if traced or self.fixed_shapes else {}
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

"""KVCrush — "KVCrush: Key Value Cache size-reduction using similarity in head-behaviour", Jha et al.,
arXiv 2503.00022.

A pluggable add-on to an importance-based evictor. The budget is split: ``1 - budget_fraction_for_representatives``
of it goes to the base method's top tokens; the rest keeps *representatives* of the tokens the base method evicts, so
that whole regions of the context are not lost. Every token gets a binary **head-behaviour signature**: bit ``h`` says
whether query head ``h`` of the layer attends to it more than its average token (observation-window votes, or
accumulated attention for methods that observe column sums). The evicted tokens of a head are sorted by the Hamming
distance of their signature to an *anchor* signature, which groups tokens that the heads treat alike; the sorted list
is cut into ``n_rep`` equal buckets and the first token of each bucket is kept (uniformly spaced picks, as the
authors' OpenVINO GenAI implementation does). Representatives are kept as they are (no merging).

``base``: a registered method name or a :class:`~kvjax.compress.base.Method` exposing ``scores(layer, obs, next_pos)``
(per-KV-head scores and an always-kept mask, as SnapKV) and a ``budget`` field, without a decode phase; default
SnapKV-style window attention with its defaults. Its budget is replaced by ``budget - n_rep``.

Defaults: anchor ``"random"`` with seed 0 (the OpenVINO GenAI default; also ``zeros``, ``ones``, ``alternate``,
``mean`` = per-bit majority of the evicted tokens), a quarter of the budget for representatives. Deviations: the
paper pairs KVCrush with token-level (head-shared) selections; kvjax selects representatives per KV head among that
head's evicted tokens, with layer-wide signatures; acts on global layers only. GQA: signatures keep one bit per
*query* head (no reduction); the base method's scores are reduced as that method says (SnapKV: ``gqa_reduce``,
``gqa_order``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from kvjax.attention import Observe
from kvjax.compress.base import Context, Method, check_positive, merge_observe, register
from kvjax.compress.evict import compaction_index, gather_layer, gather_obs, map_global_layers, select_keep

ANCHORS = ("random", "zeros", "ones", "alternate", "mean")


def signatures(att: jax.Array, valid: jax.Array) -> jax.Array:
    """Bits ``(B, Hq, S)``: query head ``h`` gives the slot more attention than its mean over valid slots.

    ``att`` ``(B, Hq, S)`` (summed window attention or column sums), ``valid`` ``(B, S)``.
    """
    v = valid[:, None, :]
    mean = jnp.sum(jnp.where(v, att, 0.0), axis=-1, keepdims=True) / jnp.maximum(jnp.sum(v, -1, keepdims=True), 1)
    return v & (att > mean)


def representatives(dist: jax.Array, evicted: jax.Array, n_rep: int) -> jax.Array:
    """Bool ``(B, H, S)``: ``n_rep`` evicted slots per head, uniformly spaced in Hamming-distance order.

    ``dist`` ``(B, H, S)`` int distances to the anchor; ties keep slot order. With ``n`` evicted slots the picks are
    ranks ``0, s, 2s, ...`` with ``s = max(1, n // n_rep)`` (all of them when ``n <= n_rep``).
    """
    order = jnp.lexsort((dist, ~evicted), axis=-1)
    rank = jnp.argsort(order, axis=-1)
    n = jnp.sum(evicted, axis=-1, keepdims=True)
    step = jnp.maximum(n // max(n_rep, 1), 1)
    return evicted & (rank % step == 0) & (rank // step < n_rep)


@register
@dataclasses.dataclass(frozen=True)
class KVCrush(Method):
    """Base evictor + representatives of the evicted tokens grouped by head-behaviour (see module docstring)."""

    base: Any = "snapkv"  # registered method name or Method instance (prefill-only, with scores())
    budget: int = 1024  # total tokens per layer and head: base method's + representatives
    budget_fraction_for_representatives: float = 0.25
    anchor: str = "random"
    seed: int = 0
    name: ClassVar[str] = "kvcrush"

    def __post_init__(self):
        check_positive("budget", self.budget)
        if not 0.0 <= self.budget_fraction_for_representatives < 1.0:
            raise ValueError("kvcrush budget_fraction_for_representatives must be in [0, 1), got "
                             f"{self.budget_fraction_for_representatives}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"kvcrush anchor must be one of {', '.join(ANCHORS)}, got {self.anchor!r}")
        object.__setattr__(self, "_base", self._resolve_base())

    @property
    def n_rep(self) -> int:
        return int(round(self.budget_fraction_for_representatives * self.budget))

    def _resolve_base(self) -> Method:
        from kvjax.compress.base import get_method  # noqa: PLC0415 (the registry imports this module)

        base = self.base
        if isinstance(base, str):
            if base == self.name:
                raise ValueError("kvcrush cannot wrap itself")
            base = get_method(base)
        if not isinstance(base, Method):
            raise ValueError(f"kvcrush base must be a method name or a Method, got {type(base).__name__}")
        if base.has_decode():
            raise ValueError(f"kvcrush base {base.name!r} has a decode phase; kvcrush wraps one-shot prompt "
                             "evictors (e.g. snapkv)")
        if not hasattr(base, "scores") or not dataclasses.is_dataclass(base) or \
                "budget" not in {f.name for f in dataclasses.fields(base)}:
            raise ValueError(f"kvcrush base {base.name!r} must expose scores(layer, obs, next_pos) and a budget "
                             "(e.g. snapkv)")
        try:
            return dataclasses.replace(base, budget=self.budget - self.n_rep)
        except ValueError as err:
            raise ValueError(f"kvcrush leaves budget - representatives = {self.budget - self.n_rep} tokens to its "
                             f"base {base.name!r}, which rejects it: {err}") from err

    @property
    def base_method(self) -> Method:
        return self._base

    def observe(self) -> Observe:
        inner = self._base.observe()
        return inner if inner else merge_observe(inner, Observe(colsum=True))

    def _anchor(self, bits: jax.Array, evicted: jax.Array, layer_index: int) -> jax.Array:
        """Anchor bits, broadcastable to ``(B, Hkv, Hq)``."""
        hq = bits.shape[1]
        if self.anchor == "zeros":
            return jnp.zeros((1, 1, hq), bool)
        if self.anchor == "ones":
            return jnp.ones((1, 1, hq), bool)
        if self.anchor == "alternate":
            return (jnp.arange(hq) % 2 == 1)[None, None]
        if self.anchor == "random":
            key = jax.random.fold_in(jax.random.PRNGKey(self.seed), layer_index)
            return jax.random.bernoulli(key, 0.5, (hq,))[None, None]
        # mean: per-bit majority over each KV head's evicted tokens
        ones = jnp.einsum("bqs,bhs->bhq", bits.astype(jnp.float32), evicted.astype(jnp.float32))
        return ones * 2 > jnp.sum(evicted, axis=-1, keepdims=True)

    def prefill(self, state, obs, ctx: Context):
        base = self._base

        def one(i, layer, o):
            score, protect = base.scores(layer, o, state.next_pos)
            idx, keep = select_keep(score, layer.valid, base.budget, protect)
            chosen = jnp.zeros(layer.valid.shape, bool)
            chosen = jax.vmap(jax.vmap(lambda c, ix, kp: c.at[ix].set(kp)))(chosen, idx, keep)
            evicted = layer.valid & ~chosen
            att = o["window"].sum(axis=2) if "window" in o else o["colsum"]
            bits = signatures(att, layer.valid[:, 0])  # (B, Hq, S)
            anchor = self._anchor(bits, evicted, i)  # (., ., Hq)
            dist = jnp.sum(bits[:, None, :, :] != anchor[..., None], axis=2, dtype=jnp.int32)
            dist = jnp.broadcast_to(dist, evicted.shape)  # (B, Hkv, S)
            reps = representatives(dist, evicted, self.n_rep) if self.n_rep else jnp.zeros_like(evicted)
            size = min(self.budget, layer.capacity)
            idx, kept = compaction_index(chosen | reps, size)
            return gather_layer(layer, idx, kept, ctx.decode_room), gather_obs(o, idx, kept, ctx.decode_room)

        return map_global_layers(state, obs, one)

"""Keyformer — "Keyformer: KV Cache Reduction through Key Tokens Selection for Efficient Generative Inference",
Adnan et al., arXiv 2403.09054.

Like H2O, every slot accumulates a score and each head keeps a recent window plus the best-scoring older ("key")
tokens, evicting during decoding; but the score is the *Gumbel-softmax* of the attention logits rather than the
softmax: ``softmax((logits + g) / tau)`` with ``g ~ Gumbel(0, 1)`` drawn afresh at every step. The noise regularizes
the selection (tokens that were evicted can no longer receive attention, which biases plain accumulated attention);
the temperature grows linearly from ``tau_init`` at the prompt to ``tau_end`` at the last decoding step
(``tau = tau_init + step * (tau_end - tau_init) / max_new_tokens``).

The prompt's score is the Gumbel-softmax attention of *every* prompt query, summed over the queries (the authors'
``gumbel_score.sum(...)`` over the full ``T x T`` logits), computed blockwise over blocks of 256 queries from the
prompt's queries (the ``queries`` observation) and the cached keys, so no ``(T, T)`` matrix is ever held.

Defaults follow the authors' code (d-matrix-ai/keyformer-llm, ``models/*-keyformer-lib``, ``summarization/``):
``tau_init = 1``, ``tau_end = 2``, a recent window of 30% of the kept tokens (``recent_ratio = 0.3``). The logits
of decoding steps are recovered from the observed probabilities (``log p`` differs from the logit by a per-query
constant, to which the softmax is invariant). Deviations: the budget is a token count per layer and head (the
reference uses a fraction of the prompt); the reference sums its scores over the batch too (it runs batch 1), kvjax
scores each row on its own so that a row's result never depends on its neighbours; with GQA the scores of the
query heads sharing a KV head are averaged (``gqa_reduce``; the reference models are MHA); the temperature schedule
runs over the decode room the cache was sized for (``max_new_tokens`` in ``generate``); the noise is a
counter-based hash of ``(seed, layer, query head, query position, key position)`` rather than a stateful generator:
reproducible, independent across layers, heads and token pairs, fresh at every step (the query position advances),
and the same for a row whatever its batch neighbours or padding; acts on global layers only. Scores live in
``extras["kf_score"]``.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.attention import Observe, blockwise_over_queries, visibility
from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.compress.evict import compact_layer, evict_capacity, gather_layer, gather_obs, group_to_kv_heads, \
    lowest_mask, map_decode_layers, map_global_layers, recent_mask, select_keep


def _fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijective mix of ``uint32`` values (every output bit depends on every input
    bit)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def hash_gumbel(seed, layer, head, q_pos, k_pos) -> jax.Array:
    """Gumbel(0, 1) noise as a function of ``(seed, layer, head, query position, key position)`` (broadcast
    together): a counter-based generator, so a token pair gets the same draw whatever the batch layout."""
    u32 = lambda x: jnp.asarray(x).astype(jnp.int32).astype(jnp.uint32)  # noqa: E731
    h = _fmix32(u32(seed) * jnp.uint32(0x9E3779B1) + u32(layer))
    h = _fmix32(h ^ (u32(head) * jnp.uint32(0x85EBCA77)))
    h = _fmix32(h ^ (u32(q_pos) * jnp.uint32(0xC2B2AE3D)))
    h = _fmix32(h ^ (u32(k_pos) * jnp.uint32(0x27D4EB2F)))
    u = ((h >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1), never 0 or 1
    return -jnp.log(-jnp.log(u))


def gumbel_softmax(logits: jax.Array, live: jax.Array, g: jax.Array, tau) -> jax.Array:
    """``softmax((logits + g) / tau)`` over the last axis, entries not ``live`` (masked slots) excluded (zero)."""
    z = jnp.where(live, (logits + g) / tau, -jnp.inf)
    m = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.where(live, jnp.exp(z - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)


def gumbel_softmax_of_probs(p: jax.Array, g: jax.Array, tau) -> jax.Array:
    """:func:`gumbel_softmax` of the logits behind probabilities ``p`` (``log p``; ``p == 0`` = masked)."""
    live = p > 0
    return gumbel_softmax(jnp.log(jnp.where(live, p, 1.0)), live, g, tau)


def prompt_gumbel_scores(o: dict, layer, seed: int, layer_index, tau: float, q_block: int = 256) -> jax.Array:
    """``(B, Hq, C)``: Gumbel-softmax attention of every prompt query (``o["queries"]``) over the layer's slots,
    summed over the queries, blockwise (:func:`kvjax.attention.blockwise_over_queries`)."""
    k = layer.k.astype(jnp.float32)
    b, hkv, c, _ = k.shape
    hq = o["queries"].shape[1]
    g = hq // hkv
    heads = jnp.arange(hq, dtype=jnp.int32)[None, :, None, None]
    k_pos = jnp.repeat(layer.pos, g, axis=1)[:, :, None, :]  # (B, Hq, 1, C)

    def block(acc, qb, qp):
        logits = jnp.einsum("bhgtd,bhsd->bhgts", qb.astype(jnp.float32).reshape(b, hkv, g, -1, qb.shape[-1]), k)
        logits = logits.reshape(b, hq, -1, c)
        live = jnp.repeat(visibility(qp, layer.pos, layer.window), g, axis=1)  # (B, Hq, tb, C)
        noise = hash_gumbel(seed, layer_index, heads, qp[:, None, :, None], k_pos)
        return acc + gumbel_softmax(logits, live, noise, tau).sum(axis=2)

    return blockwise_over_queries(block, o["queries"], o["queries_pos"], jnp.zeros((b, hq, c), jnp.float32),
                                  q_block)


@register
@dataclasses.dataclass(frozen=True)
class Keyformer(Method):
    """Gumbel-regularized key-token selection with decode-time eviction (see module docstring)."""

    budget: int = 1024  # tokens per layer and head (key tokens + recent window)
    recent_ratio: float = 0.3  # fraction of the budget kept as recent window
    tau_init: float = 1.0
    tau_end: float = 2.0
    seed: int = 0
    gqa_reduce: str = "mean"
    name: ClassVar[str] = "keyformer"
    stacked_decode: ClassVar[bool] = True

    def __post_init__(self):
        check_positive("budget", self.budget)
        check_positive("tau_init", self.tau_init)
        check_positive("tau_end", self.tau_end)
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"keyformer recent_ratio must be in [0, 1], got {self.recent_ratio}")
        if self.gqa_reduce not in ("mean", "sum", "max"):
            raise ValueError(f"keyformer gqa_reduce must be mean, sum or max, got {self.gqa_reduce!r}")

    @property
    def recent(self) -> int:
        return int(self.recent_ratio * self.budget)

    def observe(self) -> Observe:
        return Observe(queries=True)

    def decode_observe(self) -> Observe:
        return Observe(colsum=True)

    def tau(self, step, max_new_tokens: int):
        """Temperature at decoding step ``step`` (0 = prompt) of ``max_new_tokens``."""
        delta = (self.tau_end - self.tau_init) / max_new_tokens if max_new_tokens else 0.0
        return self.tau_init + step * delta

    def prefill(self, state, obs, ctx: Context):
        def one(i, layer, o):
            gs = prompt_gumbel_scores(o, layer, self.seed, i, self.tau_init)
            score = group_to_kv_heads(gs, layer.k.shape[1], self.gqa_reduce)
            protect = recent_mask(layer, state.next_pos, self.recent)
            idx, keep = select_keep(score, layer.valid, self.budget, protect)
            kept = idx.shape[-1]
            room = evict_capacity(kept, self.budget, ctx.decode_room) - kept
            t0 = jnp.broadcast_to(state.next_pos[:, None], layer.fill.shape).astype(jnp.int32)
            layer = layer.replace(extras={**layer.extras, "kf_score": score, "kf_t0": t0})
            return gather_layer(layer, idx, keep, room), gather_obs(o, idx, keep, room)

        return map_global_layers(state, obs, one)

    def decode(self, state, obs, ctx: Context):
        def one(i, layer, o):
            step = (state.next_pos - layer.extras["kf_t0"][:, 0]).astype(jnp.float32)  # (B,), 1 at the first step
            tau = self.tau(step, ctx.decode_room)[:, None, None]
            hkv = layer.k.shape[1]
            hq = o["colsum"].shape[1]
            noise = hash_gumbel(self.seed, i, jnp.arange(hq, dtype=jnp.int32)[None, :, None],
                                (state.next_pos - 1)[:, None, None], jnp.repeat(layer.pos, hq // hkv, axis=1))
            gs = gumbel_softmax_of_probs(o["colsum"], noise, tau)
            score = layer.extras["kf_score"] + group_to_kv_heads(gs, layer.k.shape[1], self.gqa_reduce)
            layer = layer.replace(extras={**layer.extras, "kf_score": score})
            candidates = layer.valid & ~recent_mask(layer, state.next_pos, self.recent)
            drop = lowest_mask(score, candidates, jnp.sum(layer.valid, axis=-1) - self.budget)
            return compact_layer(layer, ~drop)

        return map_decode_layers(state, obs, one, "kf_score")

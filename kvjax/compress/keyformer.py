"""Keyformer — "Keyformer: KV Cache Reduction through Key Tokens Selection for Efficient Generative Inference",
Adnan et al., arXiv 2403.09054.

Like H2O, every slot accumulates a score and each head keeps a recent window plus the best-scoring older ("key")
tokens, evicting during decoding; but the score is the *Gumbel-softmax* of the attention logits rather than the
softmax: ``softmax((logits + g) / tau)`` with ``g ~ Gumbel(0, 1)`` drawn afresh at every step. The noise regularizes
the selection (tokens that were evicted can no longer receive attention, which biases plain accumulated attention);
the temperature grows linearly from ``tau_init`` at the prompt to ``tau_end`` at the last decoding step
(``tau = tau_init + step * (tau_end - tau_init) / max_new_tokens``).

Defaults follow the authors' code (d-matrix-ai/keyformer-llm): ``tau_init = 1``, ``tau_end = 2``, a recent window of
30% of the kept tokens (``recent_ratio = 0.3``), scores summed over the query positions. The logits are recovered
from the observed probabilities (``log p`` differs from the logit by a per-query constant, to which the softmax is
invariant). Deviations: the budget is a token count per layer and head (the reference uses a fraction of the prompt);
the prompt's score sums the last ``prompt_window`` prompt queries only (the reference sums all prompt queries, which
would need a ``(T, T)`` observation per layer; pass ``prompt_window >= prompt length`` for the exact reference
behaviour); with GQA the scores of the query heads sharing a KV head are averaged; the noise is seeded by ``seed``,
the layer and the position (reproducible runs; XLA's RBG generator, much cheaper to compile than threefry); acts on
global layers only. Scores live in ``extras["kf_score"]``.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.attention import Observe
from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.compress.evict import compact_layer, evict_capacity, gather_layer, gather_obs, group_to_kv_heads, \
    lowest_mask, map_decode_layers, map_global_layers, recent_mask, select_keep


def gumbel_softmax_of_probs(p: jax.Array, key: jax.Array, tau) -> jax.Array:
    """``softmax((log p + g) / tau)`` over the last axis, entries with ``p == 0`` (masked slots) excluded."""
    g = jax.random.gumbel(key, p.shape, jnp.float32)
    live = p > 0
    z = jnp.where(live, (jnp.log(jnp.where(live, p, 1.0)) + g) / tau, -jnp.inf)
    m = jnp.max(jnp.where(live, z, -jnp.inf), axis=-1, keepdims=True)
    e = jnp.where(live, jnp.exp(z - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)


@register
@dataclasses.dataclass(frozen=True)
class Keyformer(Method):
    """Gumbel-regularized key-token selection with decode-time eviction (see module docstring)."""

    budget: int = 1024  # tokens per layer and head (key tokens + recent window)
    recent_ratio: float = 0.3  # fraction of the budget kept as recent window
    tau_init: float = 1.0
    tau_end: float = 2.0
    prompt_window: int = 128  # prompt queries whose Gumbel scores are accumulated at prefill
    seed: int = 0
    gqa_reduce: str = "mean"
    name: ClassVar[str] = "keyformer"
    stacked_decode: ClassVar[bool] = True

    def __post_init__(self):
        check_positive("budget", self.budget)
        check_positive("prompt_window", self.prompt_window)
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
        return Observe(window=self.prompt_window)

    def decode_observe(self) -> Observe:
        return Observe(colsum=True)

    def _key(self, layer_index: int, next_pos) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(self.seed), layer_index)
        return jax.random.fold_in(key, jnp.max(next_pos))

    def tau(self, step, max_new_tokens: int):
        """Temperature at decoding step ``step`` (0 = prompt) of ``max_new_tokens``."""
        delta = (self.tau_end - self.tau_init) / max_new_tokens if max_new_tokens else 0.0
        return self.tau_init + step * delta

    def prefill(self, state, obs, ctx: Context):
        def one(i, layer, o):
            gs = gumbel_softmax_of_probs(o["window"], self._key(i, state.next_pos), self.tau_init).sum(axis=2)
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
            gs = gumbel_softmax_of_probs(o["colsum"], self._key(i, state.next_pos), tau)
            score = layer.extras["kf_score"] + group_to_kv_heads(gs, layer.k.shape[1], self.gqa_reduce)
            layer = layer.replace(extras={**layer.extras, "kf_score": score})
            candidates = layer.valid & ~recent_mask(layer, state.next_pos, self.recent)
            drop = lowest_mask(score, candidates, jnp.sum(layer.valid, axis=-1) - self.budget)
            return compact_layer(layer, ~drop)

        return map_decode_layers(state, obs, one, "kf_score")

"""Jitted autoregressive generation over the KV state: greedy or temperature / top-k / top-p sampling.

The decode loop is a ``lax.while_loop`` (one compiled program for all steps). A compression hook (``step_hook``)
may transform the state every ``hook_every`` steps (streaming eviction such as StreamingLLM or H2O).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from kvjax.model import Model
from kvjax.state import KVState


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_token(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Next token ``(B,)`` from logits ``(B, V)``."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        cutoff_idx = jnp.sum(cum < cfg.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class GenerateOutput:
    tokens: jax.Array  # (B, max_new_tokens); positions after a stop token hold the stop token
    lengths: jax.Array  # (B,) generated tokens including the stop token
    state: KVState
    prefill_logits: jax.Array  # (B, V) logits after the prompt


def generate(model: Model, params, prompt: jax.Array, state: KVState, *, prompt_mask: jax.Array | None = None,
             max_new_tokens: int = 32, sampling: SamplingConfig = SamplingConfig(), key: jax.Array | None = None,
             stop_tokens: tuple[int, ...] = (), prefill_hook: Callable | None = None,
             step_hook: Callable | None = None, hook_every: int = 1) -> GenerateOutput:
    """Prefills ``prompt`` ``(B, T)`` into ``state`` and decodes ``max_new_tokens`` tokens.

    ``prefill_hook(params, state, observations) -> state`` runs once after prefill (one-shot compression) and
    ``step_hook(state, step_observations) -> state`` every ``hook_every`` decode steps.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    model.check_inputs(prompt, state, prompt_mask)
    for i, layer in enumerate(state.layers):
        if getattr(layer, "ring_start", -1) < 0 and prefill_hook is None and step_hook is None:
            need = int(jnp.max(layer.fill)) + prompt.shape[1] + max_new_tokens
            if need > layer.capacity:
                raise ValueError(f"positions past capacity: layer {i} has {layer.capacity} slots but prompt + "
                                 f"{max_new_tokens} new tokens need {need}")
    if key is None:
        key = jax.random.PRNGKey(0)
    return _generate(model, params, prompt, state, prompt_mask, key, max_new_tokens, sampling, tuple(stop_tokens),
                     prefill_hook, step_hook, hook_every)


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9, 10, 11))
def _generate(model, params, prompt, state, prompt_mask, key, max_new, sampling, stop_tokens, prefill_hook,
              step_hook, hook_every):
    from kvjax.attention import Observe  # noqa: PLC0415

    observe = getattr(prefill_hook, "observe", Observe()) if prefill_hook is not None else Observe()
    logits, state, obs = model.forward_impl(model.cfg, params, prompt, state, prompt_mask, observe=observe,
                                            impl=model.impl, logits="last")
    if prefill_hook is not None:
        state = prefill_hook(params, state, obs)
    b = prompt.shape[0]
    stop = jnp.asarray(stop_tokens, jnp.int32) if stop_tokens else jnp.zeros((0,), jnp.int32)
    step_observe = getattr(step_hook, "observe", Observe()) if step_hook is not None else Observe()

    def body(carry):
        i, tok_logits, st, out, done, lengths, key = carry
        key, sub = jax.random.split(key)
        tok = sample_token(tok_logits, sub, sampling)
        tok = jnp.where(done, out[:, jnp.maximum(i - 1, 0)], tok)
        out = out.at[:, i].set(tok)
        lengths = jnp.where(done, lengths, i + 1)
        done = done | jnp.any(tok[:, None] == stop[None, :], axis=-1)
        lg, st, o = model.forward_impl(model.cfg, params, tok[:, None], st, None, observe=step_observe,
                                       impl=model.impl, logits="last")
        if step_hook is not None:
            st = jax.lax.cond((i + 1) % hook_every == 0, lambda s: step_hook(s, o), lambda s: s, st)
        return i + 1, lg, st, out, done, lengths, key

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < max_new) & ~jnp.all(done)

    out0 = jnp.zeros((b, max_new), jnp.int32)
    init = (jnp.int32(0), logits, state, out0, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), key)
    i, _, state, out, done, lengths, _ = jax.lax.while_loop(cond, body, init)
    # Rows that stopped early: fill the tail with their last token (the stop token).
    last = jnp.take_along_axis(out, jnp.maximum(lengths - 1, 0)[:, None], axis=1)
    out = jnp.where(jnp.arange(max_new)[None] < lengths[:, None], out, last)
    return GenerateOutput(tokens=out, lengths=lengths, state=state, prefill_logits=logits)


jax.tree_util.register_dataclass(GenerateOutput, data_fields=["tokens", "lengths", "state", "prefill_logits"],
                                 meta_fields=[])

"""StreamingLLM — "Efficient Streaming Language Models with Attention Sinks", Xiao et al., arXiv 2309.17453.

Keeps the first ``n_sink`` tokens (attention sinks) and a rolling window of the ``window`` most recent tokens. After
prefill the cache is laid out as ``[sinks | window ring]``: slots ``[0, n_sink)`` are never overwritten and decoded
tokens wrap around the window slots, so the cache never grows (no decode room is needed).

Positions (the paper's "positions within the cache"): with ``reposition=True`` (the paper's setting) the model sees
the cache as if its tokens sat at consecutive positions. kvjax stores keys after RoPE at their original positions, so
the window keys already have their true, in-cache distances to the query; only the sinks are far away. kvjax keeps
the sinks' pre-RoPE keys (``extras["sink_k_pre"]``, ``n_sink`` vectors per head) and, before every decode step,
re-rotates them to position ``i + max(0, t - n_sink - window + 1)`` for query position ``t`` — exactly the distance
``n_sink + window - 1 - i`` the paper assigns. ``reposition=False`` keeps original positions (the "dense with
window" variant most eviction libraries implement). The causal mask always uses original positions.

Defaults: 4 sinks (the paper's choice) and a window of 1020 (a 1024-token cache, as in its perplexity runs). Acts on
global layers only.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.compress.evict import gather_layer, gather_obs, map_decode_layers, map_global_layers, recent_mask, select_keep, sink_mask
from kvjax.rope import inv_frequencies, rerotate_keys


@register
@dataclasses.dataclass(frozen=True)
class StreamingLLM(Method):
    """Attention sinks + recent window (see module docstring)."""

    n_sink: int = 4
    window: int = 1020
    reposition: bool = True
    name: ClassVar[str] = "streaming_llm"
    stacked_decode: ClassVar[bool] = True

    def __post_init__(self):
        check_positive("n_sink", self.n_sink, allow_zero=True)
        check_positive("window", self.window)

    @property
    def budget(self) -> int:
        return self.n_sink + self.window

    def has_decode(self) -> bool:
        return self.reposition

    def _inv_freq(self, cfg):
        return jnp.asarray(inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                           cfg.max_position_embeddings))

    def _place_sinks(self, layer, next_pos, inv_freq):
        s = self.n_sink
        if not s:
            return layer
        spos = layer.pos[:, :, :s]
        is_sink = (spos >= 0) & (spos < s)
        delta = jnp.maximum(0, next_pos - s - self.window + 1)
        rotated = rerotate_keys(layer.extras["sink_k_pre"], spos + delta[:, None, None], inv_freq)
        # Until the window is full no shift is needed: keep the original keys (bit-exact with the full cache).
        move = is_sink & (delta > 0)[:, None, None]
        k = layer.k.at[:, :, :s].set(jnp.where(move[..., None], rotated, layer.k[:, :, :s]))
        return layer.replace(k=k)

    def prefill(self, state, obs, ctx: Context):
        inv_freq = self._inv_freq(ctx.cfg)

        def one(i, layer, o):
            force = sink_mask(layer, self.n_sink) | recent_mask(layer, state.next_pos, self.window)
            idx, keep = select_keep(jnp.zeros(layer.pos.shape), layer.valid, self.budget, force)
            kept = idx.shape[-1]  # the ring must span the whole budget unless prompt + decoding fit without wrapping
            new = gather_layer(layer, idx, keep, max(0, min(self.budget, kept + ctx.decode_room) - kept))
            new = new.replace(ring_start=min(self.n_sink, new.capacity - 1))
            if self.reposition and self.n_sink:
                spos = jnp.maximum(new.pos[:, :, :self.n_sink], 0)
                pre = rerotate_keys(new.k[:, :, :self.n_sink], -spos, inv_freq)  # undo RoPE once
                new = new.replace(extras={**new.extras, "sink_k_pre": pre})
                new = self._place_sinks(new, state.next_pos, inv_freq)
            return new, gather_obs(o, idx, keep, new.capacity - kept)

        return map_global_layers(state, obs, one)

    def decode(self, state, obs, ctx: Context):
        inv_freq = self._inv_freq(ctx.cfg)
        return map_decode_layers(state, obs, lambda i, layer, o: self._place_sinks(layer, state.next_pos, inv_freq),
                                 "sink_k_pre")

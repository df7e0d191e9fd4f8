"""``ScorerMethod``: a one-shot eviction method from a scoring function alone (kvjax's short path to a new method).

Most prompt-eviction methods differ only in how they score the prompt's tokens: SnapKV sums the attention of the last
queries, KnormPress (Devoto et al., arXiv 2406.11430) prefers keys of small L2 norm, TOVA uses the last query's
attention. Subclass :class:`ScorerMethod`, write ``score``, register it, and the rest is shared: the per-layer and
per-head budget, protection of the attention sinks and of the most recent tokens, the top-k gather in temporal order,
free room for the tokens decoded afterwards, observations re-ordered for a later method of a chain, sliding-window
layers left alone, the registry (``get_method``, launch configs) and the budget checks::

    import dataclasses
    from typing import ClassVar
    import jax.numpy as jnp
    from kvjax.compress import ScorerMethod, register

    @register
    @dataclasses.dataclass(frozen=True)
    class KeyNorm(ScorerMethod):
        \"\"\"Keep the keys of smallest L2 norm (KnormPress, arXiv 2406.11430).\"\"\"
        name: ClassVar[str] = "key_norm"

        def score(self, ctx, layer, obs):
            return -jnp.linalg.norm(layer.k, axis=-1)     # (B, Hkv, S): higher = keep

    get_method("key_norm", budget=128)

``score(ctx, layer, obs)`` gets the :class:`~kvjax.compress.base.Context`, one layer's
:class:`~kvjax.state.DenseKV` (``k``, ``v`` ``(B, Hkv, S, D)``, ``pos`` ``(B, Hkv, S)``, ``-1`` = empty) and that
layer's observations (``obs["window"]``: the last ``observe_window`` queries' attention probabilities
``(B, Hq, W, S)``; ``obs["colsum"]``: attention each slot received over the whole prompt ``(B, Hq, S)``), and returns
per-slot scores ``(B, Hkv, S)`` or per query head ``(B, Hq, S)`` (then reduced over each GQA group with
``gqa_reduce``). A method that needs observations sets the class variables ``observe_window`` / ``observe_colsum``.
It must be traceable (jnp only): the transform runs jitted, one program for all layers.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.attention import Observe
from kvjax.compress.base import Context, Method, check_positive
from kvjax.compress.evict import gather_layer, gather_obs, group_to_kv_heads, map_global_layers, recent_mask, \
    select_keep, sink_mask


@dataclasses.dataclass(frozen=True)
class ScorerMethod(Method):
    """One-shot prompt eviction by a per-slot score: subclasses implement :meth:`score` (see module docstring).

    Each KV head of each global layer keeps its ``budget`` highest-scoring slots, always including the first
    ``n_sink`` tokens and the last ``window`` tokens of the prompt, plus ``ctx.decode_room`` free slots.
    """

    budget: int = 256  # kept tokens per layer and KV head (protected ones included)
    window: int = 0  # most recent prompt tokens always kept
    n_sink: int = 0  # first tokens always kept (attention sinks)
    gqa_reduce: str = "mean"  # how per-query-head scores become per-KV-head ones: mean, max or sum
    name: ClassVar[str] = "scorer"
    observe_window: ClassVar[int] = 0  # last-query attention rows the score needs (obs["window"])
    observe_colsum: ClassVar[bool] = False  # accumulated attention the score needs (obs["colsum"])

    def __post_init__(self):
        check_positive("budget", self.budget)
        check_positive("window", self.window, allow_zero=True)
        check_positive("n_sink", self.n_sink, allow_zero=True)
        if self.window + self.n_sink >= self.budget:
            raise ValueError(f"{self.name}: budget ({self.budget}) must exceed window + n_sink "
                             f"({self.window} + {self.n_sink})")
        if self.gqa_reduce not in ("mean", "max", "sum"):
            raise ValueError(f"{self.name}: gqa_reduce must be mean, max or sum, got {self.gqa_reduce!r}")

    def score(self, ctx: Context, layer, obs: dict) -> jnp.ndarray:
        """Per-slot keep scores ``(B, Hkv, S)`` or ``(B, Hq, S)``; higher = keep."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(ctx, layer, obs)")

    def observe(self) -> Observe:
        return Observe(window=self.observe_window, colsum=self.observe_colsum)

    def validate(self, ctx: Context) -> None:
        if ctx.prompt_len and self.window >= ctx.prompt_len:
            raise ValueError(f"{self.name}: window ({self.window}) must be shorter than the prompt "
                             f"({ctx.prompt_len} tokens)")

    def prefill(self, state, obs, ctx: Context):
        def one(i, layer, o):
            b, hkv, c = layer.pos.shape
            s = jnp.asarray(self.score(ctx, layer, o), jnp.float32)
            if s.ndim != 3 or s.shape[0] != b or s.shape[-1] != c or s.shape[1] % hkv:
                raise ValueError(f"{self.name}.score must return (batch, kv heads or query heads, slots) = "
                                 f"({b}, {hkv} or a multiple, {c}), got {s.shape}")
            if s.shape[1] != hkv:
                s = group_to_kv_heads(s, hkv, self.gqa_reduce)
            force = recent_mask(layer, state.next_pos, self.window) if self.window else None
            if self.n_sink:
                sinks = sink_mask(layer, self.n_sink)
                force = sinks if force is None else force | sinks
            idx, keep = select_keep(s, layer.valid, self.budget, force)
            return gather_layer(layer, idx, keep, ctx.decode_room), gather_obs(o, idx, keep, ctx.decode_room)

        return map_global_layers(state, obs, one)

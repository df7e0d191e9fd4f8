"""PyramidKV — "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling", Cai et al.,
arXiv 2406.02069.

SnapKV's scoring (observation-window votes, pooled) with per-layer budgets that shrink linearly from the bottom layer
to the top one ("pyramidal information funneling": attention is broad in low layers and concentrated in high ones).
With ``L`` compressed layers and a uniform budget ``B`` (window ``w`` included) the prefix budgets run from
``max_num = 2 (B - w) - min_num`` at the bottom to ``min_num = (B - w) / beta`` at the top, so that the total equals
the uniform ``L (B - w)``; if ``max_num`` exceeds the prompt's prefix it is clipped to it and ``min_num`` raised to
keep the total. Every layer also keeps its whole observation window.

Defaults follow the authors' code (Zefan-Cai/PyramidKV, ``run_longbench.py``): ``beta = 20``, window 8, pooling
kernel 7, max pooling, a budget of 512 tokens per layer. As there, a prompt no longer than the budget is kept whole and
a prompt shorter than ``2 (B - w)`` tokens gets the uniform SnapKV budget. The schedule is computed from each row's
own prompt length (the valid tokens its cache holds), so a row left-padded in a batch keeps exactly what it keeps
alone; each layer's storage is sized for the longest row. Deviations: the layer budgets are computed
in exact arithmetic and rounded by largest remainder so that the total is exactly the uniform one (the reference
floors the step, which over-allocates up to ``L (L - 1) / 2`` tokens in all); layers are ranked among global layers
(sliding-window layers are left alone); with GQA the votes of the query heads sharing a KV head are averaged.

Sharded (``kvjax.sharding``): the layer budgets depend only on the layer index and the prompt length, so every
shard computes the same allocation; per-head top-k selection reads only its own heads. Results equal the unsharded
run.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from kvjax.compress.base import Context, check_positive, register
from kvjax.compress.evict import gather_layer, gather_obs, map_global_layers, proportional_budgets, select_keep
from kvjax.compress.snapkv import SnapKV


def pyramid_budgets(budget: int, window: int, beta: float, num_layers: int, prompt_len: int) -> list[int]:
    """Total per-layer budgets (window included) for ``num_layers`` layers, bottom first (see module docstring)."""
    if prompt_len <= budget:
        return [prompt_len] * num_layers
    base = budget - window
    if prompt_len < 2 * base or num_layers == 1:
        return [budget] * num_layers
    min_num = base / beta
    max_num = 2 * base - min_num
    if max_num >= prompt_len - window:
        max_num = prompt_len - window
        min_num = 2 * base - max_num
    targets = [max_num - g * (max_num - min_num) / (num_layers - 1) for g in range(num_layers)]
    prefix = proportional_budgets(np.asarray(targets), num_layers * base, prompt_len - window)
    return [int(p) + window for p in prefix]


@functools.lru_cache(maxsize=64)
def budget_table(budget: int, window: int, beta: float, num_layers: int, max_len: int) -> np.ndarray:
    """``(n + 1, num_layers)`` int32: row ``p`` holds :func:`pyramid_budgets` for a prompt of ``p`` tokens, for
    ``p <= n = min(max_len, 2 budget + 1)`` (longer prompts get row ``n``: past ``2 (budget - window) + window`` the
    schedule no longer depends on the length)."""
    n = min(max_len, 2 * budget + 1)
    return np.asarray([pyramid_budgets(budget, window, beta, num_layers, p) for p in range(n + 1)], np.int32)


@register
@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV with pyramidal (linearly decreasing) layer budgets (see module docstring)."""

    budget: int = 512  # average tokens per layer and head, observation window included
    window: int = 8
    kernel: int = 7
    pooling: str = "maxpool"
    beta: float = 20.0
    name: ClassVar[str] = "pyramidkv"
    latent_ok: ClassVar[bool] = False  # not checked on MLA latent caches (SnapKV is)

    def __post_init__(self):
        super().__post_init__()
        check_positive("beta", self.beta)
        if self.beta < 1:
            raise ValueError(f"pyramidkv beta must be >= 1 (the top layer keeps (budget - window) / beta), "
                             f"got {self.beta}")

    def layer_budgets(self, state) -> dict[int, int]:
        """Slots every global layer index needs after prefill: the largest budget any row of the state can get
        (static: depends only on shapes). Each row's own budgets are :meth:`row_budgets`."""
        idx = [i for i, layer in enumerate(state.layers) if not layer.window]
        prompt = max((state.layers[i].capacity for i in idx), default=0)
        table = budget_table(self.budget, self.window, self.beta, len(idx), prompt)
        return dict(zip(idx, table.max(axis=0).tolist()))

    def row_budgets(self, state) -> jnp.ndarray:
        """``(B, L_global)`` budgets from each row's prompt length (valid tokens of its first global layer)."""
        idx = [i for i, layer in enumerate(state.layers) if not layer.window]
        layer = state.layers[idx[0]]
        table = budget_table(self.budget, self.window, self.beta, len(idx), layer.capacity)
        n = jnp.max(jnp.sum(layer.valid, axis=-1, dtype=jnp.int32), axis=1)  # (B,)
        return jnp.asarray(table)[jnp.minimum(n, table.shape[0] - 1)]

    def prefill(self, state, obs, ctx: Context):
        budgets = self.layer_budgets(state)
        rows = self.row_budgets(state)
        which = {i: g for g, i in enumerate(sorted(budgets))}

        def one(i, layer, o):
            score, protect = self.scores(layer, o, state.next_pos)
            idx, keep = select_keep(score, layer.valid, budgets[i], protect, limit=rows[:, which[i]])
            return gather_layer(layer, idx, keep, ctx.decode_room), gather_obs(o, idx, keep, ctx.decode_room)

        return map_global_layers(state, obs, one, per_layer=True)

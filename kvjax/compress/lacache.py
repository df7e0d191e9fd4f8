"""LaCache — "LaCache: Ladder-Shaped KV Caching for Efficient Long-Context Modeling of Large Language Models",
Shi et al., arXiv 2507.14204 (ICML 2025).

A training-free streaming cache of fixed size. Every layer keeps the ``n_sink`` first tokens and the most recent ones
in full; older tokens are compacted block by block in a *ladder*: the region after the sinks is cut into blocks of
``before`` consecutive slots, and in every block layer ``i`` keeps only ``after`` slots, starting at offset
``i mod (before - after + 1)``, so that different layers keep different tokens of the block and the positions covered
by the whole model reach much further back than any single layer's cache. With ``L`` layers, ``span`` and
``overlap`` (how many layers keep one token, and by how many the spans of neighbouring steps overlap)::

    before = 1 + ceil((L - span) / (span - overlap)),  after = min(ceil(span / (span - overlap)), before).

Iterative compaction: whenever a layer holds more than its cache size, the block at a *cursor* is compacted
(``before - after`` slots freed) and the cursor moves on by ``after``; when it reaches ``L`` slots before the end of
the cache it starts over after the sinks, compacting the already-laddered part again (older tokens get sparser and
sparser). The cache size is ``cache_size + floor((before - after) / 2)``, the authors' compensation that matches the
average size of a ladder cache to that of a plain one.

Defaults and rule follow the authors' code (GATECH-EIC/LaCache, ``ppl/lacache/kv_cache.py``, README commands):
``cache_size=256``, ``span=16``, ``overlap=0``, 4 sink tokens; every compaction reduces one token beyond the cache
size, which is the authors' streaming case (one token per step), including their start-over branch. Deviations: the
prompt is prefilled in full and then compacted by replaying that per-token rule over its tokens (the authors stream
the prompt token by token, so its queries see the compacting cache; here only the cache afterwards is the same); the
start-over with more than one pass at once (a single call reducing more tokens than the cache can absorb) does not
occur in the per-token replay; the cursor is kept per batch row (rows of different lengths compact at different
steps); the cache holds one slot more than its size (the token of a decode step is written before the compaction
runs); acts on global layers only, with the layer index counted over all layers (as the authors' list of caches).

Quantization: a per-token quantizer after LaCache (``chain(lacache, int8)`` / ``int4``, residual 0) stores the kept
tokens as packed codes with per-token scales, and the decode-time compaction moves each token's codes, scales and
zeros with it (``kvjax.nbytes`` = the quantized cache of ``cache_size + 1`` slots). Quantizers that group tokens
(KIVI's per-channel keys, a full-precision residual window) cannot follow a cache that drops single tokens out of
every block and are refused when the chain is built. The paper does not combine LaCache with quantization; the
ladder is applied first (on float states, as the authors do) and the kept tokens are quantized, new tokens on arrival.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.compress.evict import gather_layer, gather_obs, map_decode_layers, map_global_layers
from kvjax.state import DenseKV

CURSOR = "lacache_cursor"


def ladder_geometry(n_layers: int, span: int, overlap: int) -> tuple[int, int]:
    """``(before, after)``: slots of a ladder block before compaction and slots one layer keeps of it."""
    before = 1 + math.ceil((n_layers - span) / (span - overlap))
    return before, min(math.ceil(span / (span - overlap)), before)


def ladder_step(cursor, layer_index, capacity: int, *, before: int, after: int, n_sink: int, cache_size: int,
                n_layers: int, xp=jnp):
    """One compaction of a layer holding ``cache_size + 1`` tokens (slots in temporal order).

    ``cursor`` (any shape, ints) is where the next block starts. Returns ``src`` (``cursor.shape + (capacity,)``): the
    old slot each new slot takes (``>= capacity`` where the slot becomes empty), and the new cursor. A cursor too close
    to the end (fewer than ``after`` slots left before the last ``n_layers`` ones) starts over after the sinks."""
    can = before - after
    cursor = xp.asarray(cursor)
    start_over = cache_size - cursor - n_layers < after
    c = xp.where(start_over, n_sink, cursor)[..., None]
    off = (xp.asarray(layer_index) % (can + 1))
    off = xp.reshape(off, xp.shape(off) + (1,) * (c.ndim - xp.ndim(off)))
    s = xp.arange(capacity)
    src = xp.where(s < c, s, xp.where(s < c + after, s + off, s + can))
    return src, c[..., 0] + after


def ladder_positions(positions: np.ndarray, n_layers: int, layer_index: int, *, before: int, after: int,
                     n_sink: int, cache_size: int) -> tuple[np.ndarray, int]:
    """The positions one layer keeps after streaming ``positions`` (in order) through a LaCache of ``cache_size``
    (compacting whenever it holds one more), and the final cursor. Host-side replay of :func:`ladder_step`."""
    kept = np.asarray(positions[:cache_size])
    cursor = n_sink
    for p in positions[cache_size:]:
        kept = np.append(kept, p)
        if kept.size <= cache_size:  # a compaction frees before - after slots: not needed at every token
            continue
        src, cursor = ladder_step(cursor, layer_index, cache_size + 1, before=before, after=after, n_sink=n_sink,
                                  cache_size=cache_size, n_layers=n_layers, xp=np)
        kept = kept[src[src < kept.size]]
        cursor = int(cursor)
    return kept, cursor


@functools.lru_cache(maxsize=4096)
def _ladder_of_length(n: int, n_layers: int, layer_index: int, **kw) -> tuple[np.ndarray, int]:
    """:func:`ladder_positions` of a stream of ``n`` tokens (the same for every row and head of that length: replayed
    once per length and layer, not per head). The returned array is read-only (shared by the cache)."""
    kept, cursor = ladder_positions(np.arange(n), n_layers, layer_index, **kw)
    kept.setflags(write=False)
    return kept, cursor


def slot_fields(layer) -> tuple[str, ...]:
    """The arrays of ``layer`` indexed by slot ``(B, H, C, ...)`` that a compaction moves with the positions: a dense
    layer's keys and values, or a per-token quantized layer's codes, scales and zeros (every token quantized on its
    own, so a token's codes move alone)."""
    if isinstance(layer, DenseKV):
        return ("k", "v")
    spec = getattr(layer, "spec", None)
    if spec is not None and spec.k_axis == "token" and layer.residual == 0 and layer.keep is None:
        return ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
    raise ValueError(f"lacache cannot compact a {type(layer).__name__} layer token by token (only dense layers and "
                     "per-token int8/int4 layers without a residual window)")


@register
@dataclasses.dataclass(frozen=True)
class LaCache(Method):
    """Ladder-shaped streaming cache with iterative compaction (see module docstring)."""

    cache_size: int = 256  # tokens per layer and head (before the authors' compensation)
    span: int = 16
    overlap: int = 0
    n_sink: int = 4  # the authors' start_size
    name: ClassVar[str] = "lacache"
    stacked_decode: ClassVar[bool] = True
    decodes_quantized: ClassVar[bool] = True  # compacts per-token int8/int4 caches of a later quantizer too
    jittable: ClassVar[bool] = False  # the prompt's ladder is replayed on the host

    @property
    def budget(self) -> int:
        """Tokens per layer and head (the authors' compensation adds ``floor((before - after) / 2)``)."""
        return self.cache_size

    def __post_init__(self):
        check_positive("lacache cache_size", self.cache_size)
        check_positive("lacache span", self.span)
        check_positive("lacache n_sink", self.n_sink, allow_zero=True)
        if not 0 <= self.overlap < self.span:
            raise ValueError(f"lacache overlap must be in [0, span={self.span}), got {self.overlap}")

    def geometry(self, n_layers: int) -> tuple[int, int, int]:
        """``(before, after, cache size after the authors' compensation)`` for a model of ``n_layers`` layers."""
        before, after = ladder_geometry(n_layers, self.span, self.overlap)
        return before, after, self.cache_size + (before - after) // 2

    def validate(self, ctx: Context) -> None:
        n = ctx.cfg.num_layers
        before, after, size = self.geometry(n)
        if before <= after:
            raise ValueError(f"lacache span={self.span} (overlap {self.overlap}) covers all {n} layers: a ladder block "
                             f"of {before} slot(s) keeps {after}, nothing to compact; use span < {n}")
        if size < self.n_sink + n + after:
            raise ValueError(f"lacache cache_size={self.cache_size} is too small for {self.n_sink} sinks and the "
                             f"{n}-layer ladder; use at least {self.n_sink + n + after - (before - after) // 2}")

    def check_followers(self, later) -> None:
        for m in later:
            if m.kind != "quantized":
                continue
            spec = m.spec() if hasattr(m, "spec") else None
            if spec is None or spec.k_axis != "token" or spec.residual != 0:
                raise ValueError(f"lacache compacts its cache token by token while decoding; a quantizer after it must "
                                 f"quantize every token on its own (int8 / int4 with residual=0), got {m.describe()}")

    def _kw(self, ctx: Context) -> dict:
        before, after, size = self.geometry(ctx.cfg.num_layers)
        return dict(before=before, after=after, n_sink=self.n_sink, cache_size=size)

    def prefill(self, state, obs, ctx: Context):
        self.validate(ctx)
        kw = self._kw(ctx)
        size, n_layers = kw["cache_size"], ctx.cfg.num_layers
        counts = np.asarray(state.layers[0].valid).sum(-1).max(-1) if state.layers else np.zeros(0)

        def one(i, layer, o):
            if not isinstance(layer, DenseKV) or layer.ring_start >= 0:
                raise ValueError(f"lacache needs plain dense layers, got a {type(layer).__name__} in layer {i}")
            pos, valid = np.asarray(layer.pos), np.asarray(layer.valid)
            b, h, _ = pos.shape
            n_keep = min(size, int(valid.sum(-1).max()))
            idx = np.zeros((b, h, max(n_keep, 1)), np.int32)
            keep = np.zeros(idx.shape, bool)
            cursor = np.full((b, h), self.n_sink, np.int32)
            for r in range(b):
                for hh in range(h):
                    slots = np.nonzero(valid[r, hh])[0]
                    slots = slots[np.argsort(pos[r, hh, slots], kind="stable")]
                    kept, cur = _ladder_of_length(slots.size, n_layers, i, **kw)
                    idx[r, hh, :kept.size], keep[r, hh, :kept.size] = slots[kept], True
                    cursor[r, hh] = cur
            grow = int(counts.max()) + ctx.decode_room if counts.size else ctx.decode_room
            cap = size + 1 if grow > size else grow
            room = max(0, cap - idx.shape[-1])
            new = gather_layer(layer, jnp.asarray(idx), jnp.asarray(keep), room)
            new = new.replace(extras={**new.extras, CURSOR: jnp.asarray(cursor)})
            return new, gather_obs(o, jnp.asarray(idx), jnp.asarray(keep), room)

        return map_global_layers(state, obs, one, per_layer=True)

    def decode(self, state, obs, ctx: Context):
        kw = self._kw(ctx)
        n_layers = ctx.cfg.num_layers

        def one(i, layer, o):
            cap = layer.capacity
            full = layer.fill > kw["cache_size"]  # (B, H): the step's token made the layer one too many
            src, cursor = ladder_step(layer.extras[CURSOR], i, cap, n_layers=n_layers, **kw)
            src = jnp.where(full[..., None], src, jnp.arange(cap))
            ok = src < cap
            srcc = jnp.minimum(src, cap - 1)
            take = lambda x: jnp.take_along_axis(x, srcc.reshape(srcc.shape + (1,) * (x.ndim - 3)), axis=2)  # noqa
            can = kw["before"] - kw["after"]
            moved = {f: take(getattr(layer, f)) for f in slot_fields(layer)}
            return layer.replace(**moved, pos=jnp.where(ok, take(layer.pos), -1),
                                 fill=jnp.where(full, layer.fill - can, layer.fill),
                                 extras={**layer.extras, CURSOR: jnp.where(full, cursor, layer.extras[CURSOR])})

        return map_decode_layers(state, obs, one, CURSOR)

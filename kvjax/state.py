"""The KV state: one explicit, immutable pytree holding every layer's cache.

Layout (see ``docs/design.md`` for how each compression family maps onto it):

* :class:`DenseKV` — one layer's cache in float storage.
  ``k``: ``(B, Hkv, C, Dk)``, ``v``: ``(B, Hkv, C, Dv)``, ``pos``: ``(B, Hkv, C)`` int32 original token position of
  every slot (``-1`` = empty or padding, i.e. invalid), ``fill``: ``(B, Hkv)`` int32 number of slots written so far
  (the next write goes to slot ``fill`` — or, for ring layers, wraps around), ``extras``: a dict of per-method arrays
  (accumulated attention, scores...). Keys are stored *after* RoPE, at their original positions.
  Static fields: ``window`` (sliding attention window of the layer, 0 = global) and ``ring_start`` (``-1``: a plain
  buffer that must not overflow; ``r >= 0``: once full, writes wrap around slots ``[r, C)``, keeping slots ``[0, r)``
  — attention sinks — forever; Gemma's local layers use ``r = 0``).
* :class:`KVState` — ``layers`` (a tuple, one cache per layer; layers may differ in capacity and type, e.g. a
  quantized cache class), ``next_pos`` ``(B,)`` the original position of the next token of each sequence, and
  ``rope_shift`` ``(B,)`` subtracted from positions before RoPE is applied to new tokens (0 except for methods that
  re-assign positions within the cache, like StreamingLLM).

Every function here is pure: it returns a new state.
"""
from __future__ import annotations

import functools
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array


@runtime_checkable
class LayerCache(Protocol):
    """What every per-layer cache class provides (dense, quantized, low-rank ...)."""

    pos: Array
    fill: Array

    @property
    def capacity(self) -> int: ...

    def append(self, k: Array, v: Array, pos: Array) -> "LayerCache": ...

    def dense(self) -> tuple[Array, Array]: ...


@struct.dataclass
class DenseKV:
    """One layer's float KV cache (see module docstring)."""

    k: Array
    v: Array
    pos: Array
    fill: Array
    extras: dict[str, Array] = struct.field(default_factory=dict)
    window: int = struct.field(pytree_node=False, default=0)
    ring_start: int = struct.field(pytree_node=False, default=-1)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def valid(self) -> Array:
        return self.pos >= 0

    def dense(self) -> tuple[Array, Array]:
        """Keys and values as float arrays ``(B, Hkv, C, D)``."""
        return self.k, self.v

    def write_slots(self, n_new: int) -> Array:
        """Slot indices ``(B, Hkv, n_new)`` where the next ``n_new`` tokens go."""
        t = self.fill[..., None] + jnp.arange(n_new, dtype=jnp.int32)
        if self.ring_start < 0:
            return t
        r = self.ring_start
        span = self.capacity - r
        return jnp.where(t < self.capacity, t, r + (t - r) % span)

    def append(self, k: Array, v: Array, pos: Array) -> "DenseKV":
        """Writes ``n`` new tokens: ``k``/``v`` ``(B, Hkv, n, D)``, ``pos`` ``(B, n)`` (``-1`` = padding).

        A plain buffer stores padding tokens too (as invalid slots). A ring layer stores only real tokens, so that
        padding never displaces keys still inside the window, and of a chunk longer than the ring only the last
        ``capacity - ring_start`` real tokens of each row (earlier ones would be overwritten within the chunk).
        """
        n = k.shape[2]
        if self.ring_start < 0:
            slots = self.write_slots(n)
            added = jnp.full(self.fill.shape, n, jnp.int32)
        else:
            real = pos >= 0
            rank = jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1
            n_real = jnp.sum(real, axis=1, dtype=jnp.int32)
            span = self.capacity - self.ring_start
            keep = real & (rank >= n_real[:, None] - span)
            t = self.fill[..., None] + rank[:, None, :]
            slots = jnp.where(t < self.capacity, t, self.ring_start + (t - self.ring_start) % span)
            slots = jnp.where(keep[:, None, :], slots, self.capacity)  # out of range: dropped by the scatter
            added = jnp.broadcast_to(n_real[:, None], self.fill.shape)
        pos_h = jnp.broadcast_to(pos[:, None, :], slots.shape).astype(jnp.int32)
        scatter = jax.vmap(jax.vmap(lambda buf, idx, new: buf.at[idx].set(new, mode="drop")))
        return self.replace(
            k=scatter(self.k, slots, k.astype(self.k.dtype)),
            v=scatter(self.v, slots, v.astype(self.v.dtype)),
            pos=scatter(self.pos, slots, pos_h),
            fill=self.fill + added,
        )


@struct.dataclass
class KVState:
    """The whole model's KV state (see module docstring)."""

    layers: tuple[Any, ...]
    next_pos: Array
    rope_shift: Array

    @property
    def batch_size(self) -> int:
        return self.next_pos.shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def replace_layer(self, i: int, layer: Any) -> "KVState":
        layers = list(self.layers)
        layers[i] = layer
        return self.replace(layers=tuple(layers))


@struct.dataclass
class StackedLayers:
    """Identical per-layer pytrees stacked along a new leading axis (one cache or one params dict per layer).

    Models run a ``lax.scan`` over such a stack instead of unrolling the layers, which makes compile time
    independent of depth. :func:`stack_layers` / :meth:`unstack` convert from/to the tuple form the rest of kvjax uses;
    the jitted decode loop keeps the cache stacked across steps.
    """

    tree: Any

    def __len__(self) -> int:
        return jax.tree_util.tree_leaves(self.tree)[0].shape[0]

    def unstack(self) -> tuple:
        return tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], self.tree) for i in range(len(self)))


def stackable(layers) -> bool:
    """True when every element of ``layers`` has the same pytree structure, static fields, shapes and dtypes."""
    if isinstance(layers, StackedLayers):
        return True
    if len(layers) < 2:
        return False
    first = jax.tree_util.tree_structure(layers[0])
    sig = [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(layers[0])]
    for layer in layers[1:]:
        if jax.tree_util.tree_structure(layer) != first:
            return False
        if [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(layer)] != sig:
            return False
    return True


def stack_layers(layers) -> StackedLayers:
    if isinstance(layers, StackedLayers):
        return layers
    return StackedLayers(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers))


def _slot_aligned(layer: DenseKV, x: Array) -> bool:
    return x.ndim >= 3 and x.shape[:2] == layer.pos.shape[:2] and x.shape[2] == layer.capacity


def _fit_axis(x, capacity: int, axis: int, value=0, xp=jnp):
    """``x`` cut or padded (with ``value``) along ``axis`` to ``capacity``; ``xp`` is ``jnp`` or ``numpy``."""
    axis = axis % x.ndim
    if x.shape[axis] >= capacity:
        return x[(slice(None),) * axis + (slice(0, capacity),)]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, capacity - x.shape[axis])
    return xp.pad(x, pad, constant_values=value)


def resize_slots(layer: DenseKV, capacity: int, xp=jnp) -> DenseKV:
    """``layer`` with ``capacity`` slots: padded with empty slots (pos -1) or cut (slot-aligned extras follow).
    With ``xp=numpy`` on a layer of numpy arrays it runs on the host (no XLA program per distinct size)."""
    fit = functools.partial(_fit_axis, capacity=capacity, axis=2, xp=xp)
    extras = {n: fit(x) if _slot_aligned(layer, x) else x for n, x in layer.extras.items()}
    return layer.replace(k=fit(layer.k), v=fit(layer.v), pos=fit(layer.pos, value=-1), extras=extras)


def resize_obs(obs: dict, capacity: int, xp=jnp) -> dict:
    """A layer's observations (``colsum`` / ``window``: slot axis last) cut or zero-padded to ``capacity`` slots."""
    return {n: (_fit_axis(x, capacity, -1, xp=xp) if n in ("colsum", "window") else x) for n, x in obs.items()}


def pad_stack(layers) -> tuple[StackedLayers, tuple[int, ...]] | None:
    """Stacks plain (non-ring) dense layers that differ only in capacity (PyramidKV, CAKE, D2O, AdaKV leave such
    caches) by padding each to the largest capacity with empty slots; ``None`` if they differ otherwise.

    Returns the stack and the original capacities for :func:`unpad_unstack`. Padding slots are invalid, so attention
    over the padded stack equals attention over each layer; only compute, not the state's bytes, grows.
    """
    if len(layers) < 2 or not all(type(l) is DenseKV and l.ring_start < 0 for l in layers):
        return None
    caps = tuple(l.capacity for l in layers)
    cmax = max(caps)
    shapes = [jax.eval_shape(functools.partial(resize_slots, capacity=cmax), l) for l in layers]
    if not stackable(shapes):
        return None
    return stack_layers([resize_slots(l, cmax) for l in layers]), caps


def unpad_unstack(stacked: StackedLayers, caps: tuple[int, ...]) -> tuple:
    """Inverse of :func:`pad_stack`: the layers back at their own capacities (tokens decoded meanwhile included, as
    long as each layer had room for them, which compression methods guarantee)."""
    return tuple(resize_slots(l, c) for l, c in zip(stacked.unstack(), caps))


def init_dense_layer(batch: int, num_kv_heads: int, capacity: int, head_dim: int, dtype=jnp.float32, *,
                     v_head_dim: int | None = None, window: int = 0, ring_start: int = -1) -> DenseKV:
    """An empty :class:`DenseKV` of ``capacity`` slots."""
    if capacity <= 0:
        raise ValueError(f"cache capacity must be positive, got {capacity}")
    dv = head_dim if v_head_dim is None else v_head_dim
    return DenseKV(
        k=jnp.zeros((batch, num_kv_heads, capacity, head_dim), dtype),
        v=jnp.zeros((batch, num_kv_heads, capacity, dv), dtype),
        pos=jnp.full((batch, num_kv_heads, capacity), -1, jnp.int32),
        fill=jnp.zeros((batch, num_kv_heads), jnp.int32),
        window=int(window),
        ring_start=int(ring_start),
    )


def init_state(cfg, batch: int, capacity: int, dtype=jnp.float32, *, local_ring: bool = True) -> KVState:
    """An empty full-precision KV state for model config ``cfg``.

    ``capacity`` is the number of slots of every global layer. Layers with a sliding window (Gemma 3 local layers,
    Mistral) get a ring buffer of ``min(window, capacity)`` slots when ``local_ring`` is true — they never need more.
    """
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    layers = []
    for i in range(cfg.num_layers):
        w = cfg.layer_window(i)
        if w and local_ring and w < capacity:
            layers.append(init_dense_layer(batch, cfg.num_kv_heads, w, cfg.head_dim, dtype, window=w, ring_start=0))
        else:
            layers.append(init_dense_layer(batch, cfg.num_kv_heads, capacity, cfg.head_dim, dtype, window=w))
    return KVState(layers=tuple(layers), next_pos=jnp.zeros((batch,), jnp.int32),
                   rope_shift=jnp.zeros((batch,), jnp.int32))


def nbytes(tree: Any) -> int:
    """The real number of bytes of all arrays held in ``tree`` (a KV state, a layer, params ...).

    Counts every leaf — data, positions, masks, scales, method statistics — at its stored dtype.
    """
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "nbytes"):
            total += int(leaf.nbytes)
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def kv_nbytes(tree: Any) -> int:
    """Bytes of the key/value payload alone (plus quantization scales, factors), excluding bookkeeping.

    Bookkeeping = ``pos``, ``fill``, ``next_pos``, ``rope_shift``: int32 arrays every cache carries whatever its
    compression; reported separately so compression ratios compare the payload.
    """
    total = nbytes(tree)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = getattr(path[-1], "name", getattr(path[-1], "key", None))
        if name in ("pos", "fill", "next_pos", "rope_shift"):
            total -= int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total

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

import dataclasses
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
class RaggedKV:
    """One layer's float cache whose heads hold different numbers of tokens, stored without padding.

    Per batch row, one flat buffer of all heads' tokens (as varlen / paged attention store them): head ``h`` owns the
    segment ``[offsets[:, h], offsets[:, h + 1])`` of the flat slot axis; its first ``fill[:, h]`` slots are written
    (kept tokens, then decoded ones), the rest of the segment is that head's decode room.

    * ``k`` ``(B, N, Dk)``, ``v`` ``(B, N, Dv)``: keys (post-RoPE, at original positions) and values;
    * ``pos`` ``(B, N)`` int32: original position of every flat slot, ``-1`` = empty / padding;
    * ``offsets`` ``(B, H + 1)`` int32: segment boundaries (non-decreasing, ``offsets[:, 0] = 0``,
      ``offsets[:, H] <= N``; rows whose segments sum to less than ``N`` leave the tail unused);
    * ``fill`` ``(B, H)`` int32: slots written per head (the next token of head ``h`` goes to flat slot
      ``offsets[:, h] + fill[:, h]``; a head whose segment is full drops further tokens, as a full plain
      :class:`DenseKV` does — compression methods size the room so that this never happens);
    * ``extras``: per-method arrays, per head ``(B, H, ...)`` or flat-slot-aligned ``(B, N, ...)``;
    * optional weighted slots: ``weight_slot`` ``(B, H)`` int32 (a flat slot of each head, ``-1`` = none) and
      ``log_weight`` ``(B, H)`` f32: that slot stands for ``exp(log_weight)`` tokens and counts that many times in
      the softmax (RazorAttention's compensation token: the mean of ``n`` dropped tokens, weighted by ``n``);
    * static ``window`` (sliding window, 0 = global) and ``max_len``: the largest segment of any row and head, the
      capacity of the padded view :meth:`to_dense` and the loop bound of the ragged decode kernel. It only sizes
      computations, never storage.

    ``kvjax.nbytes`` of a ragged layer is therefore the bytes of the tokens it holds plus their decode room, their
    positions and the ``(B, H + 1)`` offsets: nothing is padded to the largest head. :meth:`to_dense` /
    :func:`ragged_from_dense` convert exactly to and from the padded :class:`DenseKV` (``to_dense`` slot ``j`` of
    head ``h`` is flat slot ``offsets[:, h] + j``); observations of a ragged layer (``colsum``, ``window``) are given
    in that padded view's slot order. Attention: the jnp reference attends over the padded view; ``impl="pallas"``
    decode steps run ``pallas_kernels.ragged_decode_attention``, which reads only each head's segment of the flat
    buffer.
    """

    k: Array
    v: Array
    pos: Array
    offsets: Array
    fill: Array
    extras: dict[str, Array] = struct.field(default_factory=dict)
    weight_slot: Array | None = None
    log_weight: Array | None = None
    window: int = struct.field(pytree_node=False, default=0)
    max_len: int = struct.field(pytree_node=False, default=1)
    ring_start = -1  # never a ring buffer (class attribute, so ``getattr(layer, "ring_start", -1)`` works)

    @property
    def num_heads(self) -> int:
        return self.fill.shape[1]

    @property
    def capacity(self) -> int:
        """Slots of the largest head segment (the padded view's capacity); see :attr:`head_capacity`."""
        return self.max_len

    @property
    def flat_size(self) -> int:
        return self.k.shape[1]

    @property
    def head_capacity(self) -> Array:
        """``(B, H)`` slots of every head's segment (written tokens plus decode room)."""
        return self.offsets[:, 1:] - self.offsets[:, :-1]

    @property
    def starts(self) -> Array:
        return self.offsets[:, :-1]

    @property
    def valid(self) -> Array:
        """``(B, N)``: flat slots holding a token."""
        return self.pos >= 0

    def slot_head(self) -> Array:
        """``(B, N)`` int32: the head owning every flat slot (``H`` for the unused tail)."""
        n = jnp.arange(self.flat_size, dtype=jnp.int32)
        return jnp.sum(n[None, None, :] >= self.offsets[:, 1:, None], axis=1, dtype=jnp.int32)

    def view_index(self) -> tuple[Array, Array]:
        """Flat slot of every padded-view slot ``(B, H, max_len)`` and whether it is written (``j < fill``)."""
        j = jnp.arange(self.max_len, dtype=jnp.int32)
        idx = self.starts[..., None] + j
        ok = (j < jnp.minimum(self.fill, self.head_capacity)[..., None]) & (idx < self.flat_size)
        return jnp.clip(idx, 0, self.flat_size - 1), ok

    def view_bias(self) -> Array | None:
        """``(B, H, max_len)`` log-multiplicities of the padded view's slots (``None`` without weighted slots)."""
        if self.weight_slot is None:
            return None
        idx, ok = self.view_index()
        hit = ok & (idx == self.weight_slot[..., None])
        return jnp.where(hit, self.log_weight[..., None].astype(jnp.float32), 0.0)

    def to_dense(self, strict: bool = True) -> DenseKV:
        """The padded :class:`DenseKV` holding the same tokens: head ``h``'s segment in slots ``[0, max_len)``.

        A layer with weighted slots has no exact dense equivalent (a dense cache counts every slot once): that
        raises unless ``strict=False`` (inspection, tests), which drops the weights."""
        if strict and self.weight_slot is not None:
            raise ValueError("this ragged layer has weighted slots (e.g. RazorAttention's compensation tokens); a "
                             "dense cache would count them once. Chain it with methods that keep ragged layers, or "
                             "build it without weights (razor: count_weight=False)")
        idx, ok = self.view_index()

        def gather(x, fill_value=0):
            g = jnp.take_along_axis(x[:, None], idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=2) \
                if x.ndim > 2 else jnp.take_along_axis(x[:, None, :], idx, axis=2)
            return jnp.where(ok.reshape(ok.shape + (1,) * (g.ndim - 3)), g, fill_value).astype(x.dtype)

        extras = {n: (gather(x) if _flat_aligned(self, x) else x) for n, x in self.extras.items()}
        return DenseKV(k=gather(self.k), v=gather(self.v), pos=gather(self.pos, -1), fill=self.fill, extras=extras,
                       window=self.window, ring_start=-1)

    def dense(self) -> tuple[Array, Array]:
        """Keys and values of the padded view ``(B, H, max_len, D)`` (aligned with ``to_dense().pos``)."""
        return self.to_dense(strict=False).dense()

    def append(self, k: Array, v: Array, pos: Array) -> "RaggedKV":
        """Writes ``n`` new tokens (``k``/``v`` ``(B, H, n, D)``, ``pos`` ``(B, n)``, ``-1`` = padding, stored as an
        invalid slot like a plain dense buffer does) after every head's written slots, inside its segment."""
        b, h, n = k.shape[:3]
        j = jnp.arange(n, dtype=jnp.int32)
        t = self.fill[..., None] + j  # (B, H, n) index within the segment
        slot = jnp.where(t < self.head_capacity[..., None], self.starts[..., None] + t, self.flat_size)
        slot = slot.reshape(b, h * n)
        pos_h = jnp.broadcast_to(pos[:, None, :], (b, h, n)).reshape(b, h * n).astype(jnp.int32)
        scatter = jax.vmap(lambda buf, idx, new: buf.at[idx].set(new, mode="drop"))
        return self.replace(
            k=scatter(self.k, slot, k.reshape(b, h * n, -1).astype(self.k.dtype)),
            v=scatter(self.v, slot, v.reshape(b, h * n, -1).astype(self.v.dtype)),
            pos=scatter(self.pos, slot, pos_h),
            fill=self.fill + n,
        )

    def attend(self, q: Array, q_pos: Array, *, sm_scale: float | None = None, softcap: float = 0.0,
               observe=None, impl: str = "reference") -> tuple[Array, dict]:
        """Attention of ``q`` ``(B, Hq, T, D)`` over the layer. ``impl="pallas"`` decode steps (``T <= 16``, no
        observations) read the flat buffer with the ragged Pallas kernel; otherwise the jnp reference attends over
        the padded view (observations in its slot order)."""
        from kvjax.attention import Observe, reference_attention  # noqa: PLC0415 (attention imports state)

        observe = Observe() if observe is None else observe
        if impl not in ("reference", "pallas"):
            raise ValueError(f"unknown attention impl {impl!r}; choose 'reference' or 'pallas'")
        if impl == "pallas" and not observe and q.shape[2] <= 16:
            from pallas_kernels.ragged_decode_attention import ragged_decode_attention  # noqa: PLC0415

            lengths = jnp.minimum(self.fill, self.head_capacity)
            out = ragged_decode_attention(q, self.k, self.v, self.pos, q_pos, self.starts, lengths,
                                          max_len=self.max_len, sm_scale=sm_scale, window=self.window,
                                          logit_softcap=softcap, weight_slot=self.weight_slot,
                                          log_weight=self.log_weight)
            return out, {}
        view = self.to_dense(strict=False)
        return reference_attention(q, view.k, view.v, q_pos, view.pos, sm_scale=sm_scale, window=self.window,
                                   softcap=softcap, observe=observe, bias=self.view_bias())


@struct.dataclass
class LatentKV:
    """One layer's cache of a multi-head latent attention (MLA) model: per token, the joint key/value latent and the
    decoupled RoPE key shared by all heads (DeepSeek-V2, arXiv 2405.04434; the layout TransMLA, arXiv 2502.07864, and
    X-EcoMLA, arXiv 2503.11132, upcycle GQA models into).

    * ``c`` ``(B, 1, C, d_latent)``: the latent ``c = h @ W_dkv`` of every slot (keys and values of every head are
      linear up-projections of it; the attention absorbs them into the query and output sides, so the latent is never
      expanded per step, see :mod:`kvjax.models.mla`);
    * ``kr`` ``(B, 1, C, d_rope)``: the decoupled RoPE key (``mla_rope_heads`` chunks of ``head_dim``, stored after RoPE
      at original positions, like :class:`DenseKV` keys);
    * ``pos`` ``(B, 1, C)`` int32 original positions (``-1`` = empty / padding), ``fill`` ``(B, 1)``, ``extras``.

    The axis of size 1 is the single shared "KV head" of the latent: with it, every slot-indexed helper of kvjax
    (positions ``(B, Hkv, C)``, eviction's top-k / gather, ``valid_nbytes``) applies to the latent unchanged, and an
    eviction method keeps one selection of tokens shared by all query heads. ``kvjax.nbytes`` counts ``c``, ``kr``,
    ``pos``, ``fill`` at their dtypes: the honest size of an MLA cache. Never a ring buffer (no sliding windows).
    """

    c: Array
    kr: Array
    pos: Array
    fill: Array
    extras: dict[str, Array] = struct.field(default_factory=dict)
    window: int = struct.field(pytree_node=False, default=0)
    ring_start = -1  # class attribute: never a ring buffer

    @property
    def capacity(self) -> int:
        return self.c.shape[2]

    @property
    def valid(self) -> Array:
        return self.pos >= 0

    def append(self, c: Array, kr: Array, pos: Array) -> "LatentKV":
        """Writes ``n`` new tokens: latents ``c`` ``(B, 1, n, d_latent)``, RoPE keys ``kr`` ``(B, 1, n, d_rope)``,
        ``pos`` ``(B, n)`` (``-1`` = padding, stored as an invalid slot as a plain :class:`DenseKV` does)."""
        n = c.shape[2]
        slots = self.fill[..., None] + jnp.arange(n, dtype=jnp.int32)
        pos_h = jnp.broadcast_to(pos[:, None, :], slots.shape).astype(jnp.int32)
        scatter = jax.vmap(jax.vmap(lambda buf, idx, new: buf.at[idx].set(new, mode="drop")))
        return self.replace(c=scatter(self.c, slots, c.astype(self.c.dtype)),
                            kr=scatter(self.kr, slots, kr.astype(self.kr.dtype)),
                            pos=scatter(self.pos, slots, pos_h), fill=self.fill + n)

    def gather(self, idx: Array, keep: Array, room: int = 0) -> "LatentKV":
        """A compacted layer holding slots ``idx`` ``(B, 1, K)`` (``keep`` False = empty) plus ``room`` free slots
        (what eviction methods do to a :class:`DenseKV` with ``kvjax.compress.evict.gather_layer``)."""

        def take(x, value=0):
            g = jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 3)), axis=2)
            g = jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 3)), g, value).astype(x.dtype)
            pad = [(0, 0)] * x.ndim
            pad[2] = (0, room)
            return jnp.pad(g, pad, constant_values=value)

        c = self.capacity
        extras = {n: take(x) if x.ndim >= 3 and x.shape[:3] == self.pos.shape[:2] + (c,) else x
                  for n, x in self.extras.items()}
        return LatentKV(c=take(self.c), kr=take(self.kr), pos=take(self.pos, -1),
                        fill=jnp.sum(keep, axis=-1, dtype=jnp.int32), extras=extras, window=self.window)

    def dense(self) -> tuple[Array, Array]:
        raise TypeError("a LatentKV (MLA) layer holds no per-head keys/values: its keys and values are up-projections "
                        "of the latent (kvjax.models.mla.expand_latent(params_layer, layer) gives them); methods that "
                        "read float keys/values cannot run on an MLA cache")


def init_latent_layer(batch: int, capacity: int, kv_rank: int, rope_dim: int, dtype=jnp.float32) -> LatentKV:
    """An empty :class:`LatentKV` of ``capacity`` slots."""
    if capacity <= 0:
        raise ValueError(f"cache capacity must be positive, got {capacity}")
    return LatentKV(c=jnp.zeros((batch, 1, capacity, kv_rank), dtype), kr=jnp.zeros((batch, 1, capacity, rope_dim), dtype),
                    pos=jnp.full((batch, 1, capacity), -1, jnp.int32), fill=jnp.zeros((batch, 1), jnp.int32))


def _flat_aligned(layer: RaggedKV, x: Array) -> bool:
    return x.ndim >= 2 and x.shape[:2] == layer.pos.shape


def ragged_from_dense(layer: DenseKV, room: int = 0, *, size: int | None = None, max_len: int | None = None
                      ) -> RaggedKV:
    """A :class:`RaggedKV` holding the tokens of a compacted plain :class:`DenseKV` (each head's tokens in its slots
    ``[0, fill)``, as the eviction helpers leave them), every head given ``room`` more slots for decoding.

    ``size`` (flat slots per row) and ``max_len`` (largest segment) default to their exact values when ``layer`` is
    concrete (the sizes are then found on the host), and to the static bounds ``H * (C + room)`` / ``C + room`` when
    traced. Slot-aligned ``extras`` ``(B, H, C, ...)`` move with the tokens; other extras are kept as they are.
    """
    if getattr(layer, "ring_start", -1) >= 0:
        raise ValueError("cannot store a ring-buffer (sliding-window or StreamingLLM) layer as a ragged layer")
    if room < 0:
        raise ValueError(f"decode room must be >= 0, got {room}")
    b, h, c = layer.pos.shape
    cap = jnp.minimum(layer.fill, c) + room  # (B, H) segment sizes
    offsets = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.cumsum(cap, axis=1, dtype=jnp.int32)], axis=1)
    concrete = not isinstance(cap, jax.core.Tracer)
    if size is None:
        size = int(np.max(np.asarray(offsets[:, -1]))) if concrete else h * (c + room)
    if max_len is None:
        max_len = int(np.max(np.asarray(cap))) if concrete else c + room
    return _ragged_gather(layer, offsets, max(int(size), 1), max(int(max_len), 1))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _ragged_gather(layer: DenseKV, offsets: Array, size: int, max_len: int) -> RaggedKV:
    b, h, c = layer.pos.shape
    n = jnp.arange(size, dtype=jnp.int32)
    head = jnp.sum(n[None, None, :] >= offsets[:, 1:, None], axis=1, dtype=jnp.int32)  # (B, N)
    hc = jnp.minimum(head, h - 1)
    j = n[None, :] - jnp.take_along_axis(offsets, hc, axis=1)
    ok = (head < h) & (j < jnp.take_along_axis(jnp.minimum(layer.fill, c), hc, axis=1))
    src = hc * c + jnp.clip(j, 0, c - 1)  # index into the (H * C) flattened slots

    def flat(x, fill_value=0):
        xf = x.reshape((b, h * c) + x.shape[3:])
        g = jnp.take_along_axis(xf, src.reshape(src.shape + (1,) * (x.ndim - 3)), axis=1)
        return jnp.where(ok.reshape(ok.shape + (1,) * (x.ndim - 3)), g, fill_value).astype(x.dtype)

    extras = {nm: (flat(x) if _slot_aligned(layer, x) else x) for nm, x in layer.extras.items()}
    return RaggedKV(k=flat(layer.k), v=flat(layer.v), pos=flat(layer.pos, -1), offsets=offsets,
                    fill=jnp.minimum(layer.fill, c).astype(jnp.int32), extras=extras, window=layer.window,
                    max_len=max_len)


def as_dense_layer(layer, strict: bool = True):
    """``layer`` as a :class:`DenseKV` when it is a :class:`RaggedKV` (its exact padded view), else unchanged.
    ``strict=False`` also converts layers with weighted slots (dropping the weights: for inspection)."""
    if not isinstance(layer, RaggedKV):
        return layer
    if strict and layer.weight_slot is not None:
        layer.to_dense(strict=True)  # raises: a dense cache cannot hold the weights
    return _to_dense(layer)


_to_dense = jax.jit(lambda layer: layer.to_dense(strict=False))


def bind_shared(layer: Any, done: Any) -> Any:
    """``layer`` with the parts it shares with an earlier layer attached (cross-layer caches: xKV's token-side
    factors, MiniCache's merged directions live once, in the group's first layer). A layer that shares declares
    ``owner`` (a static layer index) and ``bind(owner_layer)`` / ``unbind()``; ``done`` are the layers before it (the
    model's loop passes the layers it has already run). Any other layer is returned unchanged."""
    owner = getattr(layer, "owner", -1)
    if owner < 0:
        return layer
    if owner >= len(done):
        raise ValueError(f"layer shares the parts of layer {owner}, which does not come before it")
    return layer.bind(done[owner])


def unbind_shared(layer: Any) -> Any:
    """Inverse of :func:`bind_shared`: drops the shared parts again, so the state holds them once."""
    return layer.unbind() if getattr(layer, "owner", -1) >= 0 else layer


def bound_layers(layers) -> tuple:
    """Every layer with its shared parts attached (for inspection and tests: ``dense()`` of a layer that shares
    another layer's factors needs them). The bytes of the state are those of ``layers``, not of this view."""
    if isinstance(layers, KVState):
        layers = layers.layers
    if isinstance(layers, StackedLayers):
        return layers.unstack()
    layers = tuple(layers)
    return tuple(bind_shared(layer, layers) for layer in layers)


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


def init_state(cfg, batch: int, capacity: int, dtype=jnp.float32, *, local_ring: bool = True,
               local_capacity: int | None = None) -> KVState:
    """An empty full-precision KV state for model config ``cfg``.

    ``capacity`` is the number of slots of every global layer. Layers with a sliding window (Gemma 3 local layers,
    Mistral) get a ring buffer of ``min(window, capacity)`` slots when ``local_ring`` is true — they never need more.
    ``local_capacity`` (default ``capacity``) sizes the sliding-window layers separately: a chunked prefill whose
    method bounds the global layers to a chunk still needs the local layers a full prefill would give them.
    """
    local_cap = capacity if local_capacity is None else int(local_capacity)
    if local_cap <= 0:
        raise ValueError(f"local_capacity must be positive, got {local_capacity}")
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    if getattr(cfg, "mla_kv_rank", 0):  # multi-head latent attention: a latent cache per layer
        layers = tuple(init_latent_layer(batch, capacity, cfg.mla_kv_rank, cfg.mla_rope_dim, dtype)
                       for _ in range(cfg.num_layers))
        return KVState(layers=layers, next_pos=jnp.zeros((batch,), jnp.int32),
                       rope_shift=jnp.zeros((batch,), jnp.int32))
    layers = []
    for i in range(cfg.num_layers):
        w = cfg.layer_window(i)
        if w and local_ring and w < local_cap:
            layers.append(init_dense_layer(batch, cfg.num_kv_heads, w, cfg.head_dim, dtype, window=w, ring_start=0))
        else:
            layers.append(init_dense_layer(batch, cfg.num_kv_heads, local_cap if w else capacity, cfg.head_dim,
                                           dtype, window=w))
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


def _is_cache(x: Any) -> bool:
    """A layer cache object (dense, ragged, quantized ...): a dataclass with slot positions and a fill."""
    return isinstance(x, (DenseKV, RaggedKV)) or (dataclasses.is_dataclass(x) and not isinstance(x, type)
                                                  and hasattr(x, "pos") and hasattr(x, "fill"))


def _sub_caches(layer: Any) -> list:
    """The fields of a composite layer class that are themselves caches (:class:`DenseKV`, :class:`RaggedKV`, a
    quantized cache after a quantizer in a chain)."""
    if isinstance(layer, (DenseKV, RaggedKV)) or not dataclasses.is_dataclass(layer):
        return []
    return [getattr(layer, f.name) for f in dataclasses.fields(layer) if _is_cache(getattr(layer, f.name))]


def _array_fields(layer: Any) -> list[str]:
    """The names of a composite layer's pytree fields that are not sub-caches."""
    return [f.name for f in dataclasses.fields(layer) if f.metadata.get("pytree_node", True)
            and not _is_cache(getattr(layer, f.name))]


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


def valid_nbytes(tree: Any) -> int:
    """Bytes of the *valid* entries of ``tree`` (a KV state or a layer): like :func:`nbytes`, but arrays aligned with a
    layer's slots (leading dims those of its ``pos``: ``(B, Hkv, C)`` dense, ``(B, N)`` :class:`RaggedKV`; keys,
    values, positions, per-slot statistics) count only their valid slots (``pos >= 0``). Padding to the largest head of a ragged layer and free decode room are thus
    not charged; every other array (quantization scales of packed blocks, per-head counters, ...) counts in full.
    With :func:`nbytes` (what the state allocates) this brackets what a ragged/varlen layout would need."""
    total = 0

    def layer_bytes(layer) -> int:
        subs = _sub_caches(layer)
        if subs:  # a layer made of caches (ThinK's pruned + recent parts, xKV's decode buffer): each counted alone
            return sum(layer_bytes(x) for x in subs) + nbytes([getattr(layer, f) for f in _array_fields(layer)])
        pos = getattr(layer, "pos", None)
        if pos is None or getattr(pos, "ndim", 0) < 2:
            return nbytes(layer)
        lead = tuple(pos.shape)  # (B, Hkv, C) dense, (B, N) ragged flat slots; a leading L when stacked
        frac = float(np.sum(np.asarray(pos) >= 0)) / max(1, int(np.prod(lead)))
        out = 0
        for leaf in jax.tree_util.tree_leaves(layer):
            if not hasattr(leaf, "shape"):
                continue
            b = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
            out += int(round(b * frac)) if tuple(leaf.shape[:len(lead)]) == lead else b
        return out

    layers = getattr(tree, "layers", None)
    if layers is None:
        return layer_bytes(tree)
    if isinstance(layers, StackedLayers):
        total += layer_bytes(layers.tree)
    else:
        for layer in layers:
            total += layer_bytes(layer)
    return total + nbytes(tree.replace(layers=()))


def global_layer_nbytes(state: Any, cfg) -> tuple[int, int] | None:
    """``(allocated, valid)`` bytes (:func:`nbytes`, :func:`valid_nbytes`) of the layers of ``state`` that attend
    globally (``cfg.layer_window(i) == 0``), or ``None`` when the state's layers do not map one to one onto the
    model's (a method that merges layers).

    On a hybrid model (Gemma 3: 5 sliding-window ring layers per global one) the compression methods act on the global
    layers and leave the rings alone, so whole-cache ratios are small by construction; these bytes are the part the
    methods compress. The state's own counters (``next_pos``, ``rope_shift``) are not counted.
    """
    layers = state.layers
    if isinstance(layers, StackedLayers):
        layers = layers.unstack()
    if len(layers) != cfg.num_layers:
        return None
    glob = [layer for i, layer in enumerate(layers) if not cfg.layer_window(i)]
    return nbytes(glob), sum(valid_nbytes(layer) for layer in glob)

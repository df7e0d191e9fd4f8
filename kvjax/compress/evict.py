"""Shared building blocks of eviction and merging methods (pure jnp, jit-friendly, static shapes).

Conventions: scores are per KV head ``(B, Hkv, S)`` over a layer's slots; a higher score means "keep". Slots that are
invalid (``pos < 0``) are never kept; slots in ``force`` are always kept (sinks, recent window).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.state import DenseKV, KVState, StackedLayers, resize_obs, resize_slots, stack_layers, stackable

BIG = 3e38
GQA_REDUCE = ("mean", "max", "sum")
GQA_ORDER = ("pool_then_reduce", "reduce_then_pool")


def group_to_kv_heads(x: jax.Array, num_kv_heads: int, reduce: str = "mean") -> jax.Array:
    """Reduces a per-query-head statistic ``(B, Hq, ...)`` to per KV head ``(B, Hkv, ...)`` (GQA groups)."""
    b, hq = x.shape[:2]
    g = x.reshape(b, num_kv_heads, hq // num_kv_heads, *x.shape[2:])
    if reduce == "mean":
        return g.mean(axis=2)
    if reduce == "sum":
        return g.sum(axis=2)
    if reduce == "max":
        return g.max(axis=2)
    raise ValueError(f"unknown GQA reduction {reduce!r}; choose mean, sum or max")


def reduce_and_pool(votes: jax.Array, num_kv_heads: int, kernel: int, pooling: str, reduce: str = "mean",
                    order: str = "pool_then_reduce") -> jax.Array:
    """Per-query-head votes ``(B, Hq, S)`` -> pooled per-KV-head scores ``(B, Hkv, S)``.

    ``order="pool_then_reduce"`` pools every query head, then reduces the GQA group (kvpress); ``"reduce_then_pool"``
    reduces first, then pools (FFY0/AdaKV's and KVCache-Factory's GQA modes).
    """
    if order == "pool_then_reduce":
        return group_to_kv_heads(pool1d(votes, kernel, pooling), num_kv_heads, reduce)
    if order == "reduce_then_pool":
        return pool1d(group_to_kv_heads(votes, num_kv_heads, reduce), kernel, pooling)
    raise ValueError(f"unknown GQA order {order!r}; choose {' or '.join(GQA_ORDER)}")


def recent_mask(layer: DenseKV, next_pos: jax.Array, window: int) -> jax.Array:
    """``(B, Hkv, C)``: valid slots holding one of the last ``window`` tokens."""
    return (layer.pos >= 0) & (layer.pos >= next_pos[:, None, None] - window)


def sink_mask(layer: DenseKV, n_sink: int) -> jax.Array:
    """``(B, Hkv, C)``: valid slots holding one of the first ``n_sink`` tokens (attention sinks)."""
    return (layer.pos >= 0) & (layer.pos < n_sink)


def select_keep(scores: jax.Array, valid: jax.Array, budget: int, force: jax.Array | None = None,
                limit: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Top-``budget`` slots per head, returned in temporal (slot) order.

    Returns ``idx`` ``(B, Hkv, K)`` with ``K = min(budget, S)`` and ``keep`` (bool, False where fewer than ``K``
    valid slots exist). Forced slots win over any score. ``limit`` (``(B,)`` or ``(B, Hkv)`` ints ``<= budget``)
    keeps only the best ``limit`` slots of a row / head: per-row budgets (from each row's own prompt length) under
    one static shape.
    """
    s = jnp.where(valid, scores.astype(jnp.float32), -BIG)
    if force is not None:
        s = jnp.where(force & valid, BIG, s)
    k = min(budget, s.shape[-1])
    top_s, top_i = jax.lax.top_k(s, k)
    keep = top_s > -BIG
    if limit is not None:
        limit = jnp.asarray(limit, jnp.int32)
        limit = limit.reshape(limit.shape + (1,) * (keep.ndim - limit.ndim))
        keep &= jnp.arange(k, dtype=jnp.int32) < limit  # top_k is sorted: the first `limit` are the best
    # Temporal order with the kept slots first: sort by (not kept, slot index).
    order_key = jnp.where(keep, top_i, s.shape[-1] + top_i)
    perm = jnp.argsort(order_key, axis=-1)
    return jnp.take_along_axis(top_i, perm, -1), jnp.take_along_axis(keep, perm, -1)


def _gather_slots(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Gathers ``x`` ``(B, H, C, ...)`` along the slot axis with ``idx`` ``(B, H, K)``."""
    extra = x.ndim - 3
    ix = idx.reshape(idx.shape + (1,) * extra)
    return jnp.take_along_axis(x, ix, axis=2)


def _pad_slots(x: jax.Array, room: int, value) -> jax.Array:
    if room == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[2] = (0, room)
    return jnp.pad(x, pad, constant_values=value)


def gather_layer(layer: DenseKV, idx: jax.Array, keep: jax.Array, room: int = 0, *, k=None, v=None) -> DenseKV:
    """A new, compacted layer holding the slots ``idx`` (``keep`` False → empty) plus ``room`` free slots.

    Slot-aligned ``extras`` (leading dims ``(B, Hkv, C)``) are gathered too. ``k``/``v`` override the layer's arrays
    (merging methods pass merged values). Each head's ``fill`` becomes its number of kept slots (ragged heads).
    """
    if hasattr(layer, "gather") and k is None and v is None:  # a LatentKV (MLA) layer gathers latents + RoPE keys
        return layer.gather(idx, keep, room)
    k = layer.k if k is None else k
    v = layer.v if v is None else v
    c = layer.capacity
    pos = jnp.where(keep, _gather_slots(layer.pos, idx), -1)
    extras = {}
    for name, x in layer.extras.items():
        if x.ndim >= 3 and x.shape[2] == c and x.shape[:2] == layer.pos.shape[:2]:
            g = _gather_slots(x, idx)
            extras[name] = _pad_slots(jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 3)), g, 0), room, 0)
        else:
            extras[name] = x
    return DenseKV(
        k=_pad_slots(_gather_slots(k, idx), room, 0),
        v=_pad_slots(_gather_slots(v, idx), room, 0),
        pos=_pad_slots(pos, room, -1),
        fill=jnp.sum(keep, axis=-1, dtype=jnp.int32),
        extras=extras,
        window=layer.window,
        ring_start=-1,
    )


def gather_obs(obs: dict, idx: jax.Array, keep: jax.Array, room: int = 0) -> dict:
    """Re-orders slot-aligned observations (``colsum``, ``window``) like :func:`gather_layer` did the slots."""
    out = dict(obs)
    b, hkv, k = idx.shape
    for name in ("colsum", "window"):
        if name not in obs:
            continue
        x = obs[name]  # (B, Hq, S) or (B, Hq, W, S)
        g = x.shape[1] // hkv
        ih = jnp.repeat(idx, g, axis=1)
        kh = jnp.repeat(keep, g, axis=1)
        if x.ndim == 4:
            ih, kh = ih[:, :, None], kh[:, :, None]
        y = jnp.where(kh, jnp.take_along_axis(x, jnp.broadcast_to(ih, x.shape[:-1] + (k,)), -1), 0)
        pad = [(0, 0)] * y.ndim
        pad[-1] = (0, room)
        out[name] = jnp.pad(y, pad)
    return out


def map_global_layers(state: KVState, obs, fn, *, include_local: bool = False, per_layer: bool = False,
                      needs: str | None = None):
    """Applies ``fn(i, layer, layer_obs) -> (layer, layer_obs)`` to every global (non-sliding-window) layer.

    Local (sliding-window) layers already hold only their window and are left alone unless ``include_local``; with
    ``needs``, layers whose ``extras`` lack that key are left alone too (decode hooks of layers the prefill skipped).

    Layer-uniform transforms (``per_layer=False``, the default) run as one ``lax.map`` over the stacked layers when
    they are homogeneous (same shapes), with ``i`` a traced layer index: compile time then does not grow with depth.
    ``state.layers`` may already be a :class:`~kvjax.state.StackedLayers` (the decode loop carries the cache so).
    Transforms whose output shapes depend on the layer (PyramidKV's per-layer budgets, host-side allocations) pass
    ``per_layer=True`` and get a Python ``int`` index, one call per layer.
    """
    n = len(state.layers)
    obs = obs if obs is not None else tuple({} for _ in range(n))
    if isinstance(state.layers, StackedLayers):
        tree = state.layers.tree
        if per_layer or (tree.window and not include_local) or (needs and needs not in tree.extras):
            if per_layer:
                raise ValueError("a per-layer transform cannot run on stacked layers; unstack them first")
            return state, obs
        new, new_obs = _map_layers(fn, jnp.arange(n, dtype=jnp.int32), tree, stack_layers(obs).tree)
        return state.replace(layers=StackedLayers(new)), _unstack(new_obs, n)
    sel = [i for i, layer in enumerate(state.layers)
           if (include_local or not layer.window) and (needs is None or needs in layer.extras)]
    layers, new_obs = list(state.layers), list(obs)
    group_obs = [obs[i] for i in sel]
    if not per_layer and len(sel) > 1 and stackable([layers[i] for i in sel]) and stackable(group_obs):
        new, out_obs = _map_layers(fn, jnp.asarray(sel, jnp.int32), stack_layers([layers[i] for i in sel]).tree,
                                    stack_layers(group_obs).tree)
        for j, (layer, o) in enumerate(zip(_unstack(new, len(sel)), _unstack(out_obs, len(sel)))):
            layers[sel[j]], new_obs[sel[j]] = layer, o
    else:
        for i in sel:
            layers[i], new_obs[i] = fn(i, layers[i], obs[i])
    return state.replace(layers=tuple(layers)), tuple(new_obs)


def _map_layers(fn, idx, layers, obs):
    """``fn`` over stacked layers as one ``lax.map`` (a scan: the body is compiled once, un-batched; vmapping the
    sorts and gathers of some methods made XLA's compile time explode)."""
    return jax.lax.map(lambda a: fn(*a), (idx, layers, obs))


def _unstack(tree, n: int) -> tuple:
    return tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], tree) for i in range(n))


def map_decode_layers(state: KVState, obs, fn, needs: str):
    """Decode hook over the layers that hold ``extras[needs]``: ``fn(i, layer, layer_obs) -> layer``, vmapped over
    homogeneous (or already stacked) layers like :func:`map_global_layers`. Returns the new state."""
    return map_global_layers(state, obs, lambda i, layer, o: (fn(i, layer, o), o), needs=needs,
                             include_local=True)[0]


def pool1d(x: jax.Array, kernel: int, kind: str = "avgpool") -> jax.Array:
    """Same-length 1-D pooling over the last axis (stride 1, padding ``kernel // 2``), as SnapKV smooths scores.

    Average pooling counts the zero padding (like ``torch.nn.functional.avg_pool1d``'s default).
    """
    if kernel <= 1:
        return x
    pad = kernel // 2
    cfg = [(0, 0)] * (x.ndim - 1) + [(pad, pad)]
    if kind == "avgpool":
        xp = jnp.pad(x, cfg)
        return jax.lax.reduce_window(xp, 0.0, jax.lax.add, (1,) * (x.ndim - 1) + (kernel,), (1,) * x.ndim,
                                     "VALID") / kernel
    if kind == "maxpool":
        xp = jnp.pad(x, cfg, constant_values=-jnp.inf)
        return jax.lax.reduce_window(xp, -jnp.inf, jax.lax.max, (1,) * (x.ndim - 1) + (kernel,), (1,) * x.ndim,
                                     "VALID")
    raise ValueError(f"unknown pooling {kind!r}; choose avgpool or maxpool")


# ---------------------------------------------------------------------------------------------------------------------
# Streaming (decode-time) eviction and per-layer budgets. Shared by H2O, Scissorhands, Keyformer, LazyEviction, CAKE,
# D2O and KVCrush: they all turn a boolean keep mask into a compacted layer, evict the n lowest-scoring slots of a head
# and size the cache they leave after prefill so that decoding never overflows it.
# ---------------------------------------------------------------------------------------------------------------------
def compaction_index(keep: jax.Array, size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Slot indices that move the kept slots (bool ``(B, H, C)``) to the front, in slot (temporal) order.

    Returns ``idx`` ``(B, H, size)`` (default ``size = C``) and its ``keep`` flags, ready for :func:`gather_layer` /
    :func:`gather_obs`. Kept slots beyond ``size`` are dropped (callers size it to the largest kept count).
    """
    c = keep.shape[-1]
    ar = jnp.arange(c, dtype=jnp.int32)
    idx = jnp.argsort(jnp.where(keep, ar, c + ar), axis=-1).astype(jnp.int32)
    if size is not None:
        idx = idx[..., :size]
    return idx, jnp.take_along_axis(keep, idx, -1)


def compact_layer(layer: DenseKV, keep: jax.Array, room: int = 0, size: int | None = None, *, k=None, v=None
                  ) -> DenseKV:
    """:func:`gather_layer` of the valid slots in ``keep``, compacted to the front (``size`` slots + ``room``)."""
    idx, kept = compaction_index(keep & layer.valid, size)
    return gather_layer(layer, idx, kept, room, k=k, v=v)


def lowest_mask(score: jax.Array, candidates: jax.Array, n) -> jax.Array:
    """Bool ``(B, H, C)``: the ``n`` lowest-``score`` slots among ``candidates`` of every head.

    ``n`` is an int or a ``(B, H)`` array; ties go to the lower slot index (the older token, since compacted layers
    keep temporal order). Fewer than ``n`` candidates: all of them.
    """
    s = score.astype(jnp.float32)
    order = jnp.lexsort((s, ~candidates), axis=-1)  # candidates first, then by score; stable → slot index breaks ties
    rank = jnp.argsort(order, axis=-1)
    n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), score.shape[:-1])[..., None]
    return candidates & (rank < n)


def evict_capacity(kept: int, budget: int, room: int, every: int = 1) -> int:
    """Slots a layer needs after prefill when decode-time eviction brings every head back to ``budget`` tokens every
    ``every`` steps: the prompt's ``kept`` slots plus ``room`` decoded tokens, but never more than
    ``budget + every`` (the most a head holds between two evictions)."""
    return max(1, min(kept + room, max(kept, budget) + min(room, every)))


def proportional_budgets(weights, total: int, cap: int, floor: int = 0):
    """Integer budgets proportional to ``weights`` (host-side numpy), summing to ``total``, each in ``[floor, cap]``.

    Water-filling: shares above ``cap`` are clipped and their excess redistributed proportionally over the others;
    the result is rounded by largest remainder so that the sum is exact (``min(total, cap * n)`` when capped).
    """
    import numpy as np  # noqa: PLC0415 (host-side helper)

    w = np.maximum(np.asarray(weights, np.float64), 0.0)
    n = w.size
    if n == 0:
        return np.zeros((0,), np.int64)
    total = int(min(max(total, floor * n), cap * n))
    if not np.isfinite(w).all() or w.sum() <= 0:
        w = np.ones_like(w)
    share = np.zeros(n)
    free = np.ones(n, bool)
    left = float(total)
    for _ in range(n + 1):  # clip at [floor, cap] and redistribute until stable
        share[free] = w[free] / w[free].sum() * left if w[free].sum() > 0 else left / max(free.sum(), 1)
        over = free & (share > cap)
        under = free & (share < floor)
        if not over.any() and not under.any():
            break
        share[over] = cap
        share[under] = floor
        free &= ~(over | under)
        left = total - share[~free].sum()
        if not free.any():
            break
    base = np.floor(share + 1e-9).astype(np.int64)
    rest = total - int(base.sum())
    frac = np.where(base < cap, share - base, -1.0)
    for i in np.argsort(-frac, kind="stable")[:max(rest, 0)]:
        base[i] += 1
    return np.clip(base, floor, cap)


@functools.partial(jax.jit, static_argnames=("size", "room"))
def compact_with_obs(layer: DenseKV, obs: dict, keep: jax.Array, size: int, room: int = 0):
    """Jitted :func:`compact_layer` plus :func:`gather_obs`: for host-side methods (per-layer or per-head budgets found
    from concrete statistics) that run their prefill eagerly, so that the gathers compile once per size."""
    idx, kept = compaction_index(keep & layer.valid, size)
    return gather_layer(layer, idx, kept, room), gather_obs(obs, idx, kept, room)


def size_bucket(n: int, cap: int | None = None, step: int = 64) -> int:
    """``n`` rounded up to a multiple of ``step`` (at most ``cap``): static bounds for programs compiled once per
    bucket instead of once per exact count."""
    b = -(-max(n, 1) // step) * step
    return b if cap is None else min(b, max(cap, n))


def compact_ragged(layer: DenseKV, obs: dict, keep: jax.Array, size: int, room: int = 0):
    """:func:`compact_with_obs` for host-side methods whose layers get different sizes (CAKE, D2O, AdaKV): the
    compaction compiles once per size bucket and the result is cut to exactly ``size + room`` slots on the host
    (programs compiled per exact size would pile up: XLA's CPU backend runs out of memory maps after thousands)."""
    new, o = compact_with_obs(layer, obs, keep, size=size_bucket(size, layer.capacity), room=0)
    if isinstance(keep, jax.core.Tracer):  # traced (inside a jitted chain): static shapes, cut in the program
        return resize_slots(new, size + room), resize_obs(o, size + room)
    host = lambda t: jax.tree_util.tree_map(np.asarray, t)  # noqa: E731
    new, o = resize_slots(host(new), size + room, xp=np), resize_obs(host(o), size + room, xp=np)
    return jax.tree_util.tree_map(jnp.asarray, new), jax.tree_util.tree_map(jnp.asarray, o)

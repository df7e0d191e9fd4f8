"""MiniCache — "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models", Liu et al.,
arXiv 2405.14366.

Adjacent layers in the middle-to-deep part of an LLM hold very similar KV states. MiniCache merges each pair of
adjacent layers ``(l, l + 1)`` from the middle of the model on: every token's two states are split into magnitude
and direction, the directions are interpolated on the unit sphere with SLERP,

    e = sin((1 - t) W) / sin(W) * x_l / |x_l| + sin(t W) / sin(W) * x_{l+1} / |x_{l+1}|,  W = angle(x_l, x_{l+1}),

and the merged direction ``e`` is stored once for the pair while each layer keeps its own magnitudes, so layer ``l``
reads ``|x_l| e``. Token pairs that are too distinct to share a direction are retained unmerged: with angular
distance ``d = W / pi`` and ``d_min`` / ``d_max`` its range over the candidates of a head, pairs with
``d > d_max - gamma (d_max - d_min)`` keep their exact states in both layers.

Storage (:class:`MergedPairKV`, one per layer of a pair): the pair's first layer holds the merged unit directions of
keys and values (``shared``), both layers their magnitudes of the merged tokens, the positions, and a plain
:class:`~kvjax.state.DenseKV` of their unmerged tokens (the retained ones, tokens the other layer does not hold, and
the decode room); the second layer names the first in a static ``owner`` and gets its directions attached only while
it runs (:func:`kvjax.state.bind_shared`), so ``kvjax.nbytes`` counts them once.

Defaults: merging starts at the middle layer and runs to the last (the paper's "middle-to-deep" setting; xKV's
re-implementation merges layers 16-31 of 32), interpolation ``t = 0.6`` and retention threshold ``gamma = 0.05``
(the paper's settings). Deviations: the retention band is taken at the distinct end of the range (the paper keeps the
*highly distinct* pairs unmerged; xKV's re-implementation of MiniCache keeps the low end, which we do not follow); the
range is per batch row and KV head (the re-implementation takes it over the whole batch, which makes rows depend on
each other); a token is retained when its key pair *or* its value pair is distinct, so keys and values share one
layout; SLERP acts on kvjax's post-RoPE keys, which equals merging pre-RoPE keys and rotating afterwards (both states
of a token sit at the same position, and RoPE is the same rotation for both; angles and norms are unchanged by it);
pairs are matched by position, so after an evictor that kept different tokens in the two layers only the tokens both
hold are merged (the paper does not combine MiniCache with eviction); nearly parallel directions (angle below 1e-6)
fall back to the normalised linear interpolation; acts on global layers only (on Gemma, pairs of consecutive global
layers from the middle of the global ones); ``impl="pallas"`` uses the jnp reference; decoded tokens are kept per
layer unmerged (the paper also merges during decoding; not done).

Quantization: the paper's largest ratio (up to 5.02x) combines MiniCache with 4-bit KV quantization. Here a quantizer
after MiniCache in a chain (``chain(snapkv, minicache, kivi(bits=4))``, or ``int8`` / ``int4``) quantizes what the pair
stores: the merged unit directions the way it treats keys / values, the unmerged tokens (and decode room) the way it
stores a dense layer (KIVI keeps their last tokens in its full-precision residual); the per-token magnitudes stay in
the cache dtype. Merging first and quantizing the merged states is kvjax's order (merging dequantized states would
give float states again, so quantizing first would not shrink the merged pair).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.attention import Observe, reference_attention
from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.compress.evict import compaction_index, gather_layer
from kvjax.quant.cache import QuantSpec, QuantTensor, dequant_any, quantize_sub_cache
from kvjax.state import DenseKV

Array = jax.Array
PARALLEL = 1e-6  # radians: below it SLERP falls back to the normalised linear interpolation


@struct.dataclass
class MergedPairKV:
    """One layer of a MiniCache pair: ``|x_l| e`` for merged tokens, exact states for the others.

    * ``shared``: ``{"dir_k": (B, H, n, Dk), "dir_v": (B, H, n, Dv)}`` the pair's merged unit directions, held by the
      pair's first layer only (``None`` in the second, which names the first in the static ``owner``);
    * ``mag_k`` / ``mag_v`` ``(B, H, n)``: this layer's magnitudes of the merged tokens; ``pos_m`` ``(B, H, n)``
      their positions (``-1`` = none);
    * ``exact``: a :class:`~kvjax.state.DenseKV` of this layer's unmerged tokens plus its decode room (a
      :class:`~kvjax.quant.cache.QuantizedKV` after a quantizer, and ``shared``'s directions then
      :class:`~kvjax.quant.cache.QuantTensor`: see :meth:`quantized`).

    Slot order is ``[merged | exact]``.
    """

    shared: dict[str, Array] | None
    mag_k: Array
    mag_v: Array
    pos_m: Array
    exact: DenseKV
    owner: int = struct.field(pytree_node=False, default=-1)
    window: int = struct.field(pytree_node=False, default=0)
    ring_start = -1

    def bind(self, owner_layer: "MergedPairKV") -> "MergedPairKV":
        return self.replace(shared=owner_layer.shared)

    def unbind(self) -> "MergedPairKV":
        return self.replace(shared=None)

    @property
    def num_merged(self) -> int:
        return self.pos_m.shape[2]

    @property
    def pos(self) -> Array:
        return jnp.concatenate([self.pos_m, self.exact.pos], axis=2)

    @property
    def valid(self) -> Array:
        return self.pos >= 0

    @property
    def capacity(self) -> int:
        return self.num_merged + self.exact.capacity

    @property
    def fill(self) -> Array:
        return self.num_merged + self.exact.fill

    def merged(self) -> tuple[Array, Array]:
        """This layer's keys and values of the merged tokens ``(B, H, n, D)``: its magnitudes times the pair's
        directions (zero in empty slots)."""
        if self.shared is None:
            raise ValueError(f"this MiniCache layer shares the merged directions of layer {self.owner}; attach them "
                             "with kvjax.state.bind_shared / bound_layers first")
        ok = (self.pos_m >= 0)[..., None]
        k = self.mag_k[..., None].astype(jnp.float32) * dequant_any(self.shared["dir_k"])
        v = self.mag_v[..., None].astype(jnp.float32) * dequant_any(self.shared["dir_v"])
        return (jnp.where(ok, k, 0.0).astype(self.mag_k.dtype), jnp.where(ok, v, 0.0).astype(self.mag_v.dtype))

    def dense(self) -> tuple[Array, Array]:
        k, v = self.merged()
        ek, ev = self.exact.dense()
        return jnp.concatenate([k, ek.astype(k.dtype)], axis=2), jnp.concatenate([v, ev.astype(v.dtype)], axis=2)

    def quantized(self, spec: QuantSpec) -> "MergedPairKV":
        """This layer with its payload quantized by ``spec`` (a quantizer after MiniCache in a chain): the pair's
        merged unit directions (held by the pair's first layer) as :class:`~kvjax.quant.cache.QuantTensor` —
        ``dir_k`` like keys (``spec.k_axis``), ``dir_v`` like values (per token) — and the unmerged tokens with their
        decode room as the quantizer stores a dense layer. The per-token magnitudes (one number per token, head and
        layer) stay in the cache dtype."""
        shared = self.shared
        if shared is not None and not isinstance(shared["dir_k"], QuantTensor):
            ok, sd = self.pos_m >= 0, spec.scale_dtype
            shared = {"dir_k": QuantTensor.build(shared["dir_k"], ok, bits=spec.bits, group=spec.k_group,
                                                 axis=spec.k_axis, scale_dtype=sd, what="MiniCache's key directions"),
                      "dir_v": QuantTensor.build(shared["dir_v"], ok, bits=spec.v_bits, group=spec.v_group,
                                                 axis="token", scale_dtype=sd, what="MiniCache's value directions")}
        exact = quantize_sub_cache(self.exact, spec) if isinstance(self.exact, DenseKV) else self.exact
        return self.replace(shared=shared, exact=exact)

    def append(self, k: Array, v: Array, pos: Array) -> "MergedPairKV":
        return self.replace(exact=self.exact.append(k, v, pos))

    def attend(self, q: Array, q_pos: Array, *, sm_scale: float | None = None, softcap: float = 0.0,
               observe: Observe = Observe(), impl: str = "reference") -> tuple[Array, dict]:
        if impl not in ("reference", "pallas"):
            raise ValueError(f"unknown attention impl {impl!r}; choose 'reference' or 'pallas'")
        k, v = self.dense()
        return reference_attention(q, k, v, q_pos, self.pos, sm_scale=sm_scale, window=self.window, softcap=softcap,
                                   observe=observe)


def slerp(x1: Array, x2: Array, t: float) -> tuple[Array, Array]:
    """SLERP of the directions of ``x1`` and ``x2`` (``(..., D)``): the unit vector at fraction ``t`` of the great arc
    from ``x1 / |x1|`` to ``x2 / |x2|``, and the angle between them ``(...)`` in radians. Nearly parallel pairs use the
    normalised linear interpolation (the limit of SLERP)."""
    f32 = jnp.float32
    n1 = jnp.linalg.norm(x1.astype(f32), axis=-1, keepdims=True)
    n2 = jnp.linalg.norm(x2.astype(f32), axis=-1, keepdims=True)
    u1 = x1.astype(f32) / jnp.maximum(n1, 1e-30)
    u2 = x2.astype(f32) / jnp.maximum(n2, 1e-30)
    omega = jnp.arccos(jnp.clip(jnp.sum(u1 * u2, -1, keepdims=True), -1.0, 1.0))
    par = omega < PARALLEL
    s = jnp.where(par, 1.0, jnp.sin(omega))
    e = jnp.sin((1 - t) * omega) / s * u1 + jnp.sin(t * omega) / s * u2
    lin = (1 - t) * u1 + t * u2
    lin = lin / jnp.maximum(jnp.linalg.norm(lin, axis=-1, keepdims=True), 1e-30)
    return jnp.where(par, lin, e), omega[..., 0]


def retention_mask(omega: Array, candidate: Array, gamma: float) -> Array:
    """``(B, H, C)``: candidate pairs too distinct to merge: angular distance ``d = omega / pi`` above
    ``d_max - gamma (d_max - d_min)``, the range taken over a head's candidates."""
    d = omega / jnp.pi
    dmin = jnp.min(jnp.where(candidate, d, jnp.inf), -1, keepdims=True)
    dmax = jnp.max(jnp.where(candidate, d, -jnp.inf), -1, keepdims=True)
    return candidate & (d > dmax - gamma * (dmax - dmin))


@functools.partial(jax.jit, static_argnames=("t", "gamma"))
def _pair_plan(a: DenseKV, b: DenseKV, *, t: float, gamma: float):
    """Which slots of ``a`` merge with which of ``b`` (matched by position); returns (merged_a, match, merged_b)."""
    eq = (a.pos[..., :, None] == b.pos[..., None, :]) & a.valid[..., :, None] & b.valid[..., None, :]
    has = jnp.any(eq, -1)
    match = jnp.argmax(eq, -1).astype(jnp.int32)  # (B, H, Ca) slot of b holding the same token
    take = lambda x: jnp.take_along_axis(x, match[..., None], axis=2)  # noqa: E731
    _, wk = slerp(a.k, take(b.k), t)
    _, wv = slerp(a.v, take(b.v), t)
    keep = retention_mask(wk, has, gamma) | retention_mask(wv, has, gamma)
    merged_a = has & ~keep
    merged_b = jnp.any(eq & merged_a[..., :, None], axis=-2)
    return merged_a, match, merged_b


@functools.partial(jax.jit, static_argnames=("t", "n", "na", "nb", "room"))
def _pair_build(a: DenseKV, b: DenseKV, merged_a: Array, match: Array, merged_b: Array, *, t: float, n: int,
                na: int, nb: int, room: int):
    idx, ok = compaction_index(merged_a, n)
    take = lambda x, i: jnp.take_along_axis(x, i[..., None], axis=2)  # noqa: E731
    jb = jnp.take_along_axis(match, idx, -1)
    ka, va, kb, vb = take(a.k, idx), take(a.v, idx), take(b.k, jb), take(b.v, jb)
    dk, _ = slerp(ka, kb, t)
    dv, _ = slerp(va, vb, t)
    okf = ok[..., None]
    dt = a.k.dtype
    shared = {"dir_k": jnp.where(okf, dk, 0.0).astype(dt), "dir_v": jnp.where(okf, dv, 0.0).astype(a.v.dtype)}
    pos_m = jnp.where(ok, jnp.take_along_axis(a.pos, idx, -1), -1)
    norm = lambda x: jnp.where(ok, jnp.linalg.norm(x.astype(jnp.float32), axis=-1), 0.0).astype(dt)  # noqa: E731
    ia, ka_ = compaction_index(a.valid & ~merged_a, na)
    ib, kb_ = compaction_index(b.valid & ~merged_b, nb)
    ea, eb = gather_layer(a, ia, ka_, room), gather_layer(b, ib, kb_, room)
    return (shared, (norm(ka), norm(va), pos_m, ea), (norm(kb), norm(vb), pos_m, eb))


def layer_pairs(layers, start: int | None) -> list[tuple[int, int]]:
    """Pairs of consecutive global layers from the ``start``-th global layer (default: the middle one) to the end."""
    glob = [i for i, layer in enumerate(layers) if not getattr(layer, "window", 0)]
    s = len(glob) // 2 if start is None else start
    return [(glob[j], glob[j + 1]) for j in range(s, len(glob) - 1, 2)]


@register
@dataclasses.dataclass(frozen=True)
class MiniCache(Method):
    """Cross-layer merging of adjacent layers' KV states by SLERP (see module docstring)."""

    t: float = 0.6  # SLERP interpolation fraction (0: the first layer's direction, 1: the second's)
    gamma: float = 0.05  # retention threshold (fraction of the angular-distance range kept unmerged)
    start_layer: int | None = None  # first merged global layer; None: the middle one
    name: ClassVar[str] = "minicache"
    kind: ClassVar[str] = "crosslayer"
    family: ClassVar[str] = "merging"
    jittable: ClassVar[bool] = False  # exact merged / retained counts found on the host

    def __post_init__(self):
        if not 0.0 <= self.t <= 1.0:
            raise ValueError(f"minicache t (SLERP interpolation) must be in [0, 1], got {self.t}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"minicache gamma (retention threshold) must be in [0, 1], got {self.gamma}")
        if self.start_layer is not None:
            check_positive("minicache start_layer", self.start_layer, allow_zero=True)

    def validate(self, ctx: Context) -> None:
        n_glob = sum(1 for i in range(ctx.cfg.num_layers) if not ctx.cfg.layer_window(i))
        if self.start_layer is not None and self.start_layer >= n_glob - 1:
            raise ValueError(f"minicache start_layer={self.start_layer} leaves no pair of global layers to merge "
                             f"(the model has {n_glob}); use at most {n_glob - 2}")

    def prefill(self, state, obs: Any, ctx: Context):
        self.validate(ctx)
        layers = list(state.layers)
        obs = obs if obs is not None else tuple({} for _ in layers)
        new_obs = list(obs)
        for ia, ib in layer_pairs(layers, self.start_layer):
            a, b = layers[ia], layers[ib]
            for i, x in ((ia, a), (ib, b)):
                if not isinstance(x, DenseKV) or x.ring_start >= 0:
                    raise ValueError(f"minicache needs plain dense layers, got a {type(x).__name__} in layer {i}")
            merged_a, match, merged_b = _pair_plan(a, b, t=self.t, gamma=self.gamma)
            ma, mb = np.asarray(merged_a), np.asarray(merged_b)
            count = lambda m: max(1, int(m.sum(-1).max()))  # noqa: E731
            n = count(ma)
            na = count(np.asarray(a.valid) & ~ma)
            nb = count(np.asarray(b.valid) & ~mb)
            shared, pa, pb = _pair_build(a, b, merged_a, match, merged_b, t=self.t, n=n, na=na, nb=nb,
                                         room=ctx.decode_room)
            layers[ia] = MergedPairKV(shared, *pa, owner=-1, window=a.window)
            layers[ib] = MergedPairKV(None, *pb, owner=ia, window=b.window)
            new_obs[ia], new_obs[ib] = {}, {}  # slots moved; no later method of a chain may need them
        return state.replace(layers=tuple(layers)), tuple(new_obs)

"""xKV — "xKV: Cross-Layer SVD for KV-Cache Compression", Chang et al., arXiv 2503.18893.

Adjacent layers' keys (and values) are aligned in their dominant singular vectors. xKV groups ``group_size``
consecutive layers, concatenates their caches along the feature axis (token ``t``'s row is the keys of every head of
every layer of the group, ``G * H * D`` columns) and keeps a rank-``r`` SVD of that ``(n, G * H * D)`` matrix:
``X ~= A B`` with ``A = U_r S_r`` ``(n, r)``, the token-side factor *shared by the whole group*, and ``B = V_r^T``
``(r, G * H * D)``, whose column block ``B_l`` ``(r, H * D)`` belongs to layer ``l``. Layer ``l``'s keys are then
``A B_l``; the group stores ``n * r + r * G * H * D`` numbers instead of ``n * G * H * D``.

Storage (:class:`CrossLayerKV`, one per layer): the group's first layer holds ``A`` (``shared``, keys and values), the
others only their own ``B_l``, prompt positions and decode buffer, and a static ``owner`` index; the model's layer
loop attaches the owner's ``A`` to a layer while it runs (:func:`kvjax.state.bind_shared`), so ``kvjax.nbytes``
counts ``A`` once. Attention reconstructs the layer's prompt keys and values on the fly (one layer at a time, as the
authors' code does) and re-applies RoPE to the keys; tokens decoded afterwards are kept in full precision in a small
per-layer :class:`~kvjax.state.DenseKV` (the authors' code compresses the prefill only).

Defaults follow the authors' code (abdelfattah-lab/xKV, README "xKV-4" for Llama-3.1-8B): groups of 4 layers over
all layers, keys factored *before* RoPE (their cache re-applies RoPE after the merge), rank 512 for keys and 768 for
values per group of ``4 * 8 * 128 = 4096`` columns; kvjax scales those ranks to the model as the same fractions
(``rank_k = G*H*D / 8``, ``rank_v = 3 G*H*D / 16``) unless ``rank_k`` / ``rank_v`` are given. Deviations: keys are
un-rotated from kvjax's post-RoPE storage exactly (RoPE is a rotation) before the SVD; the SVD is per batch row over
the row's valid tokens (padding rows are zero, so they do not change the factors); the rank is capped at
``min(n, G*H*D)`` (a larger rank is exact); acts on global layers only (Gemma's sliding layers keep their rings; a
group is ``group_size`` consecutive *global* layers), with the last group smaller when ``group_size`` does not
divide their number; ``impl="pallas"`` uses the jnp reference (no low-rank kernel). After an evictor in a chain
(``chain(snapkv, xkv)``) a row of the matrix is slot ``j`` of every head and layer (heads keep different tokens), which
xKV's paper does not study.

A quantizer after xKV (``chain(snapkv, xkv, int4)``, ``int8`` or ``kivi``) quantizes what xKV stores per token: the
group's token-side factors ``A_k`` / ``A_v`` (each token's coefficients in the group's basis, the part that grows with
the context) the way the quantizer treats keys / values, and the decode buffer the way it stores a dense layer; the
per-layer factors ``B_l`` (size independent of the context) stay in the cache dtype. The paper does not combine xKV
with quantization (it calls it orthogonal); this order — factor first, then quantize the factors — is kvjax's choice,
since quantizing before the SVD would be undone by it (the factors of dequantized keys are floats again). A factor
whose width (its rank, capped by the token count) does not fit the quantizer's channel groups is padded with zero
columns to the next multiple (stored and counted: e.g. a 72-wide factor in groups of 16 takes 80 codes per token).
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
from kvjax.compress.evict import compaction_index, gather_layer, gather_obs
from kvjax.quant.cache import QuantSpec, QuantTensor, dequant_any, quantize_sub_cache
from kvjax.rope import inv_frequencies, rerotate_keys
from kvjax.state import DenseKV

Array = jax.Array
KEY_RANK_FRACTION = 512 / 4096  # the authors' xKV-4 ranks on Llama-3.1-8B (4 layers x 8 KV heads x 128 dims)
VALUE_RANK_FRACTION = 768 / 4096


@struct.dataclass
class CrossLayerKV:
    """One layer of a group of layers sharing token-side low-rank factors (xKV).

    * ``shared``: ``{"ak": (B, n, rk), "av": (B, n, rv)}`` the group's token-side factors ``U_r S_r``, held by the
      group's first layer only (``None`` in the others, which name it in the static ``owner``);
    * ``bk`` ``(B, rk, H * Dk)`` / ``bv`` ``(B, rv, H * Dv)``: this layer's block of ``V_r^T``;
    * ``pos_c`` ``(B, H, n)`` positions of the factored (prompt) tokens, ``-1`` = none;
    * ``recent``: a full-precision :class:`~kvjax.state.DenseKV` for decoded tokens (a
      :class:`~kvjax.quant.cache.QuantizedKV` after a quantizer, and ``shared``'s factors then
      :class:`~kvjax.quant.cache.QuantTensor`: see :meth:`quantized`);
    * ``inv_freq`` ``(Dk / 2,)``: RoPE frequencies when the keys were factored before RoPE (``None``: after).

    Slot order is ``[factored | recent]``. ``kvjax.nbytes`` counts exactly these arrays, so the shared factors once.
    """

    shared: dict[str, Array] | None
    bk: Array
    bv: Array
    pos_c: Array
    recent: DenseKV
    inv_freq: Array | None = None
    owner: int = struct.field(pytree_node=False, default=-1)
    window: int = struct.field(pytree_node=False, default=0)
    ring_start = -1

    def bind(self, owner_layer: "CrossLayerKV") -> "CrossLayerKV":
        return self.replace(shared=owner_layer.shared)

    def unbind(self) -> "CrossLayerKV":
        return self.replace(shared=None)

    @property
    def num_factored(self) -> int:
        return self.pos_c.shape[2]

    @property
    def pos(self) -> Array:
        return jnp.concatenate([self.pos_c, self.recent.pos], axis=2)

    @property
    def valid(self) -> Array:
        return self.pos >= 0

    @property
    def capacity(self) -> int:
        return self.num_factored + self.recent.capacity

    @property
    def fill(self) -> Array:
        return self.num_factored + self.recent.fill

    def factored(self) -> tuple[Array, Array]:
        """The prompt's keys (post-RoPE, at their positions) and values reconstructed from the factors
        ``(B, H, n, D)``; empty slots are zero."""
        if self.shared is None:
            raise ValueError(f"this xKV layer shares the factors of layer {self.owner}; attach them with "
                             "kvjax.state.bind_shared / bound_layers first")
        b, h, n = self.pos_c.shape
        f32 = jnp.float32
        k = jnp.einsum("bnr,brc->bnc", dequant_any(self.shared["ak"]), self.bk.astype(f32))
        v = jnp.einsum("bnr,brc->bnc", dequant_any(self.shared["av"]), self.bv.astype(f32))
        k = k.reshape(b, n, h, -1).transpose(0, 2, 1, 3)
        v = v.reshape(b, n, h, -1).transpose(0, 2, 1, 3)
        ok = (self.pos_c >= 0)[..., None]
        if self.inv_freq is not None:
            k = rerotate_keys(k, jnp.maximum(self.pos_c, 0), self.inv_freq)
        dt = self.bk.dtype
        return jnp.where(ok, k, 0.0).astype(dt), jnp.where(ok, v, 0.0).astype(self.bv.dtype)

    def dense(self) -> tuple[Array, Array]:
        k, v = self.factored()
        rk, rv = self.recent.dense()
        return jnp.concatenate([k, rk.astype(k.dtype)], axis=2), jnp.concatenate([v, rv.astype(v.dtype)], axis=2)

    def quantized(self, spec: QuantSpec) -> "CrossLayerKV":
        """This layer with its payload quantized by ``spec`` (a quantizer after xKV in a chain): the group's
        token-side factors ``A`` (held by the group's first layer) as :class:`~kvjax.quant.cache.QuantTensor` —
        ``ak`` like keys (``spec.k_axis``: per channel over groups of ``k_group`` tokens for KIVI, per token for
        int8/int4), ``av`` like values (per token, groups of ``v_group`` channels) — and the decode buffer as the
        quantizer stores a dense layer. The per-layer factors ``B_l`` (``r x H*D``, independent of the token count)
        stay in the cache dtype."""
        shared = self.shared
        if shared is not None and not isinstance(shared["ak"], QuantTensor):
            ok = jnp.any(self.pos_c >= 0, axis=1)  # (B, n): rows holding a token of some head
            sd = spec.scale_dtype
            shared = {"ak": QuantTensor.build(shared["ak"], ok, bits=spec.bits, group=spec.k_group, axis=spec.k_axis,
                                              scale_dtype=sd, what="xKV's key factor A_k"),
                      "av": QuantTensor.build(shared["av"], ok, bits=spec.v_bits, group=spec.v_group, axis="token",
                                              scale_dtype=sd, what="xKV's value factor A_v")}
        recent = quantize_sub_cache(self.recent, spec) if isinstance(self.recent, DenseKV) else self.recent
        return self.replace(shared=shared, recent=recent)

    def append(self, k: Array, v: Array, pos: Array) -> "CrossLayerKV":
        return self.replace(recent=self.recent.append(k, v, pos))

    def attend(self, q: Array, q_pos: Array, *, sm_scale: float | None = None, softcap: float = 0.0,
               observe: Observe = Observe(), impl: str = "reference") -> tuple[Array, dict]:
        if impl not in ("reference", "pallas"):
            raise ValueError(f"unknown attention impl {impl!r}; choose 'reference' or 'pallas'")
        k, v = self.dense()
        return reference_attention(q, k, v, q_pos, self.pos, sm_scale=sm_scale, window=self.window, softcap=softcap,
                                   observe=observe)


def svd_factor(x: Array, rank: int) -> tuple[Array, Array]:
    """Rank-``rank`` factors of ``x`` ``(B, n, c)``: ``A = U_r S_r`` ``(B, n, r)`` and ``B = V_r^T`` ``(B, r, c)``
    (``r = min(rank, n, c)``); ``||x - A B||_F^2`` is the sum of the discarded squared singular values."""
    u, s, vt = jnp.linalg.svd(x.astype(jnp.float32), full_matrices=False)
    r = min(rank, s.shape[-1])
    return u[..., :r] * s[..., None, :r], vt[..., :r, :]


def group_ranks(n_layers: int, heads: int, dk: int, dv: int, rank_k: int | None, rank_v: int | None
                ) -> tuple[int, int]:
    """Ranks of a group of ``n_layers`` layers: the given ones, or the authors' fractions of the group's columns."""
    rk = rank_k if rank_k is not None else max(1, round(KEY_RANK_FRACTION * n_layers * heads * dk))
    rv = rank_v if rank_v is not None else max(1, round(VALUE_RANK_FRACTION * n_layers * heads * dv))
    return rk, rv


def _stack_features(x: Array) -> Array:
    """``(B, H, n, D)`` -> ``(B, n, H * D)`` (a token's row: every head's vector)."""
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


@functools.partial(jax.jit, static_argnames=("n", "rank_k", "rank_v", "room", "pre_rope"))
def _xkv_group(layers: tuple, obs: tuple, inv_freq: Array, *, n: int, rank_k: int, rank_v: int, room: int,
               pre_rope: bool):
    """Factors one group of dense layers; returns (per-layer (bk, bv, pos_c, recent), shared factors, obs)."""
    compact, new_obs = [], []
    for layer, o in zip(layers, obs):
        idx, keep = compaction_index(layer.valid, n)
        g = gather_layer(layer, idx, keep)
        ok = (g.pos >= 0)[..., None]
        k = jnp.where(ok, g.k.astype(jnp.float32), 0.0)
        if pre_rope:  # kvjax stores keys after RoPE at their positions: rotate them back to position 0
            k = jnp.where(ok, rerotate_keys(k, -jnp.maximum(g.pos, 0), inv_freq), 0.0)
        compact.append((k, jnp.where(ok, g.v.astype(jnp.float32), 0.0), g.pos))
        new_obs.append(gather_obs(o, idx, keep, room))
    ak, bk = svd_factor(jnp.concatenate([_stack_features(k) for k, _, _ in compact], -1), rank_k)
    av, bv = svd_factor(jnp.concatenate([_stack_features(v) for _, v, _ in compact], -1), rank_v)
    dt = layers[0].k.dtype
    out, ok_, ov = [], 0, 0
    for layer, (k, v, pos) in zip(layers, compact):
        b, h, _, dk = k.shape
        dv = v.shape[-1]
        recent = DenseKV(k=jnp.zeros((b, h, room, dk), layer.k.dtype), v=jnp.zeros((b, h, room, dv), layer.v.dtype),
                         pos=jnp.full((b, h, room), -1, jnp.int32), fill=jnp.zeros((b, h), jnp.int32),
                         window=layer.window)
        out.append((bk[..., ok_:ok_ + h * dk].astype(dt), bv[..., ov:ov + h * dv].astype(dt), pos, recent))
        ok_, ov = ok_ + h * dk, ov + h * dv
    return tuple(out), {"ak": ak.astype(dt), "av": av.astype(dt)}, tuple(new_obs)


def layer_groups(layers, group_size: int) -> list[list[int]]:
    """Consecutive global (non-sliding-window) layer indices in groups of ``group_size`` (the last may be smaller)."""
    glob = [i for i, layer in enumerate(layers) if not getattr(layer, "window", 0)]
    return [glob[j:j + group_size] for j in range(0, len(glob), group_size)]


@register
@dataclasses.dataclass(frozen=True)
class XKV(Method):
    """Cross-layer SVD of the prompt's keys and values (see module docstring)."""

    group_size: int = 4  # consecutive layers sharing one token-side factor
    rank_k: int | None = None  # key rank per group; None: the authors' 512 / 4096 of the group's columns
    rank_v: int | None = None  # value rank per group; None: 768 / 4096 of the group's columns
    pre_rope: bool = True  # factor keys before RoPE (the authors' code), re-applying RoPE in attention
    name: ClassVar[str] = "xkv"
    kind: ClassVar[str] = "crosslayer"
    family: ClassVar[str] = "merging"
    jittable: ClassVar[bool] = False  # exact prompt sizes found on the host

    def __post_init__(self):
        check_positive("xkv group_size", self.group_size)
        for nm in ("rank_k", "rank_v"):
            r = getattr(self, nm)
            if r is not None and (isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0):
                raise ValueError(f"xkv {nm} must be a positive int or None (the authors' fraction), got {r!r}")

    def validate(self, ctx: Context) -> None:
        if self.pre_rope and ctx.cfg.rope_scaling.rope_type == "dynamic":
            raise ValueError("xkv pre_rope=True cannot un-rotate keys of a dynamic-NTK RoPE model (their frequencies "
                             "depend on the length); use pre_rope=False")

    def prefill(self, state, obs: Any, ctx: Context):
        self.validate(ctx)
        if self.pre_rope and np.any(np.asarray(state.rope_shift) != 0):
            raise ValueError("xkv pre_rope=True needs keys rotated at their original positions (rope_shift 0); a "
                             "method that re-bases positions (StreamingLLM) cannot run before it")
        n_layers = len(state.layers)
        obs = obs if obs is not None else tuple({} for _ in range(n_layers))
        cfg = ctx.cfg
        inv = jnp.asarray(inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings))
        layers, new_obs = list(state.layers), list(obs)
        for group in layer_groups(state.layers, self.group_size):
            for i in group:
                if not isinstance(layers[i], DenseKV) or layers[i].ring_start >= 0:
                    raise ValueError(f"xkv needs plain dense layers, got a {type(layers[i]).__name__} in layer {i}")
            n = max(1, max(int(np.asarray(layers[i].valid).sum(-1).max()) for i in group))
            h, dk, dv = layers[group[0]].k.shape[1], layers[group[0]].k.shape[3], layers[group[0]].v.shape[3]
            rk, rv = group_ranks(len(group), h, dk, dv, self.rank_k, self.rank_v)
            parts, shared, gobs = _xkv_group(tuple(layers[i] for i in group), tuple(obs[i] for i in group), inv,
                                             n=n, rank_k=rk, rank_v=rv, room=ctx.decode_room, pre_rope=self.pre_rope)
            for j, (i, (bk, bv, pos_c, recent)) in enumerate(zip(group, parts)):
                layers[i] = CrossLayerKV(shared=shared if j == 0 else None, bk=bk, bv=bv, pos_c=pos_c, recent=recent,
                                         inv_freq=inv if self.pre_rope else None, owner=-1 if j == 0 else group[0],
                                         window=layers[i].window)
                new_obs[i] = gobs[j]
        return state.replace(layers=tuple(layers)), tuple(new_obs)

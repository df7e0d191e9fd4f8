"""GEAR — "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative Inference of LLM",
Kang et al., arXiv 2403.05527.

Every block of ``buffer`` tokens of every KV head is stored as ``X ≈ D̂ + L + S``:

* ``S``: sparse outliers — the ``s/2`` largest and ``s/2`` smallest entries of the block (``outlier_ratio`` ``s``)
  kept exactly (fp16 values + flat indices, a COO matrix);
* ``D̂``: uniform low-bit quantization of the rest (``quant="kcvt"``: keys per channel over the block, values per
  token over groups of ``group`` channels — the paper's KCVT backbone; ``"token"``: both per token), packed codes;
* ``L = A B``: a rank-``r`` approximation of the quantization residual ``X - D̂ - S`` per head, by power iteration
  (``iters`` rounds, the reference code's ``loop``), factors stored in fp16.

Decoding uses the paper's streaming buffer: new tokens stay in a full-precision buffer of ``buffer`` (``n_b``)
tokens, compressed as one block when full. Everything is stored for real (:class:`GearKV`; codes packed into bytes,
low-rank factors, COO values/indices) and counted by :func:`kvjax.nbytes`.

Defaults: 4 bits, ``s = 2%``, rank ratio ``ρ = 2%`` (``r = max(1, ceil(ρ · min(n_b, d)))``), ``n_b = 20`` — the
paper's near-lossless 4-bit setting (``outlierQ_4_0.02_gap20_lrap_0.02`` in the authors' runs); ``bits=2`` gives the
ultra-low-bit variant. Deviations, for static shapes and ragged heads: the prompt is compressed in blocks of ``n_b``
tokens like the stream (the reference code compresses the whole prompt as one matrix, rank ``ρ · min(n, d)``), and
outliers are filtered per head and block (the reference code filters the whole tensor of a batch row). The last
``n % n_b`` prompt tokens stay in the buffer. Attention: reference path (reconstruct, then attend); global layers
only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import Observe, reference_attention
from kvjax.compress.base import Context, Method, register
from kvjax.compress.evict import map_global_layers
from kvjax.compress.kivi import convert_obs, room_for
from kvjax.quant import quantizers as qz
from kvjax.quant.cache import gather_slots, pad_slots, scatter_slots, stream_append

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GearSpec:
    """Static parameters of a :class:`GearKV` (resolved for a head dim)."""

    bits: int = 4
    block: int = 20
    rank: int = 1
    k_each: int = 0  # outliers kept at each end (largest / smallest) per block
    iters: int = 3
    quant: str = "kcvt"
    group: int = 0  # channels per per-token group (resolved)
    scale_dtype: str = "float16"
    factor_dtype: str = "float16"

    def axis(self, which: str) -> str:
        return "channel" if (which == "k" and self.quant == "kcvt") else "token"

    def qgroup(self, which: str) -> int:
        return self.block if self.axis(which) == "channel" else self.group


@struct.dataclass
class GearPart:
    """One compressed tensor (keys or values) of a layer: ``C`` slots in blocks of ``L`` tokens, ``NB = C / L``."""

    codes: Array  # (B, H, C, D * bits / 8) uint8
    scale: Array  # (B, H, NB, D) per channel, or (B, H, C, D // group) per token
    zero: Array
    sp_idx: Array  # (B, H, NB, 2k) flat indices into the block's L * D entries
    sp_val: Array  # (B, H, NB, 2k)
    lr_a: Array  # (B, H, C, r)
    lr_b: Array  # (B, H, NB, r, D)


def _compress_blocks(x: Array, valid: Array, sp: GearSpec, which: str) -> tuple:
    """``x`` ``(B, H, M, L, D)`` → the GearPart arrays for ``M`` blocks (flattened slot axis ``M * L``)."""
    b, h, m, el, d = x.shape
    x = x.astype(jnp.float32)
    vtok = jnp.broadcast_to(valid[..., None], x.shape)
    if sp.k_each:
        idx, val = qz.topk_outliers(x, valid, sp.k_each)
        flat_mask = jax.vmap(lambda i: jnp.zeros((el * d,), bool).at[i].set(True))(
            idx.reshape(b * h * m, idx.shape[-1]))
        outl = flat_mask.reshape(b, h, m, el, d)
    else:
        idx = jnp.zeros((b, h, m, 0), jnp.int32)
        val = jnp.zeros((b, h, m, 0), jnp.float32)
        outl = jnp.zeros(x.shape, bool)
    keep = vtok & ~outl
    axis = sp.axis(which)
    grp = sp.qgroup(which)
    xf = x.reshape(b, h, m * el, d)
    codes, scale, zero = qz.quantize(xf, keep.reshape(xf.shape), bits=sp.bits, group=grp, axis=axis,
                                     scale_dtype=jnp.dtype(sp.scale_dtype))
    deq = qz.dequantize(codes, scale, zero, bits=sp.bits, group=grp, axis=axis).reshape(x.shape)
    fdt = jnp.dtype(sp.factor_dtype)
    if sp.rank:
        err = jnp.where(keep, x - deq, 0.0)
        a, bb = qz.lowrank_power_iteration(err, sp.rank, sp.iters)
        lr_a, lr_b = a.reshape(b, h, m * el, sp.rank).astype(fdt), bb.astype(fdt)
    else:
        lr_a, lr_b = jnp.zeros((b, h, m * el, 0), fdt), jnp.zeros((b, h, m, 0, d), fdt)
    return codes, scale, zero, idx.astype(qz.index_dtype(el * d)), val.astype(fdt), lr_a, lr_b


def _reconstruct(part: GearPart, sp: GearSpec, which: str) -> Array:
    """``(B, H, C, D)`` f32."""
    axis = sp.axis(which)
    x = qz.dequantize(part.codes, part.scale, part.zero, bits=sp.bits, group=sp.qgroup(which), axis=axis)
    b, h, c, d = x.shape
    nb = c // sp.block
    if sp.rank:
        a = part.lr_a.astype(jnp.float32).reshape(b, h, nb, sp.block, sp.rank)
        x = x + (a @ part.lr_b.astype(jnp.float32)).reshape(b, h, c, d)
    if sp.k_each and nb:
        flat = x.reshape(b * h * nb, sp.block * d)
        idx = part.sp_idx.astype(jnp.int32).reshape(b * h * nb, 2 * sp.k_each)
        val = part.sp_val.astype(jnp.float32).reshape(b * h * nb, 2 * sp.k_each)
        x = jax.vmap(lambda f, i, v: f.at[i].set(v))(flat, idx, val).reshape(b, h, c, d)
    return x


def _part_from(arrs) -> GearPart:
    return GearPart(*arrs)


def _pad_part(arrs, extra_tok: int, sp: GearSpec, which: str):
    codes, scale, zero, idx, val, lr_a, lr_b = arrs
    extra_blk = extra_tok // sp.block
    srows = extra_blk if sp.axis(which) == "channel" else extra_tok
    return (pad_slots(codes, extra_tok), pad_slots(scale, srows), pad_slots(zero, srows), pad_slots(idx, extra_blk),
            pad_slots(val, extra_blk), pad_slots(lr_a, extra_tok), pad_slots(lr_b, extra_blk))


def _write_part(part: GearPart, arrs, slots: Array, complete: Array, sp: GearSpec, which: str) -> GearPart:
    """Writes compressed blocks (token rows at ``slots`` where ``complete``) into ``part``."""
    codes, scale, zero, idx, val, lr_a, lr_b = arrs
    c = part.codes.shape[2]
    el = sp.block
    tok = jnp.where(complete, slots, c)
    blk = jnp.where(complete[..., ::el], slots[..., ::el] // el, c // el)
    srows = blk if sp.axis(which) == "channel" else tok
    return GearPart(codes=scatter_slots(part.codes, tok, codes), scale=scatter_slots(part.scale, srows, scale),
                    zero=scatter_slots(part.zero, srows, zero), sp_idx=scatter_slots(part.sp_idx, blk, idx),
                    sp_val=scatter_slots(part.sp_val, blk, val), lr_a=scatter_slots(part.lr_a, tok, lr_a),
                    lr_b=scatter_slots(part.lr_b, blk, lr_b))


@struct.dataclass
class GearKV:
    """A GEAR-compressed layer: ``[compressed blocks (C) | streaming buffer (n_b)]`` slots, ``pos`` over both."""

    k: GearPart
    v: GearPart
    k_res: Array  # (B, H, n_b, D) full precision streaming buffer
    v_res: Array
    pos: Array  # (B, H, C + n_b)
    fill: Array  # (B, H) tokens held: q (multiple of n_b) compressed + r < n_b buffered
    spec: GearSpec = struct.field(pytree_node=False, default=GearSpec())
    window: int = struct.field(pytree_node=False, default=0)

    @property
    def q_capacity(self) -> int:
        return self.k.codes.shape[2]

    @property
    def capacity(self) -> int:
        return self.q_capacity + self.spec.block - 1

    @property
    def valid(self) -> Array:
        return self.pos >= 0

    def stored_kv(self) -> tuple[Array, Array]:
        k = jnp.concatenate([_reconstruct(self.k, self.spec, "k"), self.k_res.astype(jnp.float32)], axis=2)
        v = jnp.concatenate([_reconstruct(self.v, self.spec, "v"), self.v_res.astype(jnp.float32)], axis=2)
        return k, v

    def dense(self) -> tuple[Array, Array]:
        k, v = self.stored_kv()
        return k.astype(self.k_res.dtype), v.astype(self.v_res.dtype)

    def attend(self, q, q_pos, *, sm_scale=None, softcap: float = 0.0, observe: Observe = Observe(),
               impl: str = "reference"):
        """Reference path: reconstruct ``D̂ + L + S`` and attend (there is no GEAR kernel; ``impl`` is checked)."""
        if impl not in ("reference", "pallas"):
            raise ValueError(f"unknown attention impl {impl!r}; choose 'reference' or 'pallas'")
        k, v = self.stored_kv()
        out, obs = reference_attention(q, k, v, q_pos, self.pos, sm_scale=sm_scale, window=self.window,
                                       softcap=softcap, observe=observe)
        return out, obs

    def append(self, k: Array, v: Array, pos: Array) -> "GearKV":
        """New tokens go to the streaming buffer; a full buffer is compressed as one block (jit-safe)."""
        el = self.spec.block
        n = k.shape[2]
        pos_h = jnp.broadcast_to(pos[:, None, :], k.shape[:3]).astype(jnp.int32)
        q = (self.fill // el) * el
        r = self.fill - q
        c = self.q_capacity
        blk_k, blk_v, blk_p, m, new_k, new_v, new_p = stream_append(
            self.k_res, self.v_res, self.pos[..., c:], r, k.astype(self.k_res.dtype), v.astype(self.v_res.dtype),
            pos_h)
        nblk = blk_k.shape[2] // el
        j = jnp.arange(blk_k.shape[2], dtype=jnp.int32)
        slots = jnp.broadcast_to(q[..., None] + j, blk_p.shape)
        complete = (j // el)[None, None, :] < m[..., None]
        b, h = self.fill.shape

        def flush(parts):
            kp, vp, p = parts
            valid = (blk_p >= 0).reshape(b, h, nblk, el)
            ka = _compress_blocks(blk_k.reshape(b, h, nblk, el, blk_k.shape[-1]), valid, self.spec, "k")
            va = _compress_blocks(blk_v.reshape(b, h, nblk, el, blk_v.shape[-1]), valid, self.spec, "v")
            kp = _write_part(kp, ka, slots, complete, self.spec, "k")
            vp = _write_part(vp, va, slots, complete, self.spec, "v")
            p = scatter_slots(p, jnp.where(complete, slots, p.shape[2]), blk_p)
            return kp, vp, p

        kp, vp, p = jax.lax.cond(jnp.any(m > 0), flush, lambda a: a, (self.k, self.v, self.pos))
        p = jnp.concatenate([p[..., :c], new_p], axis=-1)
        return self.replace(k=kp, v=vp, pos=p, k_res=new_k, v_res=new_v, fill=self.fill + n)


def gear_dense_layer(layer, sp: GearSpec, room: int = 0) -> tuple[GearKV, Array, Array]:
    """Compresses a :class:`kvjax.state.DenseKV` (slots ``[0, fill)`` of each head) into a :class:`GearKV`."""
    if getattr(layer, "ring_start", -1) >= 0:
        raise ValueError("cannot compress a ring-buffer (sliding-window or StreamingLLM) layer with GEAR")
    b, h, c, d = layer.k.shape
    el = sp.block
    n = layer.fill
    cq = ((c + room) // el) * el
    length = min((c // el) * el, cq)
    q0 = (n // el) * el
    j = jnp.arange(length, dtype=jnp.int32)
    in_q = j < q0[..., None]
    ps = jnp.where(in_q, layer.pos[..., :length], -1)
    valid = (ps >= 0).reshape(b, h, length // el, el)
    ka = _compress_blocks(layer.k[:, :, :length].reshape(b, h, length // el, el, d), valid, sp, "k")
    va = _compress_blocks(layer.v[:, :, :length].reshape(b, h, length // el, el, layer.v.shape[-1]), valid, sp, "v")
    extra = cq - length
    kp, vp = _part_from(_pad_part(ka, extra, sp, "k")), _part_from(_pad_part(va, extra, sp, "v"))
    ridx = q0[..., None] + jnp.arange(el, dtype=jnp.int32)
    rok = ridx < n[..., None]
    k_res = jnp.where(rok[..., None], gather_slots(layer.k, ridx), 0).astype(layer.k.dtype)
    v_res = jnp.where(rok[..., None], gather_slots(layer.v, ridx), 0).astype(layer.v.dtype)
    rpos = jnp.where(rok, gather_slots(layer.pos, ridx), -1)
    cache = GearKV(k=kp, v=vp, k_res=k_res, v_res=v_res, pos=jnp.concatenate([pad_slots(ps, extra, -1), rpos], -1),
                   fill=n, spec=sp, window=int(getattr(layer, "window", 0)))
    src = jnp.concatenate([pad_slots(jnp.broadcast_to(j, (b, h, length)), extra), ridx], axis=-1)
    ok = jnp.concatenate([pad_slots(in_q, extra, False), rok], axis=-1)
    return cache, src, ok


@register
@dataclasses.dataclass(frozen=True)
class GEAR(Method):
    """GEAR: quantization + low-rank residual + sparse outliers, with a streaming buffer (see module docstring)."""

    bits: int = 4
    buffer: int = 20
    rank_ratio: float = 0.02
    rank: int = 0  # > 0 overrides rank_ratio
    outlier_ratio: float = 0.02
    iters: int = 3
    quant: str = "kcvt"
    group: int = 0
    scale_dtype: str = "float16"
    name: ClassVar[str] = "gear"
    kind: ClassVar[str] = "quantized"

    def __post_init__(self):
        qz.check_bits(self.bits)
        if isinstance(self.buffer, bool) or not isinstance(self.buffer, int) or self.buffer <= 0:
            raise ValueError(f"gear buffer (n_b) must be a positive integer, got {self.buffer!r}")
        if not 0.0 <= self.rank_ratio <= 1.0:
            raise ValueError(f"gear rank_ratio must be in [0, 1], got {self.rank_ratio}")
        if not 0.0 <= self.outlier_ratio < 1.0:
            raise ValueError(f"gear outlier_ratio must be in [0, 1), got {self.outlier_ratio}")
        if self.rank < 0 or self.iters <= 0:
            raise ValueError(f"gear rank must be >= 0 and iters > 0, got rank={self.rank}, iters={self.iters}")
        if self.quant not in ("kcvt", "token"):
            raise ValueError(f"gear quant must be 'kcvt' or 'token', got {self.quant!r}")
        if self.group < 0:
            raise ValueError(f"gear group must be >= 0 (0 = whole head), got {self.group}")

    def spec(self, head_dim: int) -> GearSpec:
        el = self.buffer
        rank = self.rank or (max(1, math.ceil(self.rank_ratio * min(el, head_dim))) if self.rank_ratio > 0 else 0)
        rank = min(rank, el, head_dim)
        k_each = max(1, int(self.outlier_ratio / 2 * el * head_dim)) if self.outlier_ratio > 0 else 0
        group = qz.resolve_group(self.group, head_dim, self.bits, "gear group")
        return GearSpec(bits=self.bits, block=el, rank=rank, k_each=k_each, iters=self.iters, quant=self.quant,
                        group=group, scale_dtype=self.scale_dtype)

    def validate(self, ctx: Context) -> None:
        from kvjax.quant import packing  # noqa: PLC0415

        packing.packed_dim(ctx.cfg.head_dim, self.bits)
        self.spec(ctx.cfg.head_dim)

    def prefill(self, state, obs, ctx: Context):
        def one(i, layer, o):
            cache, src, ok = gear_dense_layer(layer, self.spec(layer.k.shape[-1]), room_for(layer, ctx))
            return cache, convert_obs(o, src, ok)

        return map_global_layers(state, obs, one)

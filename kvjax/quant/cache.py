"""Quantized layer caches: :class:`QuantizedKV` (KIVI layout + options) and its building blocks.

Storage of one layer (``B`` batch, ``H`` KV heads, ``D``/``Dv`` key/value head dims), slots in attention order
``[keep (S) | quantized (Cq) | residual (R)]``:

* ``keep`` (optional :class:`KeepBlock`): ``S`` tokens per head stored apart, in full precision (``bits=16``) or
  per-token int8/int4 — attention sinks (RotateKV) or the important tokens of mixed precision (MiKV).
* the quantized part, exactly the layout of ``pallas_kernels.quantized_decode_attention``:
  ``k_codes`` uint8 ``(B, H, Cq, D * bits / 8)`` (2/4-bit codes packed little-endian into bytes, 8-bit as is),
  quantized per channel over groups of ``Gk`` tokens (``k_scale``/``k_zero`` ``(B, H, Cq // Gk, D)``; or per token
  over groups of ``Gk`` channels, ``(B, H, Cq, D // Gk)``, when ``spec.k_axis == "token"``), ``v_codes``
  ``(B, H, Cq, Dv * v_bits / 8)`` per token over groups of ``Gv`` channels (``v_scale``/``v_zero``
  ``(B, H, Cq, Dv // Gv)``);
* the full-precision residual ``k_res``/``v_res`` ``(B, H, R, D|Dv)`` (KIVI's recent window): new tokens are written
  there; when it holds ``R`` tokens it is quantized as one group of ``R`` tokens (``R / Gk`` key groups) and written
  at the next free quantized slots. With ``R = 0`` (per-token keys only) tokens are quantized as they arrive.
  With ``spec.v_slide`` (KIVI's sliding value window) ``v_res`` is a ring of the last ``R`` values: slot ``s < r``
  holds residual token ``s``, slot ``s >= r`` the full-precision value of quantized slot ``q - R + s`` (the last
  complete group), which attention reads instead of its codes — exactly ``R`` values in full precision.
* ``pos`` ``(B, H, S + Cq + R)``: original position of every slot in that order (``-1`` = empty), ``fill``
  ``(B, H)``: slots used, ``S + q + r`` with ``q`` quantized tokens (a multiple of ``R``) and ``r < R`` residual
  tokens — both derived from ``fill`` (``q = (fill - S) // R * R``).
* optional orthogonal/diagonal key transforms, undone on the query side (``q·k = (q T^-T)·(k T)``): ``k_balance``
  ``(B, H, D)`` (MiKV's channel balancer: keys stored as ``k * b``, queries used as ``q / b``), ``k_perm``
  ``(B, H, D)`` (channel reordering) and a Hadamard rotation (``spec.k_rotate``) — RotateKV; values may be rotated
  too (``spec.v_rotate``), undone on the attention output (``o = (P V H) H``).

``attend`` here is the *reference* path: it dequantizes the cache (all slots, in f32) and runs
:func:`kvjax.attention.reference_attention`. With ``impl="pallas"`` a decode step (no observations, ``T <= 16``)
over a KIVI-layout cache (per-channel keys, a residual, no keep block) runs
``pallas_kernels.quantized_decode_attention`` instead (with a sliding value window the last complete key group is
passed to it as extra full-precision slots, see :meth:`QuantizedKV._kernel_inputs`), which dequantizes block by
block in on-chip memory (the fast path). :func:`kvjax.nbytes` counts exactly the stored arrays: packed codes,
scales/zeros, residual, positions.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.attention import Observe, reference_attention
from kvjax.quant import packing
from kvjax.quant import quantizers as qz

Array = jax.Array


# ------------------------------------------------------------------------------------------------- helpers


def scatter_slots(buf: Array, idx: Array, new: Array) -> Array:
    """``buf`` ``(B, H, C, ...)``: writes ``new`` ``(B, H, n, ...)`` at slots ``idx`` ``(B, H, n)``; out of range
    indices are dropped."""
    return jax.vmap(jax.vmap(lambda b, i, x: b.at[i].set(x, mode="drop")))(buf, idx, new.astype(buf.dtype))


def gather_slots(x: Array, idx: Array) -> Array:
    """``x`` ``(B, H, C, ...)`` gathered along the slot axis with ``idx`` ``(B, H, K)`` (clipped to range)."""
    idx = jnp.clip(idx, 0, max(x.shape[2] - 1, 0))
    ix = idx.reshape(idx.shape + (1,) * (x.ndim - 3))
    return jnp.take_along_axis(x, ix, axis=2)


def pad_slots(x: Array, n: int, value=0, axis: int = 2) -> Array:
    if n <= 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n)
    return jnp.pad(x, pad, constant_values=value)


def stream_append(res_k: Array, res_v: Array, res_pos: Array, r: Array, k: Array, v: Array, pos_h: Array,
                  slide_v: bool = False):
    """Writes ``n`` new tokens after the ``r`` ``(B, H)`` tokens of a residual window of ``R`` slots.

    Returns ``(blk_k, blk_v, blk_pos, m, new_k, new_v, new_pos)``: the first ``M * R`` tokens of the buffer
    (residual + new; ``M = (R - 1 + n) // R`` static), of which the first ``m`` ``(B, H)`` groups of ``R`` tokens are
    complete and must be flushed, and the residual that remains (``r + n - m * R`` tokens).

    ``slide_v``: ``res_v`` is a ring of the last ``R`` values (see :class:`QuantizedKV`): ring slot ``s`` holds the
    value of the token whose stream index is ``s`` modulo ``R`` among the last ``R``; ``new_v`` is the updated ring.
    """
    b, h, rr, _ = res_k.shape
    n = k.shape[2]
    idx = r[..., None] + jnp.arange(n, dtype=jnp.int32)
    buf_k = scatter_slots(pad_slots(res_k, n), idx, k)
    buf_v = scatter_slots(pad_slots(res_v, n), idx, v)
    buf_p = scatter_slots(pad_slots(res_pos, n, -1), idx, pos_h)
    total = r + n
    m = total // rr
    big_m = (rr - 1 + n) // rr
    ridx = m[..., None] * rr + jnp.arange(rr, dtype=jnp.int32)
    ok = ridx < total[..., None]
    new_k = jnp.where(ok[..., None], gather_slots(buf_k, ridx), 0).astype(res_k.dtype)
    new_v = jnp.where(ok[..., None], gather_slots(buf_v, ridx), 0).astype(res_v.dtype)
    new_p = jnp.where(ok, gather_slots(buf_p, ridx), -1)
    if slide_v:  # the last R values: slot s < r' from the new residual, s >= r' from the last complete group
        s = jnp.arange(rr, dtype=jnp.int32)
        new_r = (total - m * rr)[..., None]
        vidx = jnp.where(s < new_r, m[..., None] * rr + s, jnp.where(m[..., None] > 0, (m[..., None] - 1) * rr + s, s))
        new_v = gather_slots(buf_v, vidx).astype(res_v.dtype)
    n_blk = big_m * rr
    return buf_k[:, :, :n_blk], buf_v[:, :, :n_blk], buf_p[:, :, :n_blk], m, new_k, new_v, new_p


# ------------------------------------------------------------------------------------------------- spec


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Static description of a :class:`QuantizedKV` (hashable; part of the pytree's static structure).

    ``k_group``: tokens per key group (``k_axis="channel"``, KIVI) or channels per key group (``"token"``);
    ``v_group``: channels per value group; ``0`` = the whole head. ``residual``: full-precision window ``R``.
    """

    bits: int = 2
    v_bits: int = 2
    k_group: int = 32
    v_group: int = 32
    k_axis: str = "channel"
    residual: int = 128
    k_rotate: bool = False
    v_rotate: bool = False
    rot_block: int = 0  # Hadamard block size (0 = largest power of two dividing head_dim)
    scale_dtype: str = "float16"
    v_slide: bool = False  # values: the last R tokens in full precision (KIVI's sliding value window)

    def resolve(self, head_dim: int, v_head_dim: int) -> "QuantSpec":
        """Validates against the head dims and fills in defaults (``0`` groups → whole head)."""
        qz.check_bits(self.bits)
        qz.check_bits(self.v_bits, "v_bits")
        qz.check_axis(self.k_axis)
        if isinstance(self.residual, bool) or not isinstance(self.residual, (int, np.integer)) or self.residual < 0:
            raise ValueError(f"residual must be an integer >= 0, got {self.residual!r}")
        try:
            jnp.dtype(self.scale_dtype)
        except TypeError as e:
            raise ValueError(f"unknown scale_dtype {self.scale_dtype!r}") from e
        if not jnp.issubdtype(jnp.dtype(self.scale_dtype), jnp.floating):
            raise ValueError(f"scale_dtype must be a float dtype, got {self.scale_dtype!r}")
        packing.packed_dim(head_dim, self.bits)
        packing.packed_dim(v_head_dim, self.v_bits)
        vg = qz.resolve_group(self.v_group, v_head_dim, self.v_bits, "value group")
        if self.k_axis == "token":
            kg = qz.resolve_group(self.k_group, head_dim, self.bits, "key group")
        else:
            kg = self.k_group
            if kg <= 0:
                raise ValueError(f"key group (tokens per per-channel scale) must be positive, got {kg}")
            if self.residual < kg or self.residual % kg:
                raise ValueError(f"per-channel keys are quantized in whole groups of {kg} tokens: the residual "
                                 f"window ({self.residual}) must be a positive multiple of the group")
        if self.v_slide and self.residual <= 0:
            raise ValueError("a sliding value window (v_slide) needs a residual window R > 0")
        rb = qz.hadamard_block(head_dim, self.rot_block) if (self.k_rotate or self.v_rotate) else self.rot_block
        if self.v_rotate:
            qz.hadamard_block(v_head_dim, rb)
        return dataclasses.replace(self, k_group=kg, v_group=vg, rot_block=rb)


# ------------------------------------------------------------------------------------------------- transforms


def _hmat(dim: int, block: int) -> Array:
    return jnp.asarray(qz.hadamard_matrix(dim, block))


def key_forward(k: Array, spec: QuantSpec, k_balance, k_perm) -> Array:
    """Keys ``(B, H, T, D)`` → stored space: ``(k * balance)[perm] @ H`` (each step optional). f32."""
    x = k.astype(jnp.float32)
    if k_balance is not None:
        x = x * k_balance.astype(jnp.float32)[:, :, None, :]
    if k_perm is not None:
        x = jnp.take_along_axis(x, jnp.broadcast_to(k_perm.astype(jnp.int32)[:, :, None, :], x.shape), axis=-1)
    if spec.k_rotate:
        x = x @ _hmat(x.shape[-1], spec.rot_block)
    return x


def key_inverse(x: Array, spec: QuantSpec, k_balance, k_perm) -> Array:
    x = x.astype(jnp.float32)
    if spec.k_rotate:
        x = x @ _hmat(x.shape[-1], spec.rot_block)
    if k_perm is not None:
        inv = jnp.argsort(k_perm.astype(jnp.int32), axis=-1)
        x = jnp.take_along_axis(x, jnp.broadcast_to(inv[:, :, None, :], x.shape), axis=-1)
    if k_balance is not None:
        x = x / k_balance.astype(jnp.float32)[:, :, None, :]
    return x


def query_forward(q: Array, spec: QuantSpec, k_balance, k_perm, num_kv_heads: int) -> Array:
    """Queries ``(B, Hq, T, D)`` into the stored key space (the inverse-transpose of the key transform)."""
    if k_balance is None and k_perm is None and not spec.k_rotate:
        return q
    b, hq, t, d = q.shape
    x = q.astype(jnp.float32).reshape(b, num_kv_heads, hq // num_kv_heads, t, d)
    if k_balance is not None:
        x = x / k_balance.astype(jnp.float32)[:, :, None, None, :]
    if k_perm is not None:
        x = jnp.take_along_axis(x, jnp.broadcast_to(k_perm.astype(jnp.int32)[:, :, None, None, :], x.shape), -1)
    if spec.k_rotate:
        x = x @ _hmat(d, spec.rot_block)
    return x.reshape(b, hq, t, d)


def value_forward(v: Array, spec: QuantSpec) -> Array:
    x = v.astype(jnp.float32)
    return x @ _hmat(x.shape[-1], spec.rot_block) if spec.v_rotate else x


value_inverse = value_forward  # the normalised Hadamard matrix is symmetric and its own inverse


# ------------------------------------------------------------------------------------------------- keep block


@struct.dataclass
class KeepBlock:
    """``S`` tokens per head kept outside the low-bit stream (attention sinks, important tokens).

    ``bits=16``: ``k``/``v`` are float arrays in the cache dtype; ``bits`` 8/4/2: packed per-token codes with
    ``k_scale``/``k_zero`` ``(B, H, S, D // group)`` (and the same for values).
    """

    k: Array
    v: Array
    k_scale: Array | None = None
    k_zero: Array | None = None
    v_scale: Array | None = None
    v_zero: Array | None = None
    bits: int = struct.field(pytree_node=False, default=16)
    group: int = struct.field(pytree_node=False, default=0)
    v_group: int = struct.field(pytree_node=False, default=0)

    @property
    def size(self) -> int:
        return self.k.shape[2]

    @staticmethod
    def build(k: Array, v: Array, valid: Array, *, bits: int = 16, group: int = 0, scale_dtype="float16",
              dtype=jnp.float32) -> "KeepBlock":
        """From (already transformed) keys/values ``(B, H, S, D)``; invalid slots are zeroed."""
        k = jnp.where(valid[..., None], k, 0)
        v = jnp.where(valid[..., None], v, 0)
        if bits == 16:
            return KeepBlock(k=k.astype(dtype), v=v.astype(dtype))
        qz.check_bits(bits, "keep bits")
        g = qz.resolve_group(group, k.shape[-1], bits, "keep group")
        gv = qz.resolve_group(group, v.shape[-1], bits, "keep group")
        kc, ks, kz = qz.quantize(k, valid, bits=bits, group=g, axis="token", scale_dtype=jnp.dtype(scale_dtype))
        vc, vs, vz = qz.quantize(v, valid, bits=bits, group=gv, axis="token", scale_dtype=jnp.dtype(scale_dtype))
        return KeepBlock(k=kc, v=vc, k_scale=ks, k_zero=kz, v_scale=vs, v_zero=vz, bits=bits, group=g, v_group=gv)

    def dequant(self) -> tuple[Array, Array]:
        """Stored-space keys/values, f32."""
        if self.bits == 16:
            return self.k.astype(jnp.float32), self.v.astype(jnp.float32)
        k = qz.dequantize(self.k, self.k_scale, self.k_zero, bits=self.bits, group=self.group, axis="token")
        v = qz.dequantize(self.v, self.v_scale, self.v_zero, bits=self.bits, group=self.v_group, axis="token")
        return k, v


# ------------------------------------------------------------------------------------------------- the cache


@struct.dataclass
class QuantizedKV:
    """One layer's quantized KV cache (see module docstring)."""

    k_codes: Array
    k_scale: Array
    k_zero: Array
    v_codes: Array
    v_scale: Array
    v_zero: Array
    k_res: Array
    v_res: Array
    pos: Array
    fill: Array
    keep: KeepBlock | None = None
    k_perm: Array | None = None
    k_balance: Array | None = None
    # per-head method state carried from the dense layer it was made from, ``(B, H)`` arrays only (LaCache's cursor;
    # slot-aligned statistics cannot follow the quantized layout and are dropped)
    extras: dict[str, Array] = struct.field(default_factory=dict)
    spec: QuantSpec = struct.field(pytree_node=False, default=QuantSpec())
    window: int = struct.field(pytree_node=False, default=0)

    # ---- shapes
    @property
    def head_dim(self) -> int:
        return self.k_res.shape[-1]

    @property
    def v_head_dim(self) -> int:
        return self.v_res.shape[-1]

    @property
    def n_keep(self) -> int:
        return 0 if self.keep is None else self.keep.size

    @property
    def q_capacity(self) -> int:
        return self.k_codes.shape[2]

    @property
    def residual(self) -> int:
        return self.k_res.shape[2]

    @property
    def capacity(self) -> int:
        """Most tokens the layer can hold (the residual flushes when it reaches ``R``, so it holds ``< R``)."""
        return self.n_keep + self.q_capacity + max(self.residual - 1, 0)

    @property
    def valid(self) -> Array:
        return self.pos >= 0

    @property
    def dtype(self):
        return self.k_res.dtype

    def _counts(self):
        stream = self.fill - self.n_keep
        r_cap = self.residual
        if r_cap == 0:
            return stream, jnp.zeros_like(stream)
        q = (stream // r_cap) * r_cap
        return q, stream - q

    # ---- storage views (stored, i.e. transformed, space)
    def quant_pos(self) -> Array:
        """Positions of the quantized slots ``(B, H, Cq)`` (the kernel's ``pos``)."""
        s = self.n_keep
        return self.pos[..., s:s + self.q_capacity]

    def res_pos(self) -> Array:
        """Positions of the residual slots ``(B, H, R)``."""
        return self.pos[..., self.n_keep + self.q_capacity:]

    def slide_slots(self) -> tuple[Array, Array]:
        """With a sliding value window (``spec.v_slide``): for every quantized slot ``(B, H, Cq)`` the ring slot of
        ``v_res`` holding its full-precision value and whether it does (the last ``R - r`` quantized tokens)."""
        q, r = self._counts()
        rr = self.residual
        j = jnp.arange(self.q_capacity, dtype=jnp.int32)
        s = j - q[..., None] + rr
        return s, (s >= r[..., None]) & (s < rr) & (j < q[..., None])

    def dequant_quantized(self) -> tuple[Array, Array]:
        """The quantized slots dequantized, stored space, f32 ``(B, H, Cq, D)`` (with a sliding value window the
        values of the last ``R - r`` quantized tokens are the full-precision ones)."""
        sp = self.spec
        k = qz.dequantize(self.k_codes, self.k_scale, self.k_zero, bits=sp.bits, group=sp.k_group, axis=sp.k_axis)
        v = qz.dequantize(self.v_codes, self.v_scale, self.v_zero, bits=sp.v_bits, group=sp.v_group, axis="token")
        if sp.v_slide:
            s, fp = self.slide_slots()
            v = jnp.where(fp[..., None], gather_slots(self.v_res.astype(jnp.float32), s), v)
        return k, v

    def residual_values(self) -> Array:
        """Values of the residual slots ``(B, H, R, Dv)`` (ring slots past ``r`` zeroed with a sliding window)."""
        if not self.spec.v_slide:
            return self.v_res
        _, r = self._counts()
        return jnp.where((jnp.arange(self.residual) < r[..., None])[..., None], self.v_res, 0).astype(self.v_res.dtype)

    def _kernel_inputs(self):
        """Arguments of the quantized decode kernel. With a sliding value window the last complete key group
        (whose values are partly full precision) is passed as extra full-precision slots: its keys dequantized,
        its values from the ring, and its quantized slots masked — the kernel then computes exactly the reference."""
        qpos, k_res, v_res, res_pos = self.quant_pos(), self.k_res, self.v_res, self.res_pos()
        if not self.spec.v_slide:
            return qpos, k_res, v_res, res_pos
        sp, rr = self.spec, self.residual
        q, r = self._counts()
        s = jnp.arange(rr, dtype=jnp.int32)
        slots = jnp.maximum(q[..., None] - rr, 0) + s  # the last complete group (q is a multiple of R)
        have = (q >= rr)[..., None]
        rows = slots[..., ::sp.k_group] // sp.k_group
        kg = qz.dequantize(gather_slots(self.k_codes, slots), gather_slots(self.k_scale, rows),
                           gather_slots(self.k_zero, rows), bits=sp.bits, group=sp.k_group, axis=sp.k_axis)
        gpos = jnp.where(have & (s >= r[..., None]), gather_slots(qpos, slots), -1)
        _, fp = self.slide_slots()
        qpos = jnp.where(fp, -1, qpos)
        # ring slots >= r hold the group's values; slots < r (the residual's) are masked out of the second half
        return (qpos, jnp.concatenate([k_res, kg.astype(k_res.dtype)], axis=2),
                jnp.concatenate([self.residual_values(), v_res], axis=2),
                jnp.concatenate([jnp.where(s < r[..., None], res_pos, -1), gpos], axis=-1))

    def stored_kv(self) -> tuple[Array, Array]:
        """All slots ``[keep | quantized | residual]`` dequantized in the stored space, f32."""
        ks, vs = [], []
        if self.keep is not None:
            kk, kv = self.keep.dequant()
            ks.append(kk)
            vs.append(kv)
        kq, vq = self.dequant_quantized()
        ks += [kq, self.k_res.astype(jnp.float32)]
        vs += [vq, self.residual_values().astype(jnp.float32)]
        return jnp.concatenate(ks, axis=2), jnp.concatenate(vs, axis=2)

    # ---- key transforms (a subclass storing keys differently, e.g. pre-RoPE, overrides these three)
    def key_to_stored(self, k: Array, pos: Array) -> Array:
        """New post-RoPE keys ``(B, H, n, D)`` at positions ``pos`` ``(B, n)`` → the stored space (f32)."""
        return key_forward(k, self.spec, self.k_balance, self.k_perm)

    def key_from_stored(self, k: Array) -> Array:
        """Stored-space keys of all slots ``(B, H, S, D)`` → post-RoPE keys (f32)."""
        return key_inverse(k, self.spec, self.k_balance, self.k_perm)

    def attention_operands(self, q: Array) -> tuple[Array, Array, Array]:
        """``(queries, keys, values)`` the reference path attends with: queries moved into the stored key space
        (``q·k`` is unchanged by the key transforms), keys and values dequantized in the stored space."""
        k, v = self.stored_kv()
        return query_forward(q, self.spec, self.k_balance, self.k_perm, self.pos.shape[1]), k, v

    def dense(self) -> tuple[Array, Array]:
        """Dequantized keys and values ``(B, H, S + Cq + R, D)`` in slot order (aligned with ``pos``), transforms
        undone, in the cache dtype."""
        k, v = self.stored_kv()
        k = self.key_from_stored(k)
        v = value_inverse(v, self.spec)
        return k.astype(self.dtype), v.astype(self.dtype)

    # ---- attention
    def _kernel_ok(self, t: int, observe: Observe) -> bool:
        return (not observe and t <= 16 and self.spec.k_axis == "channel" and self.keep is None
                and self.residual > 0 and self.q_capacity > 0)

    def attend(self, q: Array, q_pos: Array, *, sm_scale: float | None = None, softcap: float = 0.0,
               observe: Observe = Observe(), impl: str = "reference") -> tuple[Array, dict]:
        """Attention of ``q`` ``(B, Hq, T, D)`` over the cache (reference path: dequantize, then
        :func:`kvjax.attention.reference_attention`; ``impl="pallas"``: the quantized decode kernel when eligible).
        Observations are over the slots in ``pos`` order."""
        if impl not in ("reference", "pallas"):
            raise ValueError(f"unknown attention impl {impl!r}; choose 'reference' or 'pallas'")
        b, hq, t, d = q.shape
        scale = d ** -0.5 if sm_scale is None else sm_scale
        if impl == "pallas" and self._kernel_ok(t, observe):
            qt = query_forward(q, self.spec, self.k_balance, self.k_perm, self.pos.shape[1])
            from pallas_kernels.quantized_decode_attention import quantized_decode_attention  # noqa: PLC0415

            qpos, k_res, v_res, res_pos = self._kernel_inputs()
            out = quantized_decode_attention(
                qt.astype(self.dtype), self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale,
                self.v_zero, qpos, q_pos, bits=self.spec.bits, v_bits=self.spec.v_bits,
                k_res=k_res, v_res=v_res, res_pos=res_pos, sm_scale=scale, window=self.window,
                logit_softcap=softcap)
            obs = {}
        else:
            qt, k, v = self.attention_operands(q)
            out, obs = reference_attention(qt.astype(jnp.float32), k, v, q_pos, self.pos, sm_scale=scale,
                                           window=self.window, softcap=softcap, observe=observe)
            if "window_q" in obs:
                obs["window_q"] = q[:, :, t - obs["window_q"].shape[2]:]
        if self.spec.v_rotate:
            out = value_inverse(out, self.spec)
        return out.astype(q.dtype), obs

    # ---- writes
    def _quantize_tokens(self, k: Array, v: Array, valid: Array):
        sp = self.spec
        kc, ks, kz = qz.quantize(k, valid, bits=sp.bits, group=sp.k_group, axis=sp.k_axis,
                                 scale_dtype=self.k_scale.dtype)
        vc, vs, vz = qz.quantize(v, valid, bits=sp.v_bits, group=sp.v_group, axis="token",
                                 scale_dtype=self.v_scale.dtype)
        return kc, ks, kz, vc, vs, vz

    def _write_quantized(self, arrays, k: Array, v: Array, pos_h: Array, slots: Array, complete: Array):
        """Quantizes ``k``/``v`` ``(B, H, n, D)`` and writes them at quantized slots ``slots`` ``(B, H, n)`` where
        ``complete`` (else dropped). ``arrays`` = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos)."""
        kc0, ks0, kz0, vc0, vs0, vz0, pos0 = arrays
        sp = self.spec
        cq = self.q_capacity
        kc, ks, kz, vc, vs, vz = self._quantize_tokens(k, v, pos_h >= 0)
        tok = jnp.where(complete, slots, cq)
        kc0, vc0 = scatter_slots(kc0, tok, kc), scatter_slots(vc0, tok, vc)
        vs0, vz0 = scatter_slots(vs0, tok, vs), scatter_slots(vz0, tok, vz)
        if sp.k_axis == "channel":
            g = sp.k_group
            rows = jnp.where(complete[..., ::g], slots[..., ::g] // g, cq // g)
            ks0, kz0 = scatter_slots(ks0, rows, ks), scatter_slots(kz0, rows, kz)
        else:
            ks0, kz0 = scatter_slots(ks0, tok, ks), scatter_slots(kz0, tok, kz)
        pslot = jnp.where(complete, self.n_keep + slots, pos0.shape[2])
        pos0 = scatter_slots(pos0, pslot, pos_h)
        return kc0, ks0, kz0, vc0, vs0, vz0, pos0

    def append(self, k: Array, v: Array, pos: Array) -> "QuantizedKV":
        """Writes ``n`` new tokens (``k``/``v`` ``(B, H, n, D)``, ``pos`` ``(B, n)``, ``-1`` = padding); jit-safe.

        They go to the residual; every time it reaches ``R`` tokens that group is quantized and written at the next
        quantized slots (with ``R = 0`` tokens are quantized immediately). Tokens past the capacity are dropped.
        """
        n = k.shape[2]
        kt = self.key_to_stored(k, pos).astype(self.dtype)
        vt = value_forward(v, self.spec).astype(self.v_res.dtype)
        pos_h = jnp.broadcast_to(pos[:, None, :], kt.shape[:3]).astype(jnp.int32)
        q, r = self._counts()
        arrays = (self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero, self.pos)
        rr = self.residual
        if rr == 0:
            slots = q[..., None] + jnp.arange(n, dtype=jnp.int32)
            arrays = self._write_quantized(arrays, kt, vt, pos_h, slots, jnp.ones(slots.shape, bool))
            kc, ks, kz, vc, vs, vz, p = arrays
            return self.replace(k_codes=kc, k_scale=ks, k_zero=kz, v_codes=vc, v_scale=vs, v_zero=vz, pos=p,
                                fill=self.fill + n)
        blk_k, blk_v, blk_p, m, new_k, new_v, new_p = stream_append(self.k_res, self.v_res, self.res_pos(), r, kt, vt,
                                                                    pos_h, slide_v=self.spec.v_slide)
        if blk_k.shape[2]:
            j = jnp.arange(blk_k.shape[2], dtype=jnp.int32)
            slots = jnp.broadcast_to(q[..., None] + j, blk_p.shape)
            complete = (j // rr)[None, None, :] < m[..., None]

            def flush(a):
                return self._write_quantized(a, blk_k, blk_v, blk_p, slots, complete)

            arrays = jax.lax.cond(jnp.any(m > 0), flush, lambda a: a, arrays)
        kc, ks, kz, vc, vs, vz, p = arrays
        p = jnp.concatenate([p[..., :self.n_keep + self.q_capacity], new_p], axis=-1)
        return self.replace(k_codes=kc, k_scale=ks, k_zero=kz, v_codes=vc, v_scale=vs, v_zero=vz, pos=p,
                            k_res=new_k, v_res=new_v, fill=self.fill + n)


# ------------------------------------------------------------------------------------------------- construction


def init_quantized_layer(batch: int, num_kv_heads: int, capacity: int, head_dim: int, spec: QuantSpec,
                         dtype=jnp.float32, *, v_head_dim: int | None = None, window: int = 0) -> QuantizedKV:
    """An empty :class:`QuantizedKV` holding at least ``capacity`` tokens (quantized slots rounded down to whole
    residual groups; the residual adds ``R - 1``)."""
    dv = head_dim if v_head_dim is None else v_head_dim
    sp = spec.resolve(head_dim, dv)
    unit = max(sp.residual, 1)
    cq = max(capacity - max(sp.residual - 1, 0), 0)
    cq = -(-cq // unit) * unit
    b, h = batch, num_kv_heads
    sd = jnp.dtype(sp.scale_dtype)
    krows = qz.scale_rows(cq, sp.k_group, sp.k_axis)
    kcols = head_dim if sp.k_axis == "channel" else head_dim // sp.k_group
    return QuantizedKV(
        k_codes=jnp.zeros((b, h, cq, head_dim * sp.bits // 8), jnp.uint8),
        k_scale=jnp.zeros((b, h, krows, kcols), sd), k_zero=jnp.zeros((b, h, krows, kcols), sd),
        v_codes=jnp.zeros((b, h, cq, dv * sp.v_bits // 8), jnp.uint8),
        v_scale=jnp.zeros((b, h, cq, dv // sp.v_group), sd), v_zero=jnp.zeros((b, h, cq, dv // sp.v_group), sd),
        k_res=jnp.zeros((b, h, sp.residual, head_dim), dtype), v_res=jnp.zeros((b, h, sp.residual, dv), dtype),
        pos=jnp.full((b, h, cq + sp.residual), -1, jnp.int32), fill=jnp.zeros((b, h), jnp.int32),
        spec=sp, window=int(window))


def quantize_dense_layer(layer, spec: QuantSpec, *, room: int = 0, stream_idx: Array | None = None,
                         stream_n: Array | None = None, keep_idx: Array | None = None, keep_ok: Array | None = None,
                         keep_bits: int = 16, keep_group: int = 0, k_perm: Array | None = None,
                         k_balance: Array | None = None, k_stored: Array | None = None
                         ) -> tuple[QuantizedKV, Array, Array]:
    """Converts a :class:`kvjax.state.DenseKV` into a :class:`QuantizedKV` (jit-safe).

    The *stream* — by default slots ``[0, fill)`` of every head, or the slots ``stream_idx`` ``(B, H, N)`` of which
    the first ``stream_n`` ``(B, H)`` count — goes into the quantized part except its last ``n % R`` tokens, which
    stay in the full-precision residual (KIVI). ``keep_idx``/``keep_ok`` ``(B, H, S)`` select tokens for the
    :class:`KeepBlock` (``keep_bits`` 16 = full precision). The quantized part gets ``room`` more slots for decoding.
    ``k_stored``: the keys already in the stored space (a layer class with its own key transform, e.g. RotateKV's
    pre-RoPE grouped-head rotation); ``k_perm``/``k_balance`` are then only recorded.

    Returns ``(cache, src, ok)``: for every new slot ``(B, H, S + Cq + R)`` the old slot it came from and whether it
    holds a token (to re-order observations with :func:`kvjax.compress.evict.gather_obs`).
    """
    if getattr(layer, "ring_start", -1) >= 0:
        raise ValueError("cannot quantize a ring-buffer (sliding-window or StreamingLLM) layer; quantize before "
                         "ring eviction or leave local layers dense")
    b, h, c, d = layer.k.shape
    dv = layer.v.shape[-1]
    sp = spec.resolve(d, dv)
    if k_perm is not None:
        k_perm = k_perm.astype(jnp.uint8 if d <= 256 else jnp.int16)
    dtype = layer.k.dtype
    rr = sp.residual
    unit = max(rr, 1)
    kt = key_forward(layer.k, sp, k_balance, k_perm) if k_stored is None else k_stored.astype(jnp.float32)
    vt = value_forward(layer.v, sp)
    if stream_idx is None:
        stream_idx = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, h, c))
        stream_n = layer.fill
    stream_idx = stream_idx.astype(jnp.int32)
    nmax = stream_idx.shape[-1]
    stream_n = jnp.minimum(stream_n.astype(jnp.int32), nmax)
    cq = ((nmax + room) // unit) * unit
    q0 = (stream_n // unit) * unit if rr else stream_n
    length = min((nmax // unit) * unit, cq)
    j = jnp.arange(length, dtype=jnp.int32)
    src_q = stream_idx[..., :length]
    in_q = j < q0[..., None]
    ps = jnp.where(in_q, gather_slots(layer.pos, src_q), -1)
    ks, vs = gather_slots(kt, src_q), gather_slots(vt, src_q)
    sd = jnp.dtype(sp.scale_dtype)
    kc, ksc, kz = qz.quantize(ks, ps >= 0, bits=sp.bits, group=sp.k_group, axis=sp.k_axis, scale_dtype=sd)
    vc, vsc, vz = qz.quantize(vs, ps >= 0, bits=sp.v_bits, group=sp.v_group, axis="token", scale_dtype=sd)
    extra = cq - length
    extra_rows = qz.scale_rows(extra, sp.k_group, sp.k_axis) if extra else 0
    kc, vc = pad_slots(kc, extra), pad_slots(vc, extra)
    ksc, kz = pad_slots(ksc, extra_rows), pad_slots(kz, extra_rows)
    vsc, vz = pad_slots(vsc, extra), pad_slots(vz, extra)
    ps = pad_slots(ps, extra, -1)
    src_q, in_q = pad_slots(src_q, extra), pad_slots(in_q, extra, False)
    ridx = q0[..., None] + jnp.arange(rr, dtype=jnp.int32)
    rok = ridx < stream_n[..., None]
    src_r = gather_slots(stream_idx, ridx) if rr else jnp.zeros((b, h, 0), jnp.int32)
    k_res = jnp.where(rok[..., None], gather_slots(kt, src_r), 0).astype(dtype)
    v_res = jnp.where(rok[..., None], gather_slots(vt, src_r), 0).astype(layer.v.dtype)
    if sp.v_slide and rr:  # ring of the last R values: slot s >= r holds the value of quantized token q0 - R + s
        s = jnp.arange(rr, dtype=jnp.int32)
        vidx = jnp.where(s < (stream_n - q0)[..., None], ridx, q0[..., None] - rr + s)
        vok = (vidx >= 0) & (vidx < stream_n[..., None])
        v_res = jnp.where(vok[..., None], gather_slots(vt, gather_slots(stream_idx, vidx)), 0).astype(layer.v.dtype)
    rpos = jnp.where(rok, gather_slots(layer.pos, src_r), -1)
    keep, pos_parts, src_parts, ok_parts, n_keep = None, [], [], [], 0
    if keep_idx is not None:
        kpos = jnp.where(keep_ok, gather_slots(layer.pos, keep_idx), -1)
        keep = KeepBlock.build(gather_slots(kt, keep_idx), gather_slots(vt, keep_idx), kpos >= 0, bits=keep_bits,
                               group=keep_group, scale_dtype=sp.scale_dtype, dtype=dtype)
        pos_parts.append(kpos)
        src_parts.append(keep_idx.astype(jnp.int32))
        ok_parts.append(kpos >= 0)
        n_keep = keep.size
    extras = {n: x for n, x in getattr(layer, "extras", {}).items() if getattr(x, "shape", ())[:2] == (b, h)
              and x.ndim == 2}  # per-head counters / cursors (B, H); slot-aligned statistics are dropped
    cache = QuantizedKV(k_codes=kc, k_scale=ksc, k_zero=kz, v_codes=vc, v_scale=vsc, v_zero=vz, k_res=k_res,
                        v_res=v_res, pos=jnp.concatenate(pos_parts + [ps, rpos], axis=-1),
                        fill=n_keep + stream_n, keep=keep, k_perm=k_perm, k_balance=k_balance, extras=extras, spec=sp,
                        window=int(getattr(layer, "window", 0)))
    src = jnp.concatenate(src_parts + [src_q, src_r], axis=-1)
    ok = jnp.concatenate(ok_parts + [in_q, rok], axis=-1)
    return cache, src, ok


# ------------------------------------------------------------------------------------------------- parts of other layers


@struct.dataclass
class QuantTensor:
    """A float tensor ``(..., n, d)`` stored quantized (asymmetric min/max, packed codes): the payload of a layer class
    that is not a plain KV cache, quantized by a quantizer after it in a chain (xKV's token-side factors, MiniCache's
    merged directions).

    ``axis="token"``: ``d // group`` scales per row (``group`` channels each); ``axis="channel"``: one scale per channel
    over groups of ``group`` rows. The rows are padded with invalid ones to a multiple of the row group, the columns
    with zero ones to a multiple of the channel group (or of the codes per byte) — a factor's width is its rank, which
    need not fit the quantizer's groups; the padding is stored, so ``kvjax.nbytes`` (codes, scales, zeros) counts it.
    ``n`` / ``d`` are the true row / column counts.
    """

    codes: Array
    scale: Array
    zero: Array
    bits: int = struct.field(pytree_node=False, default=8)
    group: int = struct.field(pytree_node=False, default=0)
    axis: str = struct.field(pytree_node=False, default="token")
    n: int = struct.field(pytree_node=False, default=0)
    d: int = struct.field(pytree_node=False, default=0)

    @staticmethod
    def build(x: Array, valid: Array | None, *, bits: int, group: int, axis: str, scale_dtype="float16",
              what: str = "tensor") -> "QuantTensor":
        """Quantizes ``x`` ``(..., n, d)``; ``valid`` ``(..., n)`` marks the rows that count for the min/max.
        ``group`` 0 = the whole axis. Refuses (one line, naming ``what``) a negative group."""
        qz.check_bits(bits)
        qz.check_axis(axis)
        if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 0:
            raise ValueError(f"cannot quantize {what}: group must be an integer >= 0, got {group!r}")
        n, d = x.shape[-2:]
        ppb = 8 // bits
        valid = jnp.ones(x.shape[:-1], bool) if valid is None else valid
        if axis == "token":
            g = -(-d // ppb) * ppb if group == 0 else -(-group // ppb) * ppb
            d_pad, n_pad = -(-d // g) * g, n
        else:
            g = max(n, 1) if group == 0 else group
            d_pad, n_pad = -(-d // ppb) * ppb, -(-n // g) * g
        xp = pad_slots(pad_slots(x.astype(jnp.float32), n_pad - n, axis=-2), d_pad - d, axis=-1)
        vp = pad_slots(valid, n_pad - n, False, axis=-1)
        codes, scale, zero = qz.quantize(xp, vp, bits=bits, group=g, axis=axis, scale_dtype=jnp.dtype(scale_dtype))
        return QuantTensor(codes=codes, scale=scale, zero=zero, bits=bits, group=g, axis=axis, n=n, d=d)

    def dequant(self, dtype=jnp.float32) -> Array:
        x = qz.dequantize(self.codes, self.scale, self.zero, bits=self.bits, group=self.group, axis=self.axis)
        return x[..., :self.n, :self.d].astype(dtype)


def dequant_any(x, dtype=jnp.float32) -> Array:
    """``x`` as a float array: dequantized when it is a :class:`QuantTensor`, cast otherwise."""
    return x.dequant(dtype) if isinstance(x, QuantTensor) else x.astype(dtype)


def quantize_sub_cache(layer, spec: QuantSpec):
    """A dense sub-cache of a composite layer (xKV's decode buffer, MiniCache's unmerged tokens), quantized as a
    quantizer quantizes a dense layer that already holds its decode room (no room added). A buffer smaller than the
    spec's full-precision residual window stays dense: the quantizer would keep all its tokens in full precision
    anyway (same attention, fewer bytes than a residual window of ``R`` slots)."""
    if layer.capacity < spec.residual:
        return layer
    return quantize_dense_layer(layer, spec, room=0)[0]


__all__ = ["KeepBlock", "QuantSpec", "QuantTensor", "QuantizedKV", "dequant_any", "quantize_sub_cache", "gather_slots", "init_quantized_layer", "key_forward",
           "key_inverse", "pad_slots", "quantize_dense_layer", "query_forward", "scatter_slots", "stream_append",
           "value_forward", "value_inverse"]

"""Split-KV GQA decode attention over a KIVI-style quantized cache plus its full-precision residual window.

Layout (see :mod:`kvjax.quant.packing`): ``k_codes`` ``(B, Hkv, C, D * bits / 8)`` uint8 quantized per channel over
groups of ``Gk`` tokens (``k_scale``/``k_zero`` ``(B, Hkv, C // Gk, D)``), ``v_codes`` ``(B, Hkv, C, Dv * v_bits / 8)``
quantized per token over groups of ``Gv`` channels (``v_scale``/``v_zero`` ``(B, Hkv, C, Dv // Gv)``), ``pos``
``(B, Hkv, C)``, and the residual ``k_res``/``v_res`` ``(B, Hkv, R, D|Dv)`` with ``res_pos`` ``(B, Hkv, R)``.

The kernel streams ``block_k`` slots (a multiple of ``Gk``) at a time, unpacks and dequantizes them in VMEM/SMEM and
runs the same online softmax as :mod:`pallas_kernels.decode_attention`; the residual is attended in that online
softmax too (once per head, in split 0), so the cache is never dequantized into HBM.

Unpacking without lane shuffles: a byte holds ``8 // bits`` codes of consecutive channels, so the kernel works in a
*plane-major* channel order (all bit-plane-0 channels, then plane 1, ...): each plane is one shift-and-mask of the
packed block. Queries are permuted to that order in the wrapper (tiny), per-channel key scales with an exact one-hot
matmul in the kernel (``C / Gk`` rows only), per-token value scales are expanded the same way, and the output is
permuted back in the wrapper.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kvjax.quant import packing
from pallas_kernels import _common as cm
from pallas_kernels import _flash

_STATIC = ("bits", "v_bits", "sm_scale", "window", "logit_softcap", "block_k", "num_splits", "interpret",
           "strategy", "backend", "unpack_layout")
LAYOUTS = ("plane_major", "natural")


def plane_major_perm(dim: int, bits: int) -> np.ndarray:
    """``perm[c]`` = natural channel of plane-major column ``c`` (column ``j * dim/ppb + i`` ↔ channel
    ``i * ppb + j``)."""
    ppb = 8 // bits
    w = dim // ppb
    c = np.arange(dim)
    return (c % w) * ppb + c // w


def _perm_matrix(dim: int, bits: int):
    """In-kernel one-hot ``(dim, dim)`` f32 matrix ``P`` with ``x_natural @ P = x_plane_major``."""
    ppb = 8 // bits
    w = dim // ppb
    d = lax.broadcasted_iota(jnp.int32, (dim, dim), 0)
    c = lax.broadcasted_iota(jnp.int32, (dim, dim), 1)
    return (d == lax.rem(c, jnp.int32(w)) * ppb + lax.div(c, jnp.int32(w))).astype(jnp.float32)


def _planes(codes, bits: int):
    """Packed ``(N, dim * bits / 8)`` uint8 → plane-major float codes ``(N, dim)`` f32."""
    ppb = 8 // bits
    c = codes.astype(jnp.int32)
    if ppb == 1:
        return c.astype(jnp.float32)
    mask = (1 << bits) - 1
    planes = [((c >> (j * bits)) & mask).astype(jnp.float32) for j in range(ppb)]
    return jnp.concatenate(planes, axis=1)


def _interleave(a, b):
    """``(N, W)``, ``(N, W)`` → ``(N, 2W)`` with ``a`` on even and ``b`` on odd columns (Triton's join + reshape)."""
    return jnp.concatenate([a[..., None], b[..., None]], axis=-1).reshape(a.shape[0], 2 * a.shape[1])


def _natural(codes, bits: int):
    """Packed ``(N, dim * bits / 8)`` uint8 → float codes ``(N, dim)`` f32 in natural channel order (interleave
    tree: a byte's code ``j`` is channel ``i * ppb + j``)."""
    ppb = 8 // bits
    c = codes.astype(jnp.int32)
    mask = (1 << bits) - 1
    planes = [(c >> (j * bits)) & mask for j in range(ppb)]
    while len(planes) > 1:
        half = len(planes) // 2
        planes = [_interleave(planes[i], planes[i + half]) for i in range(half)]
    return planes[0].astype(jnp.float32)


def _exact_matmul(x, m):
    return lax.dot_general(x.astype(jnp.float32), m, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=lax.Precision.HIGHEST)


def _dequant_k(codes, scale, zero, *, bits: int, dim: int, group: int, dtype, layout: str):
    """Keys of one block: ``codes (bk, D*bits/8)``, ``scale/zero (bk/Gk, D)`` (natural channel order) →
    ``(bk, D)`` in ``layout`` channel order."""
    sc, zz = scale.astype(jnp.float32), zero.astype(jnp.float32)
    if layout == "natural":
        c = _natural(codes, bits)
    else:
        c = _planes(codes, bits)
        if bits != 8:
            perm = _perm_matrix(dim, bits)
            sc, zz = _exact_matmul(sc, perm), _exact_matmul(zz, perm)
    ng = sc.shape[0]
    sc = jnp.broadcast_to(sc[:, None, :], (ng, group, dim)).reshape(ng * group, dim)
    zz = jnp.broadcast_to(zz[:, None, :], (ng, group, dim)).reshape(ng * group, dim)
    return (c * sc + zz).astype(dtype)


def _dequant_v(codes, scale, zero, *, bits: int, dim: int, group: int, dtype, layout: str):
    """Values of one block: ``codes (bk, Dv*bits/8)``, ``scale/zero (bk, Dv/Gv)`` → ``(bk, Dv)`` in ``layout``
    channel order."""
    ppb = 8 // bits
    ng = dim // group
    sc, zz = scale.astype(jnp.float32), zero.astype(jnp.float32)
    n = sc.shape[0]
    if layout == "natural":
        c = _natural(codes, bits)
        sc = jnp.broadcast_to(sc[:, :, None], (n, ng, group)).reshape(n, dim)
        zz = jnp.broadcast_to(zz[:, :, None], (n, ng, group)).reshape(n, dim)
        return (c * sc + zz).astype(dtype)
    w = dim // ppb
    c = _planes(codes, bits)
    # column i of every plane belongs to channel i * ppb + j, i.e. to group i // (group / ppb) for all planes j
    gi = lax.broadcasted_iota(jnp.int32, (ng, w), 0)
    ci = lax.broadcasted_iota(jnp.int32, (ng, w), 1)
    expand = (lax.div(ci, jnp.int32(group // ppb)) == gi).astype(jnp.float32)
    sc, zz = _exact_matmul(sc, expand), _exact_matmul(zz, expand)
    if ppb > 1:
        sc = jnp.concatenate([sc] * ppb, axis=1)
        zz = jnp.concatenate([zz] * ppb, axis=1)
    return (c * sc + zz).astype(dtype)


def _check_quantized(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos, k_res, v_res, res_pos, bits,
                     v_bits):
    packing.check_bits(bits)
    packing.check_bits(v_bits)
    for name, x, layout in (("k_codes", k_codes, "(B, Hkv, C, D*bits/8)"), ("v_codes", v_codes,
                                                                            "(B, Hkv, C, Dv*v_bits/8)"),
                            ("k_scale", k_scale, "(B, Hkv, C//Gk, D)"), ("k_zero", k_zero, "(B, Hkv, C//Gk, D)"),
                            ("v_scale", v_scale, "(B, Hkv, C, Dv//Gv)"), ("v_zero", v_zero, "(B, Hkv, C, Dv//Gv)")):
        cm.check_rank(name, x, 4, layout)
    for name, x in (("k_codes", k_codes), ("v_codes", v_codes)):
        if x.dtype != jnp.uint8:
            raise TypeError(f"{name} must be uint8 packed codes, got {x.dtype}")
    for name, x in (("k_scale", k_scale), ("k_zero", k_zero), ("v_scale", v_scale), ("v_zero", v_zero)):
        cm.check_float(name, x)
    cm.check_rank("pos", pos, 3, "(B, Hkv, C)")
    cm.check_int("pos", pos)
    cm.check_rank("q", q, 4, "(B, Hq, Tq, D)")
    b, hkv, c, _ = k_codes.shape
    d = q.shape[3]
    if k_codes.shape[3] != packing.packed_dim(d, bits):
        raise ValueError(f"k_codes last axis is {k_codes.shape[3]}, expected D * bits / 8 = {d * bits // 8} "
                         f"(D={d} from q, bits={bits})")
    if v_codes.shape[:3] != (b, hkv, c):
        raise ValueError(f"v_codes {v_codes.shape} does not match k_codes {k_codes.shape} in (B, Hkv, C)")
    dv = v_codes.shape[3] * 8 // v_bits
    if pos.shape != (b, hkv, c):
        raise ValueError(f"pos must have shape (B, Hkv, C) = {(b, hkv, c)}, got {pos.shape}")
    nkg = k_scale.shape[2]
    if nkg == 0 or c % nkg:
        raise ValueError(f"capacity C={c} must be a multiple of the key group (k_scale has {nkg} groups)")
    gk = c // nkg
    if k_scale.shape != (b, hkv, nkg, d) or k_zero.shape != k_scale.shape:
        raise ValueError(f"k_scale/k_zero must have shape (B, Hkv, C//Gk, D) = {(b, hkv, nkg, d)}, got "
                         f"{k_scale.shape} / {k_zero.shape}")
    nvg = v_scale.shape[3]
    if nvg == 0 or dv % nvg:
        raise ValueError(f"value head_dim {dv} must be divisible by the value group (v_scale has {nvg} groups)")
    gv = dv // nvg
    if v_scale.shape != (b, hkv, c, nvg) or v_zero.shape != v_scale.shape:
        raise ValueError(f"v_scale/v_zero must have shape (B, Hkv, C, Dv//Gv) = {(b, hkv, c, nvg)}, got "
                         f"{v_scale.shape} / {v_zero.shape}")
    if gv % (8 // v_bits):
        raise ValueError(f"the value group ({gv}) must be a multiple of the codes per byte ({8 // v_bits})")
    if (k_res is None) != (v_res is None) or (k_res is None) != (res_pos is None):
        raise ValueError("k_res, v_res and res_pos must be given together")
    if k_res is not None:
        cm.check_rank("k_res", k_res, 4, "(B, Hkv, R, D)")
        cm.check_rank("v_res", v_res, 4, "(B, Hkv, R, Dv)")
        cm.check_rank("res_pos", res_pos, 3, "(B, Hkv, R)")
        cm.check_int("res_pos", res_pos)
        r = k_res.shape[2]
        if k_res.shape != (b, hkv, r, d) or v_res.shape != (b, hkv, r, dv) or res_pos.shape != (b, hkv, r):
            raise ValueError(f"residual shapes k_res {k_res.shape}, v_res {v_res.shape}, res_pos {res_pos.shape} "
                             f"do not match (B, Hkv, R, D|Dv) with B={b}, Hkv={hkv}, D={d}, Dv={dv}")
        cm.check_float("k_res", k_res)
        cm.check_float("v_res", v_res)
        if r == 0:
            raise ValueError("an empty residual (R=0): pass k_res=v_res=res_pos=None instead")
    return b, hkv, c, d, dv, gk, gv


@functools.partial(jax.jit, static_argnames=_STATIC)
def quantized_decode_attention(q: jax.Array, k_codes: jax.Array, k_scale: jax.Array, k_zero: jax.Array,
                               v_codes: jax.Array, v_scale: jax.Array, v_zero: jax.Array, pos: jax.Array,
                               q_pos: jax.Array, *, bits: int, v_bits: int | None = None,
                               k_res: jax.Array | None = None, v_res: jax.Array | None = None,
                               res_pos: jax.Array | None = None, lengths: jax.Array | None = None,
                               sm_scale: float | None = None, window: int = 0, logit_softcap: float = 0.0,
                               block_k: int | None = None, num_splits: int | None = None,
                               interpret: bool | None = None, strategy: str | None = None,
                               backend: str | None = None, unpack_layout: str | None = None) -> jax.Array:
    """GQA decode attention over a quantized cache layer (+ optional residual window).

    ``bits`` is the key bit width (and the value one unless ``v_bits`` is given); group sizes are inferred from
    the scale shapes. ``lengths`` ``(B, Hkv)`` bounds the quantized slots only (the residual is masked by
    ``res_pos``). ``block_k`` must be a multiple of the key group. ``unpack_layout``: ``"plane_major"`` (default on
    TPU / interpret: shift-and-mask planes, no lane shuffles, queries/output permuted in the wrapper) or
    ``"natural"`` (default on GPU: Triton-style join/reshape interleave). Other arguments as
    :func:`pallas_kernels.decode_attention`. Returns ``(B, Hq, Tq, Dv)`` in ``q.dtype``.
    """
    v_bits = bits if v_bits is None else v_bits
    b, hkv, c, d, dv, gk, gv = _check_quantized(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, pos,
                                                k_res, v_res, res_pos, bits, v_bits)
    g, scale = cm.check_common(q, q_pos, b=b, hkv=hkv, lengths=lengths, sm_scale=sm_scale, window=window,
                               logit_softcap=logit_softcap)
    interp = cm.resolve_interpret(interpret)
    plat = cm.platform(interp, backend)
    strat = cm.resolve_strategy(strategy, plat)
    cm.check_head_dims(plat, head_dim=d, v_head_dim=dv)
    sublanes = 8 * 4 // min(k_scale.dtype.itemsize, 4)  # TPU tiling of the (block_k / Gk, D) scale blocks
    bk = cm.choose_block_k(block_k, c, plat, multiple=gk, tpu_multiple=math.lcm(128, gk * sublanes))
    ns, nbs = cm.split_plan(cm.cdiv(c, bk), num_splits, b, hkv, plat)
    tq = q.shape[2]
    gp = cm.gpu_heads(g, plat)
    bq = _flash.decode_block_q(tq, gp, plat)
    layout = unpack_layout or ("natural" if plat == "gpu" else "plane_major")
    if layout not in LAYOUTS:
        raise ValueError(f"unpack_layout must be one of {LAYOUTS}, got {unpack_layout!r}")
    cdt = q.dtype
    permute_k = layout == "plane_major" and bits != 8
    permute_v = layout == "plane_major" and v_bits != 8
    q_pm = q[..., plane_major_perm(d, bits)] if permute_k else q
    q5, qpos4 = _flash.prepare_queries(q_pm, q_pos, hkv, bq, gp)
    lens = _flash.resolve_lengths(lengths, b, hkv, c)

    def load_kv(vals):
        kc, ks, kz, vc, vs, vz = vals
        k = _dequant_k(kc, ks, kz, bits=bits, dim=d, group=gk, dtype=cdt, layout=layout)
        v = _dequant_v(vc, vs, vz, bits=v_bits, dim=dv, group=gv, dtype=cdt, layout=layout)
        return k, v

    extra, load_extra = (), None
    if k_res is not None:
        r = k_res.shape[2]
        rp = res_pos.astype(jnp.int32)
        if plat == "gpu" and r != cm.next_pow2(r):  # Triton: power-of-two shapes; padded slots are empty
            pad = cm.next_pow2(r) - r
            k_res = jnp.pad(k_res, ((0, 0), (0, 0), (0, pad), (0, 0)))
            v_res = jnp.pad(v_res, ((0, 0), (0, 0), (0, pad), (0, 0)))
            rp = jnp.pad(rp, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
        extra = (k_res, v_res, rp.reshape(b, hkv, 1, -1))

        def load_extra(vals):
            kr, vr, rp = vals
            kr, vr = kr.astype(cdt), vr.astype(cdt)
            if permute_k:
                kr = _exact_matmul(kr, _perm_matrix(d, bits)).astype(cdt)
            if permute_v:
                vr = _exact_matmul(vr, _perm_matrix(dv, v_bits)).astype(cdt)
            return kr, vr, rp

    kv_arrays = [(k_codes, 1), (k_scale, gk), (k_zero, gk), (v_codes, 1), (v_scale, 1), (v_zero, 1)]
    m, l, acc = _flash.flash_partials(
        q5, qpos4, pos.astype(jnp.int32), lens, kv_arrays, load_kv, block_k=bk, block_q=bq, num_splits=ns,
        blocks_per_split=nbs, dv=dv, sm_scale=scale, softcap=float(logit_softcap), window=int(window), plat=plat,
        strategy=strat, interpret=interp, extra_arrays=extra, load_extra=load_extra)
    out = cm.combine_splits(m, l, acc, axis=2)[:, :, :g, :tq]  # (B, Hkv, G, Tq, Dv), plane-major channels
    if permute_v:
        out = out[..., np.argsort(plane_major_perm(dv, v_bits))]
    return out.reshape(b, hkv * g, tq, dv).astype(cdt)

"""GEAR — "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative Inference of LLM",
Kang et al., arXiv 2403.05527 (authors' code: opengear-project/GEAR, ``GEARLM/Simulated``).

Every compressed chunk of every KV head is stored as ``X ≈ D̂ + L + S``:

* ``S``: sparse outliers — the ``s/2`` largest and ``s/2`` smallest entries of the chunk (``outlier_ratio`` ``s``)
  kept exactly (fp16 values + flat indices, a COO matrix) and excluded from the quantizer's range;
* ``D̂``: uniform low-bit quantization of the rest, packed codes. Backbones (``quant``): ``"kcvt"`` (GEAR-KCVT, the
  authors' 4-bit setting) — keys per channel over the **whole chunk** (``group_size = seq_len`` in the reference),
  values per token; ``"kivi"`` (the authors' 2-bit "GEAR") — keys per channel over groups of ``group`` tokens,
  values per token over groups of ``group`` channels (``--group_size 64``);
* ``L = A B``: a rank-``r`` approximation of the quantization residual per head by power iteration (``iters`` rounds,
  the reference's ``loop``), factors in fp16.

Chunks follow the authors' streaming code (``modeling_llama_new.py``, ``stream_grouping``): after prefill the
prompt's first ``n - n % gap`` tokens are compressed as **one matrix per head** with rank ``prefill_rank`` (4), the
last ``n % gap`` stay in a full-precision buffer; during decoding every ``gap`` (``buffer``, 64) tokens the buffer is
compressed as one chunk with rank ``rank`` (2). These are the authors' current scripts (``run_template_*.sh``:
``--prefillrank 4 --rank 2 --loop 3 --left 0.02 --streaming_gap 64``; 2-bit ``--group_size 64``), not the paper v1's
rank ratio ``ρ = 2%`` and ``n_b = 20``. Everything is stored for real (:class:`GearKV`) and counted by
:func:`kvjax.nbytes`.

Batch independence: each head's valid tokens are compacted (slot order) before chunking and its outlier count is
``s/2`` of the tokens it really compresses, so a row left-padded in a batch is compressed exactly as alone.

Remaining deviations: the prompt chunk has a static length (the layer's capacity rounded down to whole ``gap``
blocks) with each head's valid tokens masked, so ragged heads (after eviction) compress only their own tokens;
outliers are the ``s/2`` extremes of each head's chunk (the reference picks them per channel for keys / per token
for values over the channels of all heads); KCVT values are quantized per token within a head (the reference groups
all heads' channels of a token), and the 2-bit backbone's value groups are ``group`` channels of one head; the
power iteration starts from a fixed Gaussian matrix with a QR every round (the reference: uniform start, QR at the
last round); codes are computed against the fp16-rounded scale/zero. Attention: reference path (reconstruct, then
attend); global layers only.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import Observe, reference_attention
from kvjax.compress.base import Context, Method, register
from kvjax.compress.evict import map_global_layers
from kvjax.compress.kivi import convert_obs, room_for
from kvjax.quant import quantizers as qz
from kvjax.quant.cache import gather_slots, scatter_slots, stream_append

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GearSpec:
    """Static parameters of a :class:`GearKV` (resolved for a head dim and a prompt chunk length)."""

    bits: int = 4
    block: int = 64  # streaming gap: decode chunk length
    rank: int = 2  # decode chunks
    k_each: int = 0  # outliers kept at each end (largest / smallest) per decode chunk
    prompt_block: int = 0  # prompt chunk length (0 = no prompt chunk)
    prompt_rank: int = 4
    prompt_k_each: int = 0
    iters: int = 3
    quant: str = "kcvt"
    group: int = 64  # "kivi": tokens per key group and channels per value group (resolved)
    v_group: int = 0  # channels per value group (resolved: head_dim for kcvt)
    scale_dtype: str = "float16"
    factor_dtype: str = "float16"

    outlier_ratio: float = 0.0

    def outliers(self, tokens: int, head_dim: int) -> int:
        """Outliers kept at each end (largest / smallest) of a chunk of ``tokens`` tokens: ``s/2`` of its entries."""
        return max(1, int(self.outlier_ratio / 2 * tokens * head_dim)) if self.outlier_ratio > 0 and tokens else 0

    def key_group(self, chunk: int) -> int:
        """Tokens per per-channel key scale in a chunk of ``chunk`` tokens."""
        return chunk if self.quant == "kcvt" else min(self.group, chunk)


@struct.dataclass
class GearPart:
    """One compressed tensor (keys or values) of a layer: ``C`` slots in chunks of ``L`` tokens, ``NB = C / L``."""

    codes: Array  # (B, H, C, D * bits / 8) uint8
    scale: Array  # keys: (B, H, C / key_group, D) per channel; values: (B, H, C, D / v_group) per token
    zero: Array
    sp_idx: Array  # (B, H, NB, 2k) flat indices into the chunk's L * D entries
    sp_val: Array  # (B, H, NB, 2k)
    lr_a: Array  # (B, H, C, r)
    lr_b: Array  # (B, H, NB, r, D)


def _compress_blocks(x: Array, valid: Array, sp: GearSpec, which: str, rank: int, k_each: int,
                     k_limit: Array | None = None) -> tuple:
    """``x`` ``(B, H, M, L, D)`` → the GearPart arrays for ``M`` chunks of ``L`` tokens (slot axis ``M * L``).

    ``k_limit`` ``(B, H, M)`` (``<= k_each``): outliers actually kept at each end of each chunk (from the chunk's own
    valid tokens); the unused outlier slots repeat the first outlier (same index and value: harmless)."""
    b, h, m, el, d = x.shape
    x = x.astype(jnp.float32)
    vtok = jnp.broadcast_to(valid[..., None], x.shape)
    if k_each:
        idx, val = qz.topk_outliers(x, valid, k_each)
        if k_limit is not None:
            used = jnp.tile(jnp.arange(k_each, dtype=jnp.int32) < k_limit[..., None], 2)
            idx, val = jnp.where(used, idx, idx[..., :1]), jnp.where(used, val, val[..., :1])
        flat_mask = jax.vmap(lambda i: jnp.zeros((el * d,), bool).at[i].set(True))(
            idx.reshape(b * h * m, idx.shape[-1]))
        outl = flat_mask.reshape(b, h, m, el, d)
    else:
        idx = jnp.zeros((b, h, m, 0), jnp.int32)
        val = jnp.zeros((b, h, m, 0), jnp.float32)
        outl = jnp.zeros(x.shape, bool)
    keep = vtok & ~outl
    axis, grp = ("channel", sp.key_group(el)) if which == "k" else ("token", sp.v_group)
    xf = x.reshape(b, h, m * el, d)
    codes, scale, zero = qz.quantize(xf, keep.reshape(xf.shape), bits=sp.bits, group=grp, axis=axis,
                                     scale_dtype=jnp.dtype(sp.scale_dtype))
    deq = qz.dequantize(codes, scale, zero, bits=sp.bits, group=grp, axis=axis).reshape(x.shape)
    fdt = jnp.dtype(sp.factor_dtype)
    if rank:
        err = jnp.where(keep, x - deq, 0.0)
        a, bb = qz.lowrank_power_iteration(err, rank, sp.iters)
        lr_a, lr_b = a.reshape(b, h, m * el, rank).astype(fdt), bb.astype(fdt)
    else:
        lr_a, lr_b = jnp.zeros((b, h, m * el, 0), fdt), jnp.zeros((b, h, m, 0, d), fdt)
    return codes, scale, zero, idx.astype(qz.index_dtype(el * d)), val.astype(fdt), lr_a, lr_b


def _reconstruct(part: GearPart, sp: GearSpec, which: str, el: int, rank: int, k_each: int) -> Array:
    """``(B, H, C, D)`` f32 of a part made of chunks of ``el`` tokens."""
    axis, grp = ("channel", sp.key_group(el)) if which == "k" else ("token", sp.v_group)
    x = qz.dequantize(part.codes, part.scale, part.zero, bits=sp.bits, group=grp, axis=axis)
    b, h, c, d = x.shape
    nb = c // el if el else 0
    if rank and nb:
        a = part.lr_a.astype(jnp.float32).reshape(b, h, nb, el, rank)
        x = x + (a @ part.lr_b.astype(jnp.float32)).reshape(b, h, c, d)
    if k_each and nb:
        flat = x.reshape(b * h * nb, el * d)
        idx = part.sp_idx.astype(jnp.int32).reshape(b * h * nb, 2 * k_each)
        val = part.sp_val.astype(jnp.float32).reshape(b * h * nb, 2 * k_each)
        x = jax.vmap(lambda f, i, v: f.at[i].set(v))(flat, idx, val).reshape(b, h, c, d)
    return x


def _part_from(arrs) -> GearPart:
    return GearPart(*arrs)


def _empty_part(b: int, h: int, c: int, d: int, sp: GearSpec, which: str) -> GearPart:
    """An empty part of ``c`` slots (whole decode chunks)."""
    el = sp.block
    sd, fdt = jnp.dtype(sp.scale_dtype), jnp.dtype(sp.factor_dtype)
    srows, scols = (c // sp.key_group(el), d) if which == "k" else (c, d // sp.v_group)
    return GearPart(codes=jnp.zeros((b, h, c, d * sp.bits // 8), jnp.uint8),
                    scale=jnp.zeros((b, h, srows, scols), sd), zero=jnp.zeros((b, h, srows, scols), sd),
                    sp_idx=jnp.zeros((b, h, c // el, 2 * sp.k_each), qz.index_dtype(el * d)),
                    sp_val=jnp.zeros((b, h, c // el, 2 * sp.k_each), fdt),
                    lr_a=jnp.zeros((b, h, c, sp.rank), fdt), lr_b=jnp.zeros((b, h, c // el, sp.rank, d), fdt))


def _write_part(part: GearPart, arrs, slots: Array, complete: Array, sp: GearSpec, which: str) -> GearPart:
    """Writes compressed decode chunks (token rows at ``slots`` where ``complete``) into ``part``."""
    codes, scale, zero, idx, val, lr_a, lr_b = arrs
    c = part.codes.shape[2]
    el = sp.block
    tok = jnp.where(complete, slots, c)
    blk = jnp.where(complete[..., ::el], slots[..., ::el] // el, c // el)
    if which == "k":
        g = sp.key_group(el)
        srows = jnp.where(complete[..., ::g], slots[..., ::g] // g, c // g)
    else:
        srows = tok
    return GearPart(codes=scatter_slots(part.codes, tok, codes), scale=scatter_slots(part.scale, srows, scale),
                    zero=scatter_slots(part.zero, srows, zero), sp_idx=scatter_slots(part.sp_idx, blk, idx),
                    sp_val=scatter_slots(part.sp_val, blk, val), lr_a=scatter_slots(part.lr_a, tok, lr_a),
                    lr_b=scatter_slots(part.lr_b, blk, lr_b))


@struct.dataclass
class GearKV:
    """A GEAR-compressed layer: ``[prompt chunk (P) | decode chunks (C) | streaming buffer (gap)]`` slots, ``pos``
    over all three. ``fill`` = ``P + q + r`` (the prompt chunk counts as allocated; ``q`` tokens in decode chunks, a
    multiple of ``gap``, ``r < gap`` buffered)."""

    kp: GearPart | None
    vp: GearPart | None
    k: GearPart
    v: GearPart
    k_res: Array  # (B, H, gap, D) full precision streaming buffer
    v_res: Array
    pos: Array  # (B, H, P + C + gap)
    fill: Array  # (B, H)
    spec: GearSpec = struct.field(pytree_node=False, default=GearSpec())
    window: int = struct.field(pytree_node=False, default=0)

    @property
    def n_prompt(self) -> int:
        return self.spec.prompt_block

    @property
    def q_capacity(self) -> int:
        return self.k.codes.shape[2]

    @property
    def capacity(self) -> int:
        return self.n_prompt + self.q_capacity + self.spec.block - 1

    @property
    def valid(self) -> Array:
        return self.pos >= 0

    def stored_kv(self) -> tuple[Array, Array]:
        sp = self.spec
        ks, vs = [], []
        if self.kp is not None:
            ks.append(_reconstruct(self.kp, sp, "k", sp.prompt_block, sp.prompt_rank, sp.prompt_k_each))
            vs.append(_reconstruct(self.vp, sp, "v", sp.prompt_block, sp.prompt_rank, sp.prompt_k_each))
        ks += [_reconstruct(self.k, sp, "k", sp.block, sp.rank, sp.k_each), self.k_res.astype(jnp.float32)]
        vs += [_reconstruct(self.v, sp, "v", sp.block, sp.rank, sp.k_each), self.v_res.astype(jnp.float32)]
        return jnp.concatenate(ks, axis=2), jnp.concatenate(vs, axis=2)

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
        """New tokens go to the streaming buffer; a full buffer is compressed as one chunk (jit-safe)."""
        sp = self.spec
        el = sp.block
        n = k.shape[2]
        pos_h = jnp.broadcast_to(pos[:, None, :], k.shape[:3]).astype(jnp.int32)
        s = self.fill - self.n_prompt
        q = (s // el) * el
        r = s - q
        pr, c = self.n_prompt, self.q_capacity
        blk_k, blk_v, blk_p, m, new_k, new_v, new_p = stream_append(
            self.k_res, self.v_res, self.pos[..., pr + c:], r, k.astype(self.k_res.dtype),
            v.astype(self.v_res.dtype), pos_h)
        nblk = blk_k.shape[2] // el
        j = jnp.arange(blk_k.shape[2], dtype=jnp.int32)
        slots = jnp.broadcast_to(q[..., None] + j, blk_p.shape)
        complete = (j // el)[None, None, :] < m[..., None]
        b, h = self.fill.shape

        def flush(parts):
            kp, vp, p = parts
            valid = (blk_p >= 0).reshape(b, h, nblk, el)
            ka = _compress_blocks(blk_k.reshape(b, h, nblk, el, blk_k.shape[-1]), valid, sp, "k", sp.rank, sp.k_each)
            va = _compress_blocks(blk_v.reshape(b, h, nblk, el, blk_v.shape[-1]), valid, sp, "v", sp.rank, sp.k_each)
            kp = _write_part(kp, ka, slots, complete, sp, "k")
            vp = _write_part(vp, va, slots, complete, sp, "v")
            p = scatter_slots(p, jnp.where(complete, slots, p.shape[2]), blk_p)
            return kp, vp, p

        kp, vp, p = jax.lax.cond(jnp.any(m > 0), flush, lambda a: a, (self.k, self.v, self.pos[..., pr:pr + c]))
        p = jnp.concatenate([self.pos[..., :pr], p, new_p], axis=-1)
        return self.replace(k=kp, v=vp, pos=p, k_res=new_k, v_res=new_v, fill=self.fill + n)


def gear_dense_layer(layer, sp: GearSpec, room: int = 0) -> tuple[GearKV, Array, Array]:
    """Compresses a :class:`kvjax.state.DenseKV` (slots ``[0, fill)`` of each head) into a :class:`GearKV`: the
    first ``fill - fill % gap`` tokens of each head (at most ``sp.prompt_block``, the prompt part of the layer) as
    one chunk of ``sp.prompt_block`` slots (invalid ones masked), the rest into the buffer; ``room`` decode tokens
    get whole ``gap`` chunks."""
    if getattr(layer, "ring_start", -1) >= 0:
        raise ValueError("cannot compress a ring-buffer (sliding-window or StreamingLLM) layer with GEAR")
    b, h, c, d = layer.k.shape
    el, pl = sp.block, sp.prompt_block
    if pl > c or pl % el:
        raise ValueError(f"gear prompt chunk {pl} must be a multiple of the gap {el} within the layer capacity {c}")
    # each head's valid tokens first, in slot order: a row left-padded in a batch is chunked exactly as alone
    slot = jnp.arange(c, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(layer.valid, slot, c + slot), axis=-1).astype(jnp.int32)
    n = jnp.sum(layer.valid, axis=-1, dtype=jnp.int32)
    lk, lv, lpos = gather_slots(layer.k, order), gather_slots(layer.v, order), gather_slots(layer.pos, order)
    q0 = jnp.minimum((n // el) * el, pl)
    j = jnp.arange(pl, dtype=jnp.int32)
    in_q = j < q0[..., None]
    ps = jnp.where(in_q, lpos[..., :pl], -1)
    kp = vp = None
    if pl:
        valid = in_q.reshape(b, h, 1, pl)
        # outliers per head from the tokens it really compresses (the ratio of the authors' per-matrix top-k)
        k_lim = None
        if sp.prompt_k_each:
            table = jnp.asarray([sp.outliers(t * el, d) for t in range(pl // el + 1)], jnp.int32)
            k_lim = table[q0 // el][..., None]
        kp = _part_from(_compress_blocks(lk[:, :, :pl].reshape(b, h, 1, pl, d), valid, sp, "k",
                                         sp.prompt_rank, sp.prompt_k_each, k_lim))
        vp = _part_from(_compress_blocks(lv[:, :, :pl].reshape(b, h, 1, pl, layer.v.shape[-1]), valid, sp, "v",
                                         sp.prompt_rank, sp.prompt_k_each, k_lim))
    cq = ((el - 1 + room) // el) * el  # buffered prompt tokens + decoded ones, in whole chunks
    kq, vq = _empty_part(b, h, cq, d, sp, "k"), _empty_part(b, h, cq, layer.v.shape[-1], sp, "v")
    ridx = q0[..., None] + jnp.arange(el, dtype=jnp.int32)
    rok = ridx < n[..., None]
    k_res = jnp.where(rok[..., None], gather_slots(lk, ridx), 0).astype(layer.k.dtype)
    v_res = jnp.where(rok[..., None], gather_slots(lv, ridx), 0).astype(layer.v.dtype)
    rpos = jnp.where(rok, gather_slots(lpos, ridx), -1)
    cache = GearKV(kp=kp, vp=vp, k=kq, v=vq, k_res=k_res, v_res=v_res,
                   pos=jnp.concatenate([ps, jnp.full((b, h, cq), -1, jnp.int32), rpos], -1),
                   fill=pl + n - q0, spec=sp, window=int(getattr(layer, "window", 0)))
    src = jnp.concatenate([order[..., :pl], jnp.zeros((b, h, cq), jnp.int32), gather_slots(order, ridx)], axis=-1)
    ok = jnp.concatenate([in_q, jnp.zeros((b, h, cq), bool), rok], axis=-1)
    return cache, src, ok


@register
@dataclasses.dataclass(frozen=True)
class GEAR(Method):
    """GEAR: quantization + low-rank residual + sparse outliers, with a streaming buffer (see module docstring)."""

    bits: int = 4
    buffer: int = 64  # streaming gap
    prefill_rank: int = 4
    rank: int = 2
    outlier_ratio: float = 0.02
    iters: int = 3
    quant: str = "auto"  # "kcvt" at 4 bits (GEAR-KCVT), "kivi" at 2 bits (the authors' 2-bit GEAR)
    group: int = 64
    scale_dtype: str = "float16"
    name: ClassVar[str] = "gear"
    kind: ClassVar[str] = "quantized"

    def __post_init__(self):
        qz.check_bits(self.bits)
        if isinstance(self.buffer, bool) or not isinstance(self.buffer, int) or self.buffer <= 0:
            raise ValueError(f"gear buffer (streaming gap) must be a positive integer, got {self.buffer!r}")
        if not 0.0 <= self.outlier_ratio < 1.0:
            raise ValueError(f"gear outlier_ratio must be in [0, 1), got {self.outlier_ratio}")
        if self.rank < 0 or self.prefill_rank < 0 or self.iters <= 0:
            raise ValueError(f"gear rank and prefill_rank must be >= 0 and iters > 0, got rank={self.rank}, "
                             f"prefill_rank={self.prefill_rank}, iters={self.iters}")
        if self.quant not in ("auto", "kcvt", "kivi"):
            raise ValueError(f"gear quant must be 'auto', 'kcvt' or 'kivi', got {self.quant!r}")
        if self.group <= 0:
            raise ValueError(f"gear group must be positive, got {self.group}")

    @property
    def backbone(self) -> str:
        return self.quant if self.quant != "auto" else ("kcvt" if self.bits >= 4 else "kivi")

    def spec(self, head_dim: int, prompt_block: int = 0) -> GearSpec:
        el = self.buffer
        quant = self.backbone
        if quant == "kivi":
            if el % self.group or prompt_block % self.group:
                raise ValueError(f"gear 2-bit (kivi backbone) group {self.group} must divide the gap {el}")
            v_group = qz.resolve_group(self.group, head_dim, self.bits, "gear group")
        else:
            v_group = head_dim

        base = GearSpec(outlier_ratio=self.outlier_ratio)
        return GearSpec(bits=self.bits, block=el, rank=min(self.rank, el, head_dim),
                        k_each=base.outliers(el, head_dim), prompt_block=prompt_block,
                        prompt_rank=min(self.prefill_rank, max(prompt_block, 1), head_dim),
                        prompt_k_each=base.outliers(prompt_block, head_dim), iters=self.iters, quant=quant,
                        group=self.group, v_group=v_group, scale_dtype=self.scale_dtype,
                        outlier_ratio=self.outlier_ratio)

    def validate(self, ctx: Context) -> None:
        from kvjax.quant import packing  # noqa: PLC0415

        packing.packed_dim(ctx.cfg.head_dim, self.bits)
        self.spec(ctx.cfg.head_dim)

    def prefill(self, state, obs, ctx: Context):
        def one(i, layer, o):
            # the prompt part of the layer: its capacity less the decode room an evictor before us already added
            inside = ctx.decode_room - room_for(layer, ctx)
            c = max(layer.k.shape[2] - inside, 0)
            sp = self.spec(layer.k.shape[-1], (c // self.buffer) * self.buffer)
            cache, src, ok = gear_dense_layer(layer, sp, ctx.decode_room)
            return cache, convert_obs(o, src, ok)

        return map_global_layers(state, obs, one)

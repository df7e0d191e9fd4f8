"""RotateKV — "RotateKV: Accurate and Robust 2-Bit KV Cache Quantization for LLMs via Outlier-Aware Adaptive
Rotations", Su et al., arXiv 2501.16383.

Keys are rotated by an orthogonal matrix before 2-bit per-token quantization so that their fixed outlier channels
are spread over all channels:

* outlier-aware rotation: the channels of every KV head are first re-ordered by their outlier magnitude (max ``|k|``
  over the prompt) — sorted and dealt round-robin over the Hadamard blocks so every block gets its share of outlier
  channels — then rotated by a (block-diagonal) normalised Walsh-Hadamard matrix (``hadamard_block``, default the
  largest power of two dividing ``head_dim``, i.e. the whole head for the usual 64/128). With a single block the
  re-ordering only changes which sign pattern meets which channel; it matters for ``hadamard_block < head_dim``.
* values are rotated by the same Hadamard matrix (``rotate_values``) and rotated back on the attention output.
* attention-sink aware: the first ``n_sink`` tokens of each head are kept in full precision
  (:class:`kvjax.quant.cache.KeepBlock`). The paper finds sinks from massive activations; hidden states are not
  observed by kvjax's cache methods, so the first tokens (where sinks are) are kept, StreamingLLM's 4 by default.

The rotation is never undone on the keys: queries are rotated by the same matrix (``q·k = (qR)·(kR)`` for
orthogonal ``R``), so attention reads the quantized rotated keys directly.

Deviations: kvjax stores keys after RoPE, so keys are rotated *post*-RoPE (the paper rotates pre-RoPE keys and
applies RoPE after dequantization); the paper's grouped-head rotation (one Hadamard over the channels of several
heads) is not used because a rotation that mixes heads cannot be moved onto the queries — each head is rotated on
its own. Quantization: per token over groups of ``group`` channels (0 = whole head), 2 bits by default; ``residual``
recent tokens may stay in full precision (0 by default: every token is quantized on arrival). Global layers only.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.compress.base import Context, Method, register
from kvjax.compress.evict import map_global_layers, select_keep
from kvjax.compress.kivi import convert_obs, room_for
from kvjax.compress.mikv import compact_rest
from kvjax.quant import quantizers as qz
from kvjax.quant.cache import QuantSpec, quantize_dense_layer


def outlier_aware_order(k, valid, block: int):
    """Channel order ``(B, H, D)``: channels sorted by ``max |k|`` (descending) dealt round-robin over the
    ``D / block`` Hadamard blocks. ``perm[j]`` = the original channel placed at position ``j``."""
    d = k.shape[-1]
    mag = jnp.max(jnp.where(valid[..., None], jnp.abs(k.astype(jnp.float32)), 0.0), axis=2)  # (B, H, D)
    ranked = jnp.argsort(-mag, axis=-1, stable=True)  # rank i -> channel
    nblk = d // block
    i = jnp.arange(d)
    dest = (i % nblk) * block + i // nblk  # rank i goes to position dest[i]
    perm = jnp.zeros_like(ranked).at[..., dest].set(ranked)
    return perm.astype(jnp.int32)


@register
@dataclasses.dataclass(frozen=True)
class RotateKV(Method):
    """2-bit KV quantization after outlier-aware Hadamard rotations (see module docstring)."""

    bits: int = 2
    group: int = 0
    n_sink: int = 4
    residual: int = 0
    reorder: bool = True
    rotate_values: bool = True
    hadamard_block: int = 0
    scale_dtype: str = "float16"
    name: ClassVar[str] = "rotatekv"
    kind: ClassVar[str] = "quantized"

    def __post_init__(self):
        qz.check_bits(self.bits)
        if self.n_sink < 0 or self.residual < 0 or self.group < 0 or self.hadamard_block < 0:
            raise ValueError(f"rotatekv n_sink, residual, group and hadamard_block must be >= 0, got n_sink="
                             f"{self.n_sink}, residual={self.residual}, group={self.group}, "
                             f"hadamard_block={self.hadamard_block}")

    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, v_bits=self.bits, k_group=self.group, v_group=self.group, k_axis="token",
                         residual=self.residual, k_rotate=True, v_rotate=self.rotate_values,
                         rot_block=self.hadamard_block, scale_dtype=self.scale_dtype)

    def validate(self, ctx: Context) -> None:
        d = ctx.cfg.head_dim
        self.spec().resolve(d, d)

    def prefill(self, state, obs, ctx: Context):
        spec = self.spec()

        def one(i, layer, o):
            d = layer.k.shape[-1]
            sp = spec.resolve(d, layer.v.shape[-1])
            perm = outlier_aware_order(layer.k, layer.valid, sp.rot_block) if self.reorder else None
            c = layer.capacity
            keep_kw, order, count = {}, None, None
            if self.n_sink:
                idx, keep = select_keep(-layer.pos.astype(jnp.float32), layer.valid, self.n_sink)
                order, count = compact_rest(layer.valid, idx, keep, c - idx.shape[-1])
                keep_kw = dict(keep_idx=idx, keep_ok=keep, keep_bits=16)
            cache, src, ok = quantize_dense_layer(layer, spec, room=room_for(layer, ctx), stream_idx=order,
                                                  stream_n=count, k_perm=perm, **keep_kw)
            return cache, convert_obs(o, src, ok)

        return map_global_layers(state, obs, one)

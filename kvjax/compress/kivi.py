"""KIVI — "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", Liu et al., arXiv 2402.02750.

Keys are quantized per channel (one scale/zero per channel over a group of ``group`` tokens: key outliers live in
fixed channels), values per token (one scale/zero per ``group`` channels of a token); asymmetric min/max, 2 or 4
bits, codes packed into bytes. The most recent tokens stay in full precision, as in the authors' code
(``models/llama_kivi.py``): keys in a residual window of ``residual`` tokens — after prefill the last
``n % residual`` prompt keys stay there (the paper's rule), decoded keys are appended and every time ``residual``
keys have gathered they are quantized at once (``residual / group`` key groups); values keep exactly the last
``residual`` tokens in full precision (prefill: all but the last ``residual`` quantized; decode: the window slides by
one token per step, the value leaving it is quantized) — ``value_window="sliding"``, the default. Storage is
:class:`kvjax.quant.cache.QuantizedKV` (the sliding values are a ring of ``residual`` full-precision values, so the
state holds exactly the reference's full-precision values); ``Model(cfg, impl="pallas")`` runs
``pallas_kernels.quantized_decode_attention`` on it (the last key group, whose values are partly still full
precision, is passed to the kernel as extra full-precision slots, so the kernel computes the reference exactly).

Defaults are the paper's: group 32, residual 128, 2 bits, fp16 scales/zeros.

Remaining deviations: codes are computed against the fp16-rounded scale/zero (the reference's kernel uses the f32
scale and stores it in fp16); a quantized value's codes are written when its key group is flushed (the codes of the
last ``R - r`` tokens exist but are not read until their values leave the window) — attention equals the
reference's and the state holds the same arrays (codes for every slot are preallocated in both).
``value_window="grouped"`` is kvjax's earlier layout (values flushed with the keys, ``0 <= r < R`` full-precision
values), kept for comparison. Acts on global layers only; sliding-window (ring) layers stay dense. After an
eviction method in a chain, the quantized cache keeps the capacity of the evicted layer (which already holds the
decode room); on a freshly prefilled layer it adds ``decode_room`` slots. After a cross-layer method (xKV, MiniCache)
or ThinK it quantizes that layer's payload — xKV's token-side factors, MiniCache's merged directions, ThinK's pruned
keys — and its dense parts (``quantized(spec)`` of the layer class; see :mod:`kvjax.compress.xkv`,
:mod:`kvjax.compress.minicache`, :mod:`kvjax.compress.think`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax

from kvjax.compress.base import Context, Method, register
from kvjax.compress.evict import gather_obs, map_global_layers
from kvjax.quant import quantizers as qz
from kvjax.quant.cache import QuantSpec, quantize_dense_layer


def quantize_state(spec, state, obs, ctx: Context):
    """Converts every global layer of ``state`` to a :class:`QuantizedKV` of ``spec`` (observations follow).

    A composite layer that declares ``quantized(spec)`` (xKV's :class:`~kvjax.compress.xkv.CrossLayerKV`, MiniCache's
    :class:`~kvjax.compress.minicache.MergedPairKV`, ThinK's :class:`~kvjax.compress.think.ChannelPrunedKV`) quantizes
    its own payload and dense parts instead; its
    observations are dropped (no method may follow a quantizer that needs them)."""

    def one(i, layer, o):
        if hasattr(layer, "quantized"):
            return _quantized(layer, spec), {}
        cache, src, ok = quantize_dense_layer(layer, spec, room=room_for(layer, ctx))
        return cache, convert_obs(o, src, ok)

    return map_global_layers(state, obs, one)


@functools.partial(jax.jit, static_argnums=1)
def _quantized(layer, spec):
    return layer.quantized(spec)


def room_for(layer, ctx: Context) -> int:
    """Decode room a quantizer adds: ``ctx.decode_room`` on a freshly prefilled layer (capacity = prompt length),
    none after an evictor (which already padded its output with the room)."""
    fresh = ctx.prompt_len == 0 or layer.capacity == ctx.prompt_len
    return ctx.decode_room if fresh else 0


def convert_obs(o: dict, src, ok) -> dict:
    """Observations re-ordered to the quantized layer's slot order."""
    return gather_obs(o, src, ok, 0) if o else o


@register
@dataclasses.dataclass(frozen=True)
class KIVI(Method):
    """KIVI asymmetric 2/4-bit quantization (see module docstring)."""

    bits: int = 2
    group: int = 32
    residual: int = 128
    scale_dtype: str = "float16"
    value_window: str = "sliding"
    name: ClassVar[str] = "kivi"
    kind: ClassVar[str] = "quantized"
    also_accepts: ClassVar[tuple[str, ...]] = ("crosslayer", "channel")  # xKV, MiniCache, ThinK layers

    def __post_init__(self):
        qz.check_bits(self.bits)
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group <= 0:
            raise ValueError(f"kivi group must be a positive integer, got {self.group!r}")
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"kivi residual must be an integer >= 0, got {self.residual!r}")
        if self.residual < self.group or self.residual % self.group:
            raise ValueError(f"kivi residual ({self.residual}) must be a positive multiple of the group "
                             f"({self.group}): keys are quantized per channel in whole groups of tokens")
        if self.value_window not in ("sliding", "grouped"):
            raise ValueError(f"kivi value_window must be 'sliding' (the last residual values in full precision, the "
                             f"reference) or 'grouped' (flushed with the keys), got {self.value_window!r}")
        self.spec()

    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, v_bits=self.bits, k_group=self.group, v_group=self.group, k_axis="channel",
                         residual=self.residual, scale_dtype=self.scale_dtype,
                         v_slide=self.value_window == "sliding")

    def validate(self, ctx: Context) -> None:
        d = ctx.cfg.head_dim
        if d % self.group:
            raise ValueError(f"kivi group {self.group} does not divide head_dim {d} (values are quantized per token "
                             f"in groups of channels)")
        self.spec().resolve(d, d)

    def prefill(self, state, obs, ctx: Context):
        return quantize_state(self.spec(), state, obs, ctx)

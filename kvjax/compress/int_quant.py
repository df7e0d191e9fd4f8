"""Plain per-token integer KV quantization baselines: ``int8`` and ``int4``.

What Hugging Face ``QuantizedCache`` (quanto/HQQ backends) and MaxText's int8 KV cache offer: keys and values are
both quantized per token, asymmetric min/max over groups of ``group`` channels (``0`` = the whole head, MaxText's
per-token-per-head scales), codes packed into bytes (two int4 codes per byte). ``residual`` recent tokens may stay in
full precision (HF ``QuantizedCache``'s ``residual_length``, 128 there); the default ``0`` quantizes every token on
arrival (MaxText). Storage: :class:`kvjax.quant.cache.QuantizedKV` with ``k_axis="token"``.

Unlike KIVI, per-token keys suffer from the fixed outlier channels of keys; these are the baselines KIVI/GEAR/
RotateKV are measured against. Global layers only. After xKV / MiniCache / ThinK in a chain they quantize those
layers' payload (factors, merged directions, pruned keys) and dense parts; after LaCache (``residual=0``) the ladder's decode-time
compaction moves each token's codes and scales (see :mod:`kvjax.compress.lacache`).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from kvjax.compress.base import Context, Method, register
from kvjax.compress.kivi import quantize_state
from kvjax.quant.cache import QuantSpec


@dataclasses.dataclass(frozen=True)
class _IntQuant(Method):
    group: int = 0
    residual: int = 0
    scale_dtype: str = "float16"
    bits: ClassVar[int] = 8
    kind: ClassVar[str] = "quantized"
    also_accepts: ClassVar[tuple[str, ...]] = ("crosslayer", "channel")  # xKV, MiniCache, ThinK layers

    def __post_init__(self):
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 0:
            raise ValueError(f"{self.name} group must be an integer >= 0 (0 = whole head), got {self.group!r}")
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"{self.name} residual must be an integer >= 0, got {self.residual!r}")

    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, v_bits=self.bits, k_group=self.group, v_group=self.group, k_axis="token",
                         residual=self.residual, scale_dtype=self.scale_dtype)

    def validate(self, ctx: Context) -> None:
        self.spec().resolve(ctx.cfg.head_dim, ctx.cfg.head_dim)

    def prefill(self, state, obs, ctx: Context):
        return quantize_state(self.spec(), state, obs, ctx)


@register
@dataclasses.dataclass(frozen=True)
class Int8(_IntQuant):
    """Per-token int8 keys and values (see module docstring)."""

    name: ClassVar[str] = "int8"
    bits: ClassVar[int] = 8


@register
@dataclasses.dataclass(frozen=True)
class Int4(_IntQuant):
    """Per-token int4 keys and values, two codes per byte (see module docstring)."""

    name: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4

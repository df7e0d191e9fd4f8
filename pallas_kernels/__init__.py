"""kvjax's Pallas kernels for attention over (compressed) KV caches.

Kernels (each with a plain-jnp twin in :mod:`pallas_kernels.reference`):

* :func:`decode_attention` — split-KV (flash-decoding) GQA attention of a few query tokens over a dense cache, with
  ``pos``-based masks, sliding window, logit soft-capping and per-head ragged ``lengths``.
* :func:`quantized_decode_attention` — the same over a KIVI-style 2/4/8-bit cache (unpacked and dequantized block
  by block inside the kernel) plus its full-precision residual window.
* :func:`ragged_decode_attention` — decode attention over a ragged cache (:class:`kvjax.state.RaggedKV`): one flat
  buffer of all heads' tokens per batch row with per-head offsets and lengths (no padding to the largest head).
* :func:`prefill_attention_with_scores` — causal flash attention of a chunk that also returns per-key column sums of
  the softmax probabilities and, optionally, the last ``W`` queries' probabilities (two passes, no ``(Tq, C)``
  matrix in HBM).

Every kernel takes ``interpret: bool | None = None`` (``None`` → interpret mode when the default backend is the CPU;
``pltpu.InterpretParams()`` runs the TPU interpreter), ``strategy`` (``"pipeline"``: TPU / interpret — KV blocks are
a sequential grid axis with scalar-prefetched lengths; ``"loop"``: GPU / Triton — an in-kernel loop over a split) and
``backend`` (lower for ``"tpu"`` / ``"gpu"`` from another host). :func:`attention_impl` picks a kernel or its
reference by name.
"""
from __future__ import annotations

from typing import Callable

from pallas_kernels._common import PrefillOutput
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.prefill_attention_with_scores import prefill_attention_with_scores
from pallas_kernels.quantized_decode_attention import quantized_decode_attention
from pallas_kernels.ragged_decode_attention import ragged_decode_attention

KERNEL_NAMES = ("decode_attention", "quantized_decode_attention", "prefill_attention_with_scores",
                "ragged_decode_attention")
_ALIASES = {"decode": "decode_attention", "quantized_decode": "quantized_decode_attention",
            "quantized": "quantized_decode_attention", "prefill": "prefill_attention_with_scores",
            "prefill_with_scores": "prefill_attention_with_scores", "ragged_decode": "ragged_decode_attention",
            "ragged": "ragged_decode_attention"}
IMPLS = ("pallas", "reference")


def attention_impl(name: str, impl: str = "pallas") -> Callable:
    """The kernel ``name`` (or an alias: ``decode``, ``quantized_decode``, ``prefill``) as ``impl``:
    ``"pallas"`` (the Pallas kernel) or ``"reference"`` (the jnp reference; same signature, kernel-only options
    such as ``block_k`` are accepted and ignored)."""
    key = _ALIASES.get(name, name)
    if key not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel {name!r}; choose one of {KERNEL_NAMES} (or {tuple(_ALIASES)})")
    if impl == "pallas":
        return {"decode_attention": decode_attention, "quantized_decode_attention": quantized_decode_attention,
                "prefill_attention_with_scores": prefill_attention_with_scores,
                "ragged_decode_attention": ragged_decode_attention}[key]
    if impl == "reference":
        from pallas_kernels import reference  # noqa: PLC0415 (imports kvjax)

        return getattr(reference, key + "_reference")
    raise ValueError(f"unknown impl {impl!r}; choose one of {IMPLS}")


__all__ = ["IMPLS", "KERNEL_NAMES", "PrefillOutput", "attention_impl", "decode_attention",
           "prefill_attention_with_scores", "quantized_decode_attention", "ragged_decode_attention"]

"""Checkpoint loaders: GGUF files (llama.cpp) and HF safetensors, both into kvjax's params layout."""
from __future__ import annotations

from kvjax.checkpoints.gguf import (
    assemble_chunks,
    gemma3_gguf_path,
    gguf_config,
    load_gguf,
    load_gguf_metadata,
    smollm2_gguf_path,
)

try:
    from kvjax.checkpoints.safetensors import load_safetensors  # noqa: F401
except ImportError:  # the safetensors loader is optional until it lands
    pass

__all__ = [
    "assemble_chunks",
    "gemma3_gguf_path",
    "gguf_config",
    "load_gguf",
    "load_gguf_metadata",
    "smollm2_gguf_path",
]
if "load_safetensors" in globals():
    __all__.append("load_safetensors")

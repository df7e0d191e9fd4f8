"""Pure-JAX decoder models. ``forward_fn(cfg)`` picks the implementation for an architecture."""
from __future__ import annotations

from kvjax.config import ModelConfig, UnsupportedConfigError


def forward_fn(cfg: ModelConfig):
    """The ``forward(cfg, params, tokens, state, token_mask, *, observe, impl, logits)`` of ``cfg.architecture``."""
    if cfg.architecture in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        from kvjax.models import llama

        return llama.forward
    if cfg.architecture == "Gemma3ForCausalLM":
        from kvjax.models import gemma3

        return gemma3.forward
    raise UnsupportedConfigError(f"no kvjax model for architecture {cfg.architecture!r}")

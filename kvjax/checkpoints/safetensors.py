"""Load HF checkpoints (``config.json`` + ``model.safetensors`` or a sharded index) into kvjax params.

Only safetensors are read (never pickle). Every tensor is checked: a missing, unexpected or mis-shaped tensor raises
:class:`CheckpointError` naming it.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from kvjax.config import ModelConfig, load_config


class CheckpointError(ValueError):
    """The checkpoint files do not match the config, or are corrupt."""


def _expected(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """HF tensor name -> (HF shape, kvjax param path, transpose)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    qd, kvd = cfg.num_heads * hd, cfg.num_kv_heads * hd
    gemma = cfg.architecture == "Gemma3ForCausalLM"
    out = {
        "model.embed_tokens.weight": ((cfg.vocab_size, d), "embed", False),
        "model.norm.weight": ((d,), "norm", False),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ((cfg.vocab_size, d), "lm_head", True)
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        L = f"layers.{i}."
        out.update({
            pre + "input_layernorm.weight": ((d,), L + "attn_norm", False),
            pre + "self_attn.q_proj.weight": ((qd, d), L + "q", True),
            pre + "self_attn.k_proj.weight": ((kvd, d), L + "k", True),
            pre + "self_attn.v_proj.weight": ((kvd, d), L + "v", True),
            pre + "self_attn.o_proj.weight": ((d, qd), L + "o", True),
            pre + "mlp.gate_proj.weight": ((cfg.intermediate_size, d), L + "gate", True),
            pre + "mlp.up_proj.weight": ((cfg.intermediate_size, d), L + "up", True),
            pre + "mlp.down_proj.weight": ((d, cfg.intermediate_size), L + "down", True),
        })
        if gemma:
            out.update({
                pre + "pre_feedforward_layernorm.weight": ((d,), L + "mlp_norm", False),
                pre + "post_attention_layernorm.weight": ((d,), L + "post_attn_norm", False),
                pre + "post_feedforward_layernorm.weight": ((d,), L + "post_mlp_norm", False),
                pre + "self_attn.q_norm.weight": ((hd,), L + "q_norm", False),
                pre + "self_attn.k_norm.weight": ((hd,), L + "k_norm", False),
            })
        else:
            out[pre + "post_attention_layernorm.weight"] = ((d,), L + "mlp_norm", False)
        if cfg.attention_bias:
            out.update({
                pre + "self_attn.q_proj.bias": ((qd,), L + "q_bias", False),
                pre + "self_attn.k_proj.bias": ((kvd,), L + "k_bias", False),
                pre + "self_attn.v_proj.bias": ((kvd,), L + "v_bias", False),
            })
    return out


def _shard_files(ckpt_dir: str) -> list[str]:
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    single = os.path.join(ckpt_dir, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(ckpt_dir, f))]
        if missing:
            raise CheckpointError(f"shards listed in {index} are missing: {', '.join(missing)}")
        return [os.path.join(ckpt_dir, f) for f in files]
    if os.path.exists(single):
        return [single]
    if any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in os.listdir(ckpt_dir)):
        raise CheckpointError(f"{ckpt_dir} holds only pickle checkpoints; kvjax reads safetensors only (never pickle)")
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {ckpt_dir}")


def load_safetensors(ckpt_dir: str | os.PathLike, dtype=jnp.float32, *, progress: bool = True
                     ) -> tuple[ModelConfig, dict]:
    """Reads ``ckpt_dir/config.json`` and its safetensors into ``(cfg, params)`` with params in ``dtype``."""
    ckpt_dir = os.fspath(ckpt_dir)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    cfg = load_config(ckpt_dir)
    expected = _expected(cfg)
    flat: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    unexpected: list[str] = []
    files = _shard_files(ckpt_dir)
    bar = tqdm(total=len(expected), desc="loading safetensors", disable=not progress, leave=False)
    for path in files:
        try:
            with safe_open(path, framework="flax") as f:
                for name in f.keys():
                    if name not in expected:
                        if cfg.tie_word_embeddings and name == "lm_head.weight":
                            continue  # tied checkpoints sometimes also store the head
                        if name.endswith("rotary_emb.inv_freq"):
                            continue  # a buffer, recomputed from the config
                        unexpected.append(name)
                        continue
                    shape, target, transpose = expected[name]
                    t = f.get_tensor(name)
                    if tuple(t.shape) != shape:
                        raise CheckpointError(f"tensor {name} in {path} has shape {tuple(t.shape)}, expected {shape}")
                    t = jnp.asarray(t, dtype=jnp.float32)
                    flat[target] = (t.T if transpose else t).astype(dtype)
                    seen.add(name)
                    bar.update(1)
        except SafetensorError as e:
            raise CheckpointError(f"corrupt safetensors file {path}: {e}") from e
    bar.close()
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"checkpoint {ckpt_dir} lacks {len(missing)} tensors, e.g. {', '.join(missing[:5])}")
    if unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has {len(unexpected)} tensors kvjax does not know, e.g. {', '.join(unexpected[:5])}")
    if cfg.architecture == "Gemma3ForCausalLM":  # kvjax's Gemma params hold (1 + w) like GGUF files do
        for k in list(flat):
            if k.endswith("norm"):
                flat[k] = (flat[k].astype(jnp.float32) + 1.0).astype(dtype)
    return cfg, unflatten(flat, cfg.num_layers)


def unflatten(flat: dict[str, jnp.ndarray], num_layers: int) -> dict:
    """``{"embed": .., "layers.3.q": ..}`` -> the nested params pytree (layers as a tuple of dicts)."""
    params: dict = {"layers": [dict() for _ in range(num_layers)]}
    for k, v in flat.items():
        if k.startswith("layers."):
            _, i, name = k.split(".", 2)
            params["layers"][int(i)][name] = v
        else:
            params[k] = v
    params["layers"] = tuple(params["layers"])
    return params

"""Gemma 3 text decoder as a pure function of ``(params, tokens, kv_state)`` (same contract as
:func:`kvjax.models.llama.forward`).

Params layout (Linear weights as ``(in, out)``; every norm weight is stored as ``1 + w`` of the HF weight ``w``, as
GGUF files hold it — :func:`kvjax.checkpoints.safetensors.load_safetensors` adds the 1 for HF checkpoints)::

    {"embed": (V, D), "norm": (D,), "lm_head": (D, V)  # absent when tied (Gemma 3 always ties)
     "layers": ({"attn_norm", "q", "k", "v", "o", "q_norm" (Dh,), "k_norm" (Dh,), "post_attn_norm",
                 "mlp_norm" (pre-feed-forward norm), "gate", "up", "down", "post_mlp_norm"}, ...)}

One layer, in HF's order (``transformers/models/gemma3/modeling_gemma3.py``)::

    h = attn(rms(x) )                      q, k: RMSNorm over head_dim (QK-norm) *before* RoPE
    x = x + rms(h)                         post-attention norm
    x = x + rms(down(gelu_tanh(gate(rms(x))) * up(rms(x))))   pre/post feed-forward norms (GeGLU)

The embedding is scaled by ``sqrt(hidden_size)`` rounded to the param dtype (as HF does: 25.3 in f32, 25.25 in
bf16); queries by ``query_pre_attn_scalar ** -0.5``. Local layers (``layer_types[i] == "sliding_attention"``) see
keys at distance ``< sliding_window`` — HF's ``sliding_window_overlay`` (``kv_idx > q_idx - sliding_window``) and
llama.cpp (masked iff ``p1 - p0 >= n_swa``) use the same convention as kvjax's
:func:`kvjax.attention.visibility`, so the window is passed unchanged (through the state layer's ``window``) — and
use RoPE base ``rope_local_base_freq`` without scaling; global layers use ``rope_theta`` with ``rope_scaling``
(linear factor 8 on the larger Gemma 3 models). The final logits are soft-capped when
``final_logit_softcapping`` is set.

``attn_logit_softcapping`` is deliberately *not* applied: HF's Gemma 3 attention never passes it to the attention
kernel (unlike Gemma 2), so a config that sets it computes the same logits there; released Gemma 3 configs set it to
null.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kvjax.attention import Observe
from kvjax.config import ModelConfig
from kvjax.models.llama import attention_block, lm_logits, massive_positions, rms_norm, rope_frequencies, \
    token_positions
from kvjax.rope import inv_frequencies
from kvjax.state import KVState, bind_shared, unbind_shared


def is_local(cfg: ModelConfig, layer: int) -> bool:
    """Whether ``layer`` is a sliding-window (local) layer."""
    return bool(cfg.layer_types) and cfg.layer_types[layer] == "sliding_attention"


def _gelu(x: jax.Array, act: str) -> jax.Array:
    # "gelu_pytorch_tanh" (every released Gemma 3) is the tanh approximation; HF's "gelu" is the exact erf form.
    return jax.nn.gelu(x, approximate=act != "gelu")


def forward(cfg: ModelConfig, params: dict, tokens: jax.Array, state: KVState, token_mask: jax.Array | None = None,
            *, observe: Observe = Observe(), impl: str = "reference", logits: str = "all"):
    """Runs ``tokens`` ``(B, T)`` through Gemma 3, writing their keys/values into ``state``.

    Returns ``(logits, new_state, observations)`` exactly like :func:`kvjax.models.llama.forward`.
    """
    if token_mask is None:
        token_mask = jnp.ones(tokens.shape, bool)
    eps = cfg.rms_norm_eps
    pos = token_positions(state, token_mask)
    rope_pos = jnp.where(token_mask, pos - state.rope_shift[:, None], 0)
    inv_global = rope_frequencies(cfg, rope_pos)  # rope_theta + rope_scaling
    inv_local = jnp.asarray(inv_frequencies(cfg.head_dim, cfg.rope_local_base_freq))  # never scaled
    sm_scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5

    def qk_norm(p):
        return lambda q, k: (rms_norm(q, p["q_norm"], eps), rms_norm(k, p["k_norm"], eps))

    x = params["embed"][tokens]
    x = x * jnp.asarray(math.sqrt(cfg.hidden_size), jnp.float32).astype(x.dtype)
    new_layers, all_obs = [], []
    for i, p in enumerate(params["layers"]):
        h = rms_norm(x, p["attn_norm"], eps)
        a, layer, obs = attention_block(cfg, p, h, bind_shared(state.layers[i], new_layers), pos, rope_pos,
                                        inv_local if is_local(cfg, i) else inv_global, observe=observe, impl=impl,
                                        qk_norm=qk_norm(p), sm_scale=sm_scale)
        if observe.massive:
            obs = {**obs, "massive_pos": massive_positions(x, pos, observe.massive)}
        x = x + rms_norm(a, p["post_attn_norm"], eps)
        h = rms_norm(x, p["mlp_norm"], eps)
        m = (_gelu(h @ p["gate"], cfg.hidden_act) * (h @ p["up"])) @ p["down"]
        x = x + rms_norm(m, p["post_mlp_norm"], eps)
        new_layers.append(unbind_shared(layer))
        all_obs.append(obs)
    new_state = state.replace(layers=tuple(new_layers),
                              next_pos=state.next_pos + jnp.sum(token_mask, axis=1, dtype=jnp.int32))
    out = lm_logits(cfg, params, x, token_mask, logits)
    if out is not None and logits != "hidden" and cfg.final_logit_softcapping:
        cap = cfg.final_logit_softcapping
        out = cap * jnp.tanh(out / cap)
    return out, new_state, tuple(all_obs)

"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) as a pure function of ``(params, tokens, kv_state)``.

Params layout (Linear weights as ``(in, out)``, so ``y = x @ w``)::

    {"embed": (V, D), "norm": (D,), "lm_head": (D, V)  # absent when tied
     "layers": ({"attn_norm", "q", "k", "v", "o", "q_bias"?, "k_bias"?, "v_bias"?,
                 "mlp_norm", "gate", "up", "down"}, ...)}

An MLA model (``cfg.attention_type == "mla"``, upcycled by :mod:`kvjax.upcycle`) has ``q_nope``, ``q_rope``,
``kv_down``, ``k_rope``, ``k_up``, ``v_up`` instead of ``q``, ``k``, ``v`` (see :mod:`kvjax.models.mla`); the rest of the
forward is shared.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.attention import Observe, attend
from kvjax.config import ModelConfig
from kvjax.rope import apply_rope, dynamic_inv_frequencies, inv_frequencies
from kvjax.state import (KVState, StackedLayers, bind_shared, pad_stack, resize_obs, stack_layers, stackable,
                          unbind_shared, unpad_unstack)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * w.astype(jnp.float32)).astype(x.dtype)


def token_positions(state: KVState, token_mask: jax.Array) -> jax.Array:
    """Original positions ``(B, T)`` of a chunk's tokens (``-1`` for padding), continuing ``state.next_pos``."""
    offs = jnp.cumsum(token_mask.astype(jnp.int32), axis=1) - 1
    return jnp.where(token_mask, state.next_pos[:, None] + offs, -1)


def rope_frequencies(cfg: ModelConfig, pos: jax.Array, theta: float | None = None) -> jax.Array:
    theta = cfg.rope_theta if theta is None else theta
    if cfg.rope_scaling.rope_type == "dynamic":
        return dynamic_inv_frequencies(cfg.head_dim, theta, cfg.rope_scaling, cfg.max_position_embeddings,
                                       jnp.max(pos) + 1)
    return jnp.asarray(inv_frequencies(cfg.head_dim, theta, cfg.rope_scaling, cfg.max_position_embeddings))


def _proj(x, p, name):
    y = x @ p[name]
    if name + "_bias" in p:
        y = y + p[name + "_bias"]
    return y


def attention_block(cfg: ModelConfig, p: dict, h: jax.Array, layer, pos: jax.Array, rope_pos: jax.Array,
                    inv_freq: jax.Array, *, observe: Observe, impl: str, qk_norm=None, sm_scale=None,
                    softcap: float = 0.0):
    """Self-attention of one layer: projections, RoPE, cache write, attention. Returns ``(out, layer, obs)``.

    A layer whose params are multi-head latent attention's (an upcycled model, :mod:`kvjax.models.mla`) runs the MLA
    variant of this block over its :class:`~kvjax.state.LatentKV` cache."""
    if "kv_down" in p:
        from kvjax.models.mla import mla_attention_block  # noqa: PLC0415

        if qk_norm is not None or sm_scale is not None or softcap:
            raise ValueError("MLA layers support neither QK-norm, a custom softmax scale nor logit soft-capping")
        return mla_attention_block(cfg, p, h, layer, pos, rope_pos, inv_freq, observe=observe, impl=impl)
    b, t, _ = h.shape
    q = _proj(h, p, "q").reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = _proj(h, p, "k").reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = _proj(h, p, "v").reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if qk_norm is not None:
        q, k = qk_norm(q, k)
    qkv = jnp.concatenate([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], -1) \
        if observe.inputs else None
    q = apply_rope(q, rope_pos, inv_freq).transpose(0, 2, 1, 3)
    k = apply_rope(k, rope_pos, inv_freq).transpose(0, 2, 1, 3)
    v = v.transpose(0, 2, 1, 3)
    ring = getattr(layer, "ring_start", -1) >= 0
    if ring and t > 1:
        # A chunk may overwrite ring slots its own early queries still need: attend over cache + chunk first.
        # No observations here: they would index keys the ring does not keep (compression methods leave
        # sliding-window layers alone).
        pos_h = jnp.broadcast_to(pos[:, None, :], (b, cfg.num_kv_heads, t))
        out, _ = attend(q, layer, pos, sm_scale=sm_scale, softcap=softcap, impl=impl, extra_kv=(k, v, pos_h))
        obs = {}
        layer = layer.append(k, v, pos)
    else:
        layer = layer.append(k, v, pos)
        out, obs = attend(q, layer, pos, sm_scale=sm_scale, softcap=softcap, observe=observe, impl=impl)
        if qkv is not None:
            obs = {**obs, "qkv": qkv}
        if observe.qmax:
            ok = (pos >= 0)[:, None, :, None]
            obs = {**obs, "q_absmax": jnp.max(jnp.where(ok, jnp.abs(q.astype(jnp.float32)), 0.0), axis=2)}
    out = out.transpose(0, 2, 1, 3).reshape(b, t, cfg.num_heads * cfg.head_dim)
    return out @ p["o"], layer, obs


def forward(cfg: ModelConfig, params: dict, tokens: jax.Array, state: KVState, token_mask: jax.Array | None = None,
            *, observe: Observe = Observe(), impl: str = "reference", logits: str = "all"):
    """Runs ``tokens`` ``(B, T)`` through the model, writing their keys/values into ``state``.

    Returns ``(logits, new_state, observations)``; ``logits`` is ``(B, T, V)`` (``logits="all"``), the last valid
    token's ``(B, V)`` (``"last"``), the final normed hidden states ``(B, T, D)`` (``"hidden"``) or ``None``
    (``"none"``); observations are a tuple with one dict per layer.
    """
    if token_mask is None:
        token_mask = jnp.ones(tokens.shape, bool)
    pos = token_positions(state, token_mask)
    rope_pos = jnp.where(token_mask, pos - state.rope_shift[:, None], 0)
    inv_freq = rope_frequencies(cfg, jnp.where(token_mask, rope_pos, 0))
    x = params["embed"][tokens]

    def layer_fn(x, p, layer):
        h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
        a, layer, obs = attention_block(cfg, p, h, layer, pos, rope_pos, inv_freq, observe=observe, impl=impl)
        if observe.massive:
            obs = {**obs, "massive_pos": massive_positions(x, pos, observe.massive)}
        x = x + a
        h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
        x = x + (jax.nn.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]
        return x, layer, obs

    x, layers, all_obs = run_layers(layer_fn, x, params["layers"], state.layers)
    new_state = state.replace(layers=layers,
                              next_pos=state.next_pos + jnp.sum(token_mask, axis=1, dtype=jnp.int32))
    return lm_logits(cfg, params, x, token_mask, logits), new_state, all_obs


def massive_positions(x: jax.Array, pos: jax.Array, n: int) -> jax.Array:
    """Original positions ``(B, n)`` of the tokens holding the ``n`` largest ``|x|`` entries of hidden states ``x``
    ``(B, T, hidden)`` (padding excluded), largest first: the massive activations RotateKV keeps as attention sinks
    (the authors' ``topk(|hidden_states|.flatten(), 20) // hidden``, per layer input)."""
    b, t, hd = x.shape
    mag = jnp.where((pos >= 0)[..., None], jnp.abs(x.astype(jnp.float32)), -1.0).reshape(b, t * hd)
    _, idx = jax.lax.top_k(mag, min(n, t * hd))
    return jnp.take_along_axis(pos, idx // hd, axis=1)


def run_layers(layer_fn, x, param_layers, cache_layers):
    """Applies ``layer_fn(x, p, cache) -> (x, cache, obs)`` over the layers.

    When params and caches are homogeneous across layers (or already :class:`StackedLayers`), one ``lax.scan``
    runs them (compile time independent of depth); otherwise the layers are unrolled. A stacked cache stays stacked
    (the decode loop carries it so); a tuple comes back as a tuple.
    """
    caps = None
    if not isinstance(cache_layers, StackedLayers) and not stackable(cache_layers) and stackable(param_layers):
        padded = pad_stack(cache_layers)  # layers that differ only in capacity (per-layer budgets): pad and scan
        if padded is not None:
            cache_layers, caps = padded
    if isinstance(cache_layers, StackedLayers) or (stackable(cache_layers) and stackable(param_layers)):
        sp = stack_layers(param_layers).tree
        sc = stack_layers(cache_layers).tree

        def body(h, inp):
            p, c = inp
            h, c, o = layer_fn(h, p, c)
            return h, (c, o)

        x, (sc, obs) = jax.lax.scan(body, x, (sp, sc))
        n = len(StackedLayers(sc))
        obs = tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], obs) for i in range(n))
        if caps is not None:
            return x, unpad_unstack(StackedLayers(sc), caps), tuple(resize_obs(o, c) for o, c in zip(obs, caps))
        layers = StackedLayers(sc) if isinstance(cache_layers, StackedLayers) else StackedLayers(sc).unstack()
        return x, layers, obs
    new_layers, all_obs = [], []
    for p, layer in zip(param_layers, cache_layers):
        x, layer, obs = layer_fn(x, p, bind_shared(layer, new_layers))  # cross-layer caches: shared parts attached
        new_layers.append(unbind_shared(layer))
        all_obs.append(obs)
    return x, tuple(new_layers), tuple(all_obs)


def lm_logits(cfg: ModelConfig, params: dict, x: jax.Array, token_mask: jax.Array, which: str,
              final_norm=None) -> jax.Array | None:
    """Final norm and LM head on all positions or only on each row's last valid token."""
    if which == "none":
        return None
    if which == "last":
        t = x.shape[1]
        last = t - 1 - jnp.argmax(token_mask[:, ::-1], axis=1)
        x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    elif which not in ("all", "hidden"):
        raise ValueError(f"logits must be 'all', 'last', 'hidden' or 'none', got {which!r}")
    x = final_norm(x) if final_norm is not None else rms_norm(x, params["norm"], cfg.rms_norm_eps)
    if which == "hidden":  # the final normed hidden states (B, T, D), before the LM head (distillation targets)
        return x
    if "lm_head" in params:
        head = params["lm_head"]
    elif cfg.tie_word_embeddings:
        head = params["embed"].T
    else:
        raise ValueError("params have no 'lm_head' weight but the model's output layer is not tied to the embedding "
                         "(tie_word_embeddings=False); load the checkpoint's lm_head (it is never replaced by the "
                         "transposed embedding)")
    return (x @ head).astype(jnp.float32)

"""Multi-head latent attention (MLA) as a variant of the Llama-family attention block.

MLA (DeepSeek-V2, "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model", arXiv
2405.04434) caches per token a joint key/value latent ``c = h @ W_dkv`` (``d_latent = cfg.mla_kv_rank``) and a
decoupled RoPE key ``k_r = RoPE(h @ W_kr)`` shared by all heads (``cfg.mla_rope_heads`` chunks of ``head_dim``,
rotated with the model's own RoPE frequencies). Head ``i`` attends with

    score_i = q_nope_i . (c @ W_uk_i) + sum_j RoPE(q_rope_ij) . k_r_j         (scaled by head_dim ** -0.5)
    out_i   = softmax(score_i) @ (c @ W_uv_i),        output = concat_i(out_i) @ W_o

Params of an MLA layer (Linear weights ``(in, out)``), replacing ``q``, ``k``, ``v`` (``o`` is kept)::

    q_nope (D, Hq * dn)      q_rope (D, Hq * d_rope)      kv_down (D, d_latent)      k_rope (D, d_rope)
    k_up (d_latent, Hq * dn)  v_up (d_latent, Hq * head_dim)  o (Hq * head_dim, D)

with ``dn = cfg.mla_nope_dim`` (0: every key dimension carries RoPE, as TransMLA's exact rewrite) and
``d_rope = cfg.mla_rope_dim``.

Two attention paths compute the same function:

* ``"absorbed"`` (the default; the weight-absorption trick of DeepSeek-V2 §2.1.2): ``W_uk`` is folded into the query
  (``q_lat_i = W_uk_i @ q_nope_i``) and ``W_uv`` into the output (``out_i = (p_i @ c) @ W_uv_i``), so attention is
  multi-query attention over the cached ``[c, k_r]`` with values ``c``: the latent is never expanded to per-head keys
  or values, at prefill or decode.
* ``"expanded"`` (``Model(cfg, impl="expanded")``, the reference): per-head keys ``[c @ W_uk_i, k_r]`` and values
  ``c @ W_uv_i`` are materialised for every cached token and attended with the plain GQA reference.

Observations (:class:`kvjax.attention.Observe`) of the absorbed path: ``window`` / ``colsum`` / ``queries`` over the
latent's slots (one shared "KV head", so eviction keeps one token selection for all heads: SnapKV works as is);
``window_q`` / ``queries`` are the absorbed queries ``[q_lat, q_rope]``. ``inputs`` (pre-RoPE q/k/v per KV head) and
``qmax`` have no MLA meaning and are refused. ``impl="pallas"`` runs the jnp reference for MLA layers (the decode
kernels take equal key and value widths; the absorbed keys are ``d_latent + d_rope`` wide, the values ``d_latent``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.attention import Observe, reference_attention
from kvjax.rope import apply_rope

MLA_PARAMS = ("q_nope", "q_rope", "kv_down", "k_rope", "k_up", "v_up", "o")
MLA_IMPLS = ("reference", "pallas", "expanded")


def is_mla_layer(p: dict) -> bool:
    return "kv_down" in p


def _project(cfg, p: dict, h: jax.Array, rope_pos: jax.Array, inv_freq: jax.Array):
    """Query parts, new latents and RoPE keys of a chunk ``h`` ``(B, T, D)``."""
    b, t, _ = h.shape
    hq, dh, nr, dn = cfg.num_heads, cfg.head_dim, cfg.mla_rope_heads, cfg.mla_nope_dim
    q_rope = apply_rope((h @ p["q_rope"]).reshape(b, t, hq * nr, dh), rope_pos, inv_freq).reshape(b, t, hq, nr * dh)
    q_nope = (h @ p["q_nope"]).reshape(b, t, hq, dn) if dn else None
    c = h @ p["kv_down"]  # (B, T, d_latent)
    kr = apply_rope((h @ p["k_rope"]).reshape(b, t, nr, dh), rope_pos, inv_freq).reshape(b, t, nr * dh)
    return q_nope, q_rope, c, kr


def expand_latent(cfg, p: dict, c: jax.Array, kr: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-head keys ``(B, Hq, S, dn + d_rope)`` and values ``(B, Hq, S, head_dim)`` of latents ``c`` ``(B, 1, S, r)``
    and RoPE keys ``kr`` ``(B, 1, S, d_rope)`` (the expanded reference; what absorption avoids)."""
    hq, dh, dn = cfg.num_heads, cfg.head_dim, cfg.mla_nope_dim
    b, _, s, r = c.shape
    cf = c[:, 0].astype(jnp.float32)
    v = jnp.einsum("bsr,rhd->bhsd", cf, p["v_up"].reshape(r, hq, dh).astype(jnp.float32))
    krh = jnp.broadcast_to(kr.astype(jnp.float32), (b, hq, s, kr.shape[-1]))
    if not dn:
        return krh, v
    kn = jnp.einsum("bsr,rhn->bhsn", cf, p["k_up"].reshape(r, hq, dn).astype(jnp.float32))
    return jnp.concatenate([kn, krh], -1), v


def mla_attention_block(cfg, p: dict, h: jax.Array, layer, pos: jax.Array, rope_pos: jax.Array, inv_freq: jax.Array,
                        *, observe: Observe, impl: str):
    """The MLA self-attention of one layer (same contract as :func:`kvjax.models.llama.attention_block`): writes the
    chunk's latents into the :class:`~kvjax.state.LatentKV` ``layer`` and attends. Returns ``(out, layer, obs)``."""
    if impl not in MLA_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r} for an MLA model; choose one of {', '.join(MLA_IMPLS)}")
    if observe.inputs or observe.qmax:
        raise ValueError("MLA layers provide the window / colsum / queries observations only (not inputs or qmax): "
                         "this compression method cannot run on an MLA model")
    if not hasattr(layer, "kr"):
        raise TypeError(f"an MLA layer needs a LatentKV cache (kvjax.state.init_state of the MLA config), got "
                        f"{type(layer).__name__}")
    b, t, _ = h.shape
    hq, dh, dn = cfg.num_heads, cfg.head_dim, cfg.mla_nope_dim
    r = cfg.mla_kv_rank
    scale = dh ** -0.5  # the original model's softmax scale (TransMLA and X-EcoMLA keep it)
    q_nope, q_rope, c, kr = _project(cfg, p, h, rope_pos, inv_freq)
    layer = layer.append(c[:, None], kr[:, None], pos)
    if impl == "expanded":
        k, v = expand_latent(cfg, p, layer.c, layer.kr)
        q = q_rope if not dn else jnp.concatenate([q_nope, q_rope], -1)
        k_pos = jnp.broadcast_to(layer.pos, (b, hq, layer.capacity))
        out, obs = reference_attention(q.transpose(0, 2, 1, 3).astype(jnp.float32), k, v, pos, k_pos, sm_scale=scale,
                                       observe=observe)
    else:
        q = q_rope.astype(jnp.float32)
        if dn:  # absorb W_uk into the query: q_lat_i = W_uk_i @ q_nope_i
            q_lat = jnp.einsum("bthn,rhn->bthr", q_nope.astype(jnp.float32),
                               p["k_up"].reshape(r, hq, dn).astype(jnp.float32))
            q = jnp.concatenate([q_lat, q], -1)
            k = jnp.concatenate([layer.c, layer.kr], -1)
        else:  # every key dimension is in the RoPE part: the latent is the values only
            k = layer.kr
        out_lat, obs = reference_attention(q.transpose(0, 2, 1, 3), k, layer.c, pos, layer.pos, sm_scale=scale,
                                           observe=observe)  # (B, Hq, T, r): attention-weighted latents
        out = jnp.einsum("bhtr,rhd->bhtd", out_lat.astype(jnp.float32),
                         p["v_up"].reshape(r, hq, dh).astype(jnp.float32))  # absorb W_uv on the output side
    out = out.transpose(0, 2, 1, 3).reshape(b, t, hq * dh).astype(h.dtype)
    return out @ p["o"], layer, obs

"""Training DuoAttention's gates (arXiv 2410.10819) on a frozen backbone: see :mod:`kvjax.compress.duo_attention`.

:func:`gated_hidden` runs the model over a whole sequence (no cache) with every KV head's attention output mixed as
``alpha * full + (1 - alpha) * streaming`` (streaming = the same softmax restricted to the ``n_sink`` first tokens and
the ``recent`` most recent ones, the authors' training mask); the loss is the authors': the mean over answer tokens
(``label_mask``) of the mean squared difference of the final (normed) hidden states against the full model, plus
``reg_weight x mean |alpha|``. Gates start at 1 and are clamped to [0, 1] after every step (the authors'
``initial_value`` and ``clamp_``). Llama-family models (the layers are scanned, each rematerialised).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.models.llama import rms_norm, rope_frequencies, token_positions
from kvjax.rope import apply_rope
from kvjax.state import init_state, stack_layers

NEG = -1e30


def _mix_attention(q, k, v, pos, alpha, n_sink: int, recent: int):
    """q ``(B, T, Hq, D)``, k/v ``(B, T, Hkv, D)`` (RoPE applied), ``alpha`` ``(Hkv,)`` → ``(B, T, Hq, D)``."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, t, hkv, g, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg.astype(jnp.float32), k.astype(jnp.float32)) * d ** -0.5
    qp, kp = pos[:, None, None, :, None], pos[:, None, None, None, :]
    causal = (kp >= 0) & (qp >= 0) & (kp <= qp)
    local = causal & ((kp < n_sink) | (qp - kp < recent))

    def attn(mask):
        p = jax.nn.softmax(jnp.where(mask, s, NEG), axis=-1)
        p = jnp.where(mask, p, 0.0)
        return jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))

    a = alpha.astype(jnp.float32)[None, None, :, None, None]
    out = a * attn(causal) + (1 - a) * attn(local)
    return out.reshape(b, t, hq, -1).astype(q.dtype)


def gated_hidden(cfg, params, gates, tokens, mask, n_sink: int, recent: int):
    """Final normed hidden states ``(B, T, D)`` with gated attention (``gates`` ``(L, Hkv)``; all ones = the full
    model)."""
    b, t = tokens.shape
    state = init_state(cfg, b, 1)
    pos = token_positions(state, mask)
    rp = jnp.maximum(pos, 0)
    inv = rope_frequencies(cfg, rp)
    x = params["embed"][tokens]
    hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def proj(h, p, name):
        y = h @ p[name]
        return y + p[name + "_bias"] if name + "_bias" in p else y

    @jax.checkpoint
    def layer(x, inp):
        p, alpha = inp
        h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
        q = apply_rope(proj(h, p, "q").reshape(b, t, hq, hd), rp, inv)
        k = apply_rope(proj(h, p, "k").reshape(b, t, hkv, hd), rp, inv)
        v = proj(h, p, "v").reshape(b, t, hkv, hd)
        o = _mix_attention(q, k, v, pos, alpha, n_sink, recent).reshape(b, t, hq * hd)
        x = x + o @ p["o"]
        h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
        return x + (jax.nn.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"], None

    x, _ = jax.lax.scan(layer, x, (stack_layers(params["layers"]).tree, gates))
    return rms_norm(x, params["norm"], cfg.rms_norm_eps)


def make_loss(model, n_sink: int, recent: int, reg_weight: float):
    cfg = model.cfg
    if cfg.architecture not in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM") or cfg.sliding_window:
        raise ValueError(f"DuoAttention gate training supports Llama-family models without sliding windows, not "
                         f"{cfg.architecture}")

    def loss(gates, params, batch, key):
        del key
        tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"])
        labels = (jnp.asarray(batch["label_mask"]) & mask).astype(jnp.float32)
        ones = jnp.ones_like(gates["gates"])
        ref = jax.lax.stop_gradient(gated_hidden(cfg, params, ones, tokens, mask, n_sink, recent))
        out = gated_hidden(cfg, params, gates["gates"], tokens, mask, n_sink, recent)
        per_tok = jnp.mean(jnp.square(out.astype(jnp.float32) - ref.astype(jnp.float32)), axis=-1)
        distill = jnp.sum(per_tok * labels) / jnp.maximum(labels.sum(), 1.0)
        reg = jnp.mean(jnp.abs(gates["gates"]))
        return distill + reg_weight * reg, {"distill": distill, "l1": reg}

    return loss


class DuoTrainer:
    """What :func:`kvjax.train.run.run_training` needs for ``train.kind = "duo_attention"``."""

    kind = "duo_attention"

    def __init__(self, cfg: dict):
        self.n_sink = int(cfg.get("n_sink", 64))
        self.recent = int(cfg.get("recent", 256))
        self.reg_weight = float(cfg.get("reg_weight", 0.05))
        self.initial_value = float(cfg.get("initial_value", 1.0))

    def init(self, lm, key):
        del key
        return {"gates": jnp.full((lm.cfg.num_layers, lm.cfg.num_kv_heads), self.initial_value, jnp.float32)}

    def loss_fn(self, model):
        return make_loss(model, self.n_sink, self.recent, self.reg_weight)

    @staticmethod
    def project(params):
        return jax.tree_util.tree_map(lambda g: jnp.clip(g, 0.0, 1.0), params)

    def info(self) -> dict:
        return {"n_sink": self.n_sink, "recent": self.recent, "reg_weight": self.reg_weight}

    def finalize(self, lm, params, info) -> dict:
        """Writes the gate heat map next to the artefact and returns gate statistics for the summary."""
        g = np.asarray(params["gates"])
        return {"gate_mean": float(g.mean()), "gates": g.round(4).tolist()}


def plot_gates(gates: np.ndarray, path: str, title: str) -> None:
    """Heat map of gate values (layers x KV heads)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    g = np.asarray(gates)
    fig, ax = plt.subplots(figsize=(max(3, 0.6 * g.shape[1] + 2), max(3, 0.18 * g.shape[0] + 1)))
    im = ax.imshow(g, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(g.shape[1]))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="gate (1 = retrieval)")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    import os  # noqa: PLC0415

    os.replace(tmp, path)

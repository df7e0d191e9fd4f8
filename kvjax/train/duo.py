"""Training DuoAttention's gates (arXiv 2410.10819) on a frozen backbone: see :mod:`kvjax.compress.duo_attention`.

:func:`gated_hidden` runs the model over a whole sequence (no cache) with every KV head's attention output mixed as
``alpha * full + (1 - alpha) * streaming`` (streaming = the same softmax restricted to the ``n_sink`` first tokens and
the ``recent`` most recent ones, the authors' training mask); the loss is the authors': the mean over answer tokens
(``label_mask``) of the mean squared difference of the final (normed) hidden states against the full model, plus
``reg_weight x mean |alpha|``. Gates start at 1 and are clamped to [0, 1] after every step (the authors'
``initial_value`` and ``clamp_``). The hidden states come from the model's own forward (Llama family and Gemma 3 alike)
over a state of :class:`~kvjax.compress.duo_attention.GatedDuoKV` layers: no second model path. Sliding-window layers
(Gemma 3's local layers) are already local and carry no trained gate (their gates stay at 1 and are left out of the
L1 term and of the deployment sparsity).

Deviation: the distillation runs over the answer tokens' positions (``label_mask``); the authors' covers the question
and the answer (their ``qa_tokens``), so it also includes the position before the first answer token, whose hidden
state predicts that token. Both compare the gated model's final hidden states with the full model's where the
retrieved content is used; the gates of the README were trained this way.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.compress.duo_attention import gated_layer_mask, gated_layers
from kvjax.state import init_state


def gated_hidden(cfg, params, gates, tokens, mask, n_sink: int, recent: int):
    """Final normed hidden states ``(B, T, D)`` of the model's own forward over a state whose global layers attend
    with gated heads (:class:`kvjax.compress.duo_attention.GatedDuoKV`; ``gates`` ``(L, Hkv)``, all ones = the full
    model)."""
    from kvjax.models import forward_fn  # noqa: PLC0415

    b, t = tokens.shape
    state = gated_layers(init_state(cfg, b, t), gates, n_sink, recent)
    hidden, _, _ = forward_fn(cfg)(cfg, params, tokens, state, mask, logits="hidden")
    return hidden


def make_loss(model, n_sink: int, recent: int, reg_weight: float):
    cfg = model.cfg
    eligible = jnp.asarray(gated_layer_mask(cfg), jnp.float32)
    if getattr(cfg, "mla_kv_rank", 0) or not eligible.any():
        raise ValueError(f"DuoAttention gate training needs a model with global-attention layers of dense caches; "
                         f"{cfg.architecture} (sliding_window={cfg.sliding_window}) has none")

    def loss(gates, params, batch, key):
        del key
        tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"])
        labels = (jnp.asarray(batch["label_mask"]) & mask).astype(jnp.float32)
        ones = jnp.ones_like(gates["gates"])
        ref = jax.lax.stop_gradient(gated_hidden(cfg, params, ones, tokens, mask, n_sink, recent))
        out = gated_hidden(cfg, params, gates["gates"], tokens, mask, n_sink, recent)
        per_tok = jnp.mean(jnp.square(out.astype(jnp.float32) - ref.astype(jnp.float32)), axis=-1)
        distill = jnp.sum(per_tok * labels) / jnp.maximum(labels.sum(), 1.0)
        reg = jnp.sum(jnp.abs(gates["gates"]) * eligible) / eligible.sum()  # local layers' gates are unused
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


def plot_gates(gates: np.ndarray, path: str, title: str, eligible: np.ndarray | None = None) -> None:
    """Heat map of gate values (layers x KV heads). Heads outside ``eligible`` (sliding-window layers: no gate) are
    drawn grey and labelled "local"; small maps carry each gate's value in its cell."""
    import os  # noqa: PLC0415

    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    g = np.asarray(gates, np.float64)
    ok = np.ones(g.shape, bool) if eligible is None else np.asarray(eligible, bool)
    if ok.shape != g.shape:
        raise ValueError(f"eligible mask of shape {ok.shape} does not match gates of shape {g.shape}")
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("0.85")
    fig, ax = plt.subplots(figsize=(max(3, 0.6 * g.shape[1] + 2), max(3, 0.18 * g.shape[0] + 1)))
    im = ax.imshow(np.ma.masked_where(~ok, g), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    if g.size <= 64:
        for (i, j), v in np.ndenumerate(g):
            ax.text(j, i, f"{v:.2f}" if ok[i, j] else "local", ha="center", va="center", fontsize=6,
                    color="black" if not ok[i, j] or v > 0.6 else "white")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(g.shape[1]))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="gate (1 = retrieval)")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)

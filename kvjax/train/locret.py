"""Training Locret's retaining heads (arXiv 2410.01805) on a frozen backbone: see :mod:`kvjax.compress.locret`.

The loss of a batch: the backbone runs once (no gradient reaches it: only the heads are trainable) and returns every
global layer's attention inputs and attention probabilities (the model's own forward: Llama family and Gemma 3);
per layer, the target is the causal importance of each token (max attention from the
batch's later queries, ``query_mask``), the prediction the retaining head's output, and the loss is the authors':
Smooth-L1 (mean over layers, heads and tokens) + 0.0025 x the neighbouring-score MSE (summed over layers). The
``acc`` metric is the authors' too: overlap of the top 10% tokens by prediction and by target (among the tokens
that are units; a row with fewer units than 10% of the window counts its units only).
Deviation (stated in :mod:`kvjax.compress.locret`): the target is the maximum attention probability, not the
authors' maximum pre-softmax logit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.attention import Observe
from kvjax.compress.locret import head_scores, importance_from_probs, init_heads, locret_loss_terms
from kvjax.state import DenseKV, init_state

SMOOTH_WEIGHT = 0.0025  # the authors' train.py
TOP_FRACTION = 0.1  # the authors' accuracy metric


def layer_targets(model, params, tokens, mask, query_mask):
    """``(layers, qkv, target)`` of the layers Locret acts on (global layers of dense caches; Gemma 3's sliding-window
    layers are skipped at inference, so they get no target): ``layers`` ``(L',)`` their indices, ``qkv``
    ``(L', B, T, F)`` their pre-RoPE attention inputs and ``target`` ``(L', B, Hkv, T)`` each token's causal importance,
    all from one run of the model's own forward (frozen): the probabilities are the model's attention (its RoPE,
    QK-norm and softmax scale), observed for every query and reduced by :func:`importance_from_probs`."""
    cfg = model.cfg
    b, t = tokens.shape
    state = init_state(cfg, b, t)
    _, _, obs = model.forward_impl(cfg, params, tokens, state, mask, observe=Observe(inputs=True, window=t),
                                   logits="none")
    layers = [i for i, (o, c) in enumerate(zip(obs, state.layers))
              if "qkv" in o and "window" in o and isinstance(c, DenseKV) and not c.window]
    if not layers:
        raise ValueError(f"Locret training needs global-attention layers of dense caches; {cfg.architecture} has none")
    qkv = jax.lax.stop_gradient(jnp.stack([obs[i]["qkv"] for i in layers]))
    target = jnp.stack([importance_from_probs(obs[i]["window"], query_mask, cfg.num_kv_heads) for i in layers])
    return jnp.asarray(layers, jnp.int32), qkv, jax.lax.stop_gradient(target)


def _top_overlap(pred, target, units):
    """Fraction of the top ``TOP_FRACTION`` tokens by target that are also in the top by prediction, among units
    (``units`` ``(B, T)``; ``pred``/``target`` ``(B, H, T)``): masked slots never count as matches."""
    t = pred.shape[-1]
    k = max(1, int(TOP_FRACTION * t))
    neg = jnp.where(units[:, None, :], 0.0, -1e30)
    _, ip = jax.lax.top_k(pred + neg, k)
    _, it = jax.lax.top_k(target + neg, k)
    is_unit = jnp.take_along_axis(jnp.broadcast_to(units[:, None, :], pred.shape), ip, axis=-1)
    hit = jnp.any(ip[..., :, None] == it[..., None, :], axis=-1) & is_unit
    n = jnp.minimum(k, units.sum(-1))[:, None]  # (B, 1): a row with fewer units than k
    return jnp.mean(hit.sum(-1) / jnp.maximum(n, 1))


def make_loss(model):
    """``loss(heads, backbone_params, batch, key) -> (loss, metrics)`` for :func:`kvjax.train.make_train_step`."""
    if getattr(model.cfg, "mla_kv_rank", 0):
        raise ValueError("Locret training needs dense KV caches; an MLA model's latent cache has none")

    def loss(heads, params, batch, key):
        del key
        mask = jnp.asarray(batch["mask"])
        qmask = jnp.asarray(batch["query_mask"]) & mask
        layers, qkv, targets = layer_targets(model, params, jnp.asarray(batch["tokens"]), mask, qmask)
        units = mask & ~qmask

        def per_layer(args):
            i, x, target = args
            pred = head_scores(heads, i, x)
            reg, smooth = locret_loss_terms(pred, target, units)
            return reg, smooth, _top_overlap(pred, target, units)

        reg, smooth, acc = jax.lax.map(per_layer, (layers, qkv, targets))
        total = reg.mean() + SMOOTH_WEIGHT * smooth.sum()
        return total, {"regression": reg.mean(), "smoothness": smooth.sum(), "top10_overlap": acc.mean()}

    return loss


class LocretTrainer:
    """What :func:`kvjax.train.run.run_training` needs for ``train.kind = "locret"``."""

    kind = "locret"

    def __init__(self, cfg: dict):
        self.hidden = int(cfg.get("hidden", 1024))

    def init(self, lm, key):
        return init_heads(lm.cfg, key, self.hidden)

    def loss_fn(self, model):
        return make_loss(model)

    project = None

    def info(self) -> dict:
        return {"hidden": self.hidden}

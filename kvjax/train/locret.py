"""Training Locret's retaining heads (arXiv 2410.01805) on a frozen backbone: see :mod:`kvjax.compress.locret`.

The loss of a batch: the backbone runs once (no gradient reaches it: only the heads are trainable) and returns every
layer's attention inputs; per layer, the target is the causal importance of each token (max attention from the
batch's later queries, ``query_mask``), the prediction the retaining head's output, and the loss is the authors':
Smooth-L1 (mean over layers, heads and tokens) + 0.0025 x the neighbouring-score MSE (summed over layers). The
``acc`` metric is the authors' too: overlap of the top 10% tokens by prediction and by target.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.attention import Observe
from kvjax.compress.locret import head_scores, init_heads, locret_loss_terms, oracle_scores
from kvjax.state import init_state

SMOOTH_WEIGHT = 0.0025  # the authors' train.py
TOP_FRACTION = 0.1  # the authors' accuracy metric


def layer_inputs(model, params, tokens, mask):
    """``(qkv (L, B, T, F), positions (B, T), inv_freq)``: every layer's pre-RoPE attention inputs (frozen)."""
    from kvjax.models.llama import rope_frequencies, token_positions  # noqa: PLC0415

    cfg = model.cfg
    b, t = tokens.shape
    state = init_state(cfg, b, t)
    _, _, obs = model.forward_impl(cfg, params, tokens, state, mask, observe=Observe(inputs=True), logits="none")
    qkv = jax.lax.stop_gradient(jnp.stack([o["qkv"] for o in obs]))
    pos = token_positions(state, mask)
    return qkv, pos, rope_frequencies(cfg, jnp.maximum(pos, 0))


def _top_overlap(pred, target, units):
    t = pred.shape[-1]
    k = max(1, int(TOP_FRACTION * t))
    neg = jnp.where(units[:, None, :], 0.0, -1e30)
    _, ip = jax.lax.top_k(pred + neg, k)
    _, it = jax.lax.top_k(target + neg, k)
    hit = jnp.any(ip[..., :, None] == it[..., None, :], axis=-1)
    return hit.mean()


def make_loss(model):
    """``loss(heads, backbone_params, batch, key) -> (loss, metrics)`` for :func:`kvjax.train.make_train_step`."""
    cfg = model.cfg
    if cfg.architecture not in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        raise ValueError(f"Locret training supports the Llama family, not {cfg.architecture}")

    def loss(heads, params, batch, key):
        del key
        mask = jnp.asarray(batch["mask"])
        qmask = jnp.asarray(batch["query_mask"]) & mask
        qkv, pos, inv_freq = layer_inputs(model, params, jnp.asarray(batch["tokens"]), mask)
        units = mask & ~qmask

        def per_layer(args):
            i, x = args
            target = oracle_scores(cfg, x, pos, qmask, inv_freq)
            pred = head_scores(heads, i, x)
            reg, smooth = locret_loss_terms(pred, target, units)
            return reg, smooth, _top_overlap(pred, target, units)

        reg, smooth, acc = jax.lax.map(per_layer, (jnp.arange(cfg.num_layers), qkv))
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

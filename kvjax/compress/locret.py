"""Locret — "Locret: Enhancing Eviction in Long-Context LLM Inference with Trained Retaining Heads on Consumer-Grade
Devices", Huang et al., arXiv 2410.01805.

Retaining heads: one small network per layer on the attention inputs, ``R = W2 act(W1 [q; k; v])`` with ``q, k, v``
the layer's query / key / value projections of a token (before RoPE, all heads concatenated) and one output per KV
head: the token's predicted *causal importance score* (CIS). They are trained on the frozen backbone
(:mod:`kvjax.train.locret`) to regress the maximum attention probability the token receives from later queries (over
the query heads of its GQA group; the authors regress the pre-softmax logit, see Deviations), with a Smooth-L1 loss plus ``0.0025 x`` an MSE smoothness term between the scores
of neighbouring tokens (the authors' ``train.py``).

Inference: chunked prefill (:func:`kvjax.generate.prefill_chunked`). After every chunk the scores of the new tokens
are computed from the chunk's q/k/v, cached beside the slots (``extras["locret"]``), and every head keeps its top
``budget`` slots; the most recent ``stabilizers`` tokens are always kept between chunks (the ``chunk`` phase), the
last ``local_len`` tokens after the final chunk (the ``prefill`` phase). The cache therefore never holds more than
``budget + chunk_size`` slots per head while the prompt is prefilled (SnapKV needs the whole prompt first).

Defaults are the authors' (``inference/infer.py``: budget 6000, chunk 3072, 2500 stabilizers, 100 local tokens;
retaining-head width 1024). Deviations: the training target is the maximum attention *probability* a token receives
from later queries, where the authors' data generation (``data_gen.py``) keeps the attention weights before the
softmax, i.e. the maximum scaled logit q.k/sqrt(d): kvjax's forward observes probabilities (what every scorer here
reads), and a probability depends on how many keys share the softmax, so the heads learn a context-length-dependent
target and the authors' smoothness weight (0.0025, tuned for logits) weighs differently; the heads' activation is
SiLU on every model (the authors use the model's MLP activation, GELU-tanh on Gemma 3: the heads are trained from
scratch either way); ``budget`` counts the ``local_len``
tail (the authors append those tokens after the last eviction, so their cache ends at ``budget + local_len``; here
the tail is the end of the final chunk and the final eviction keeps it, ending at ``budget``); a run whose prompt is
one chunk (the harness's one-shot prefill) scores and evicts once like the final chunk. Acts on global layers only.
Heads come from a trained artefact: ``get_method("locret", heads="runs/locret/ckpt")`` (or a :class:`RetainingHeads`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention import Observe
from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.compress.evict import gather_layer, gather_obs, map_global_layers, recent_mask, select_keep


class RetainingHeads:
    """Trained retaining-head params ``{"fc1": (L, F, H), "fc2": (L, H, Hkv)}`` (F = (Hq + 2 Hkv) D).

    Hashes by identity, so a method holding it can be a static argument (the arrays themselves are passed to the
    jitted eviction as arguments, never baked into a program)."""

    def __init__(self, params: dict, info: dict | None = None):
        self.params = jax.tree_util.tree_map(jnp.asarray, dict(params))
        self.info = dict(info or {})

    def check(self, cfg) -> None:
        f = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        fc1, fc2 = self.params["fc1"].shape, self.params["fc2"].shape
        if fc1[0] != cfg.num_layers or fc1[1] != f or fc2[2] != cfg.num_kv_heads:
            raise ValueError(f"retaining heads of shapes fc1 {fc1}, fc2 {fc2} do not fit this model ({cfg.num_layers} "
                             f"layers, q/k/v width {f}, {cfg.num_kv_heads} KV heads): they were trained for another")

    def __repr__(self) -> str:
        return f"RetainingHeads({self.info.get('path', 'in memory')})"


def init_heads(cfg, key: jax.Array, hidden: int = 1024) -> dict:
    """Freshly initialised retaining heads for model ``cfg`` (torch ``nn.Linear``'s default uniform init, no bias,
    like the authors' ``fc1`` / ``fc2``)."""
    f = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    k1, k2 = jax.random.split(key)
    lim1, lim2 = f ** -0.5, hidden ** -0.5
    return {"fc1": jax.random.uniform(k1, (cfg.num_layers, f, hidden), jnp.float32, -lim1, lim1),
            "fc2": jax.random.uniform(k2, (cfg.num_layers, hidden, cfg.num_kv_heads), jnp.float32, -lim2, lim2)}


def head_scores(heads: dict, layer: jax.Array | int, qkv: jax.Array) -> jax.Array:
    """Predicted CIS ``(B, Hkv, T)`` of tokens with attention inputs ``qkv`` ``(B, T, F)`` in layer ``layer``."""
    h = jax.nn.silu(qkv.astype(jnp.float32) @ heads["fc1"][layer])
    return jnp.swapaxes(h @ heads["fc2"][layer], 1, 2)


@functools.lru_cache(maxsize=8)
def load_heads(path: str) -> RetainingHeads:
    from kvjax.train.checkpoint import load_artifact  # noqa: PLC0415

    params, info = load_artifact(path, "locret")
    return RetainingHeads(params, {**info, "path": path})


def _scatter_new(scores: jax.Array, fill: jax.Array, new: jax.Array) -> jax.Array:
    """Writes ``new`` ``(B, H, T)`` into slots ``[fill - T, fill)`` of ``scores`` ``(B, H, C)`` (where the model's
    append put the call's tokens)."""
    t = new.shape[-1]
    slots = fill[..., None] - t + jnp.arange(t, dtype=jnp.int32)
    return jax.vmap(jax.vmap(lambda s, i, x: s.at[i].set(x, mode="drop")))(scores, slots, new)


@functools.partial(jax.jit, static_argnames=("budget", "protect", "room"))
def evict_with_scores(heads: dict | None, state, obs, *, budget: int, protect: int, room: int, new_scores=None):
    """One Locret eviction: scores the call's new tokens (from ``obs[i]["qkv"]`` with ``heads``, or ``new_scores``
    ``(L, B, Hkv, T)`` given directly, e.g. an oracle), then keeps each head's top ``budget`` slots, the ``protect``
    most recent always, plus ``room`` free slots. Returns ``(state, obs)``."""
    layers = []
    for layer in state.layers:
        if "locret" not in layer.extras and not layer.window:
            layer = layer.replace(extras={**layer.extras, "locret": jnp.zeros(layer.pos.shape, jnp.float32)})
        layers.append(layer)
    state = state.replace(layers=tuple(layers))
    if new_scores is not None:
        obs = tuple({**o, "new_scores": new_scores[i]} for i, o in enumerate(obs))

    def one(i, layer, o):
        new = o["new_scores"] if new_scores is not None else head_scores(heads, i, o["qkv"])
        sc = _scatter_new(layer.extras["locret"], layer.fill, new)
        sc = jnp.where(layer.valid, sc, 0.0)
        layer = layer.replace(extras={**layer.extras, "locret": sc})
        force = recent_mask(layer, state.next_pos, protect) if protect else None
        idx, keep = select_keep(sc, layer.valid, budget, force)
        return gather_layer(layer, idx, keep, room), gather_obs(o, idx, keep, room)

    return map_global_layers(state, obs, one)


@register
@dataclasses.dataclass(frozen=True)
class Locret(Method):
    """Trained retaining heads + chunked-prefill eviction (see module docstring)."""

    budget: int = 6000  # slots per layer and head after the prompt (the local tail included)
    chunk_size: int = 3072
    stabilizers: int = 2500
    local_len: int = 100
    hidden: int = 1024  # retaining-head width (used when training)
    heads: Any = None  # path of a trained artefact, or a RetainingHeads
    name: ClassVar[str] = "locret"
    jittable: ClassVar[bool] = False  # runs its own jitted eviction with the heads as arguments

    def __post_init__(self):
        check_positive("budget", self.budget)
        check_positive("chunk_size", self.chunk_size)
        check_positive("stabilizers", self.stabilizers, allow_zero=True)
        check_positive("local_len", self.local_len, allow_zero=True)
        check_positive("hidden", self.hidden)
        if self.stabilizers >= self.budget or self.local_len >= self.budget:
            raise ValueError(f"locret stabilizers ({self.stabilizers}) and local_len ({self.local_len}) must be "
                             f"smaller than the budget ({self.budget})")
        if self.heads is not None and not isinstance(self.heads, (str, RetainingHeads)):
            raise ValueError(f"locret heads must be a path to a trained artefact or RetainingHeads, got "
                             f"{type(self.heads).__name__}")

    def observe(self) -> Observe:
        return Observe(inputs=True)

    def retaining_heads(self, cfg=None) -> RetainingHeads:
        if self.heads is None:
            raise ValueError("locret needs trained retaining heads: get_method('locret', heads='runs/locret/ckpt') "
                             "(train them with python -m kvjax.launch --config=configs/locret_train.py)")
        h = load_heads(self.heads) if isinstance(self.heads, str) else self.heads
        if cfg is not None:
            h.check(cfg)
        return h

    def validate(self, ctx: Context) -> None:
        self.retaining_heads(ctx.cfg)

    def _evict(self, state, obs, ctx: Context, protect: int):
        heads = self.retaining_heads(ctx.cfg).params
        return evict_with_scores(heads, state, obs, budget=self.budget, protect=protect, room=ctx.decode_room)

    def chunk(self, state, obs, ctx: Context):
        return self._evict(state, obs, ctx, self.stabilizers)

    def evict_given(self, state, obs, ctx: Context, scores, *, final: bool):
        """The same eviction with externally given new-token scores ``(L, B, Hkv, T)`` instead of the retaining
        heads' (the oracle test feeds the true future attention)."""
        protect = self.local_len if final else self.stabilizers
        return evict_with_scores(None, state, obs, budget=self.budget, protect=protect, room=ctx.decode_room,
                                 new_scores=jnp.asarray(scores))

    def prefill(self, state, obs, ctx: Context):
        return self._evict(state, obs, ctx, self.local_len)


def causal_importance(q: jax.Array, k: jax.Array, q_pos: jax.Array, k_pos: jax.Array, query_mask: jax.Array,
                      num_kv_heads: int, sm_scale: float | None = None) -> jax.Array:
    """Locret's training target: for every key token, the largest attention probability it receives from a query in
    ``query_mask`` (max over those queries and over the query heads of its GQA group).

    ``q`` ``(B, Hq, T, D)`` and ``k`` ``(B, Hkv, T, D)`` after RoPE, ``q_pos``/``k_pos`` ``(B, T)`` (-1 = padding),
    ``query_mask`` ``(B, T)``. Returns ``(B, Hkv, T)``."""
    b, hq, t, d = q.shape
    scale = d ** -0.5 if sm_scale is None else sm_scale
    g = hq // num_kv_heads
    s = jnp.einsum("bhgqd,bhkd->bhgqk", q.reshape(b, num_kv_heads, g, t, d).astype(jnp.float32),
                   k.astype(jnp.float32)) * scale
    vis = (k_pos[:, None, None, None, :] >= 0) & (q_pos[:, None, None, :, None] >= 0) & \
        (k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None])
    s = jnp.where(vis, s, -1e30)
    p = jnp.where(vis, jax.nn.softmax(s, axis=-1), 0.0)
    p = jnp.where(query_mask[:, None, None, :, None], p, 0.0)
    return p.max(axis=(2, 3))


def importance_from_probs(probs: jax.Array, query_mask: jax.Array, num_kv_heads: int) -> jax.Array:
    """:func:`causal_importance` from attention probabilities the model observed: ``probs`` ``(B, Hq, W, S)`` of the
    call's last ``W`` queries (``Observe(window=W)``), ``query_mask`` ``(B, T)`` (its last ``W`` columns are those
    queries; ``S = T``). Returns ``(B, Hkv, S)``."""
    b, hq, w, s = probs.shape
    qm = query_mask[:, -w:][:, None, :, None]
    p = jnp.where(qm, probs.astype(jnp.float32), 0.0).reshape(b, num_kv_heads, hq // num_kv_heads, w, s)
    return p.max(axis=(2, 3))


def oracle_scores(cfg, qkv: jax.Array, pos: jax.Array, query_mask: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """:func:`causal_importance` from a layer's pre-RoPE ``qkv`` ``(B, T, F)`` (RoPE applied at ``pos``)."""
    from kvjax.rope import apply_rope  # noqa: PLC0415

    b, t, _ = qkv.shape
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = qkv[..., : hq * d].reshape(b, t, hq, d)
    k = qkv[..., hq * d: (hq + hkv) * d].reshape(b, t, hkv, d)
    rp = jnp.maximum(pos, 0)
    q = apply_rope(q, rp, inv_freq).transpose(0, 2, 1, 3)
    k = apply_rope(k, rp, inv_freq).transpose(0, 2, 1, 3)
    return causal_importance(q, k, pos, pos, query_mask, hkv)


def smooth_l1(x: jax.Array, y: jax.Array, beta: float = 1.0) -> jax.Array:
    """torch's ``SmoothL1Loss(reduction='none')``."""
    d = jnp.abs(x - y)
    return jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def locret_loss_terms(pred: jax.Array, target: jax.Array, unit_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(smooth-L1 regression, smoothness MSE)`` of one layer: ``pred``/``target`` ``(B, Hkv, T)``, the loss over
    ``unit_mask`` ``(B, T)`` tokens (those before the later queries), smoothness between neighbouring units."""
    m = unit_mask[:, None, :].astype(jnp.float32)
    reg = jnp.sum(smooth_l1(pred, target) * m) / jnp.maximum(jnp.sum(m) * pred.shape[1], 1.0)
    pair = m[..., 1:] * m[..., :-1]
    smooth = jnp.sum(jnp.square(pred[..., 1:] - pred[..., :-1]) * pair) / jnp.maximum(
        jnp.sum(pair) * pred.shape[1], 1.0)
    return reg, smooth


def as_numpy(heads: dict) -> dict:
    return {k: np.asarray(v) for k, v in heads.items()}


"""RazorAttention — "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads", Tang et al.,
arXiv 2407.15891.

Most heads attend locally; a few *retrieval heads* reach across the whole context. RazorAttention keeps the whole
cache of the retrieval heads and, in every other head, only the first ``n_sink`` tokens (attention sinks) and a
local buffer of the most recent ``L = max(min_buffer, N / ratio)`` tokens (``N`` = the prompt's tokens); the dropped
remote tokens of such a head are summarised by one *compensation token* whose key and value are the means of the
dropped keys and values, and which counts as many times in the softmax as tokens it replaces (the paper's
attention with ``l * exp(q k_hat)`` for ``l`` dropped tokens): a weighted slot of the ragged layer
(:class:`kvjax.state.RaggedKV`, ``log_weight = log l``).

Retrieval heads, found the paper's way for RoPE models: a probe of ``probe_len`` random tokens repeated
``probe_repeats`` times runs through the model; for every query of the repeats, a head's *echo score* is the
attention it pays to the earlier occurrences of the query's own token, its *induction score* the attention to the
tokens that followed those occurrences; the top ``induction_frac`` of heads by induction score and the top
``echo_frac`` by echo score (over all heads of all global layers) are retrieval heads. ``heads`` lists them
explicitly instead (``((layer, kv_head), ...)``).

Storage: a :class:`~kvjax.state.RaggedKV` per global layer — retrieval heads hold their whole context, the others
``n_sink + L + 1`` slots, every head followed by ``decode_room`` slots — so ``kvjax.nbytes`` is the bytes of what is
really kept. Decoded tokens are appended to every head (the compression is one-shot after prefill, as in the paper's
long-context evaluation).

Defaults follow the paper: 4 sink tokens, compression ratio ``C = 5`` with threshold ``S0 = 4000`` tokens (so a
prompt shorter than 4000 tokens is not compressed; pass ``min_buffer`` lower for short prompts), 14% induction + 1%
echo heads protected. The authors' code is not public, so the probe's size (``probe_len = 128`` tokens, 4 repeats,
token ids drawn uniformly from the upper 90% of the vocabulary, seed 0) is kvjax's choice. Deviations: with GQA a KV
head's scores are the maximum over its query heads (the cache is per KV head; a KV head serving one retrieval query
head must keep its context); acts on global layers only (sliding-window layers already keep a window); the echo and
induction scores average over all queries of the repeats. ``count_weight=False`` gives the compensation token plain
weight 1 (an ablation; also what a chain with a dense-cache method after Razor needs, since a dense cache cannot hold
weights).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention import Observe
from kvjax.compress.adakv import unify_ragged
from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.compress.evict import compaction_index, gather_layer, gather_obs, map_global_layers
from kvjax.state import DenseKV, ragged_from_dense

_HEAD_CACHE: dict = {}


def probe_tokens(vocab_size: int, length: int, repeats: int, seed: int = 0) -> np.ndarray:
    """The probe: ``length`` random token ids (upper 90% of the vocabulary) repeated ``repeats`` times, ``(1, T)``."""
    rng = np.random.default_rng(seed)
    lo = vocab_size // 10
    return np.tile(rng.integers(lo, vocab_size, size=length), repeats)[None].astype(np.int32)


def echo_induction_scores(probs: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Echo and induction scores ``(Hq,)`` of one layer from the probe's attention ``probs`` ``(Hq, T, T)``.

    For query ``t >= length`` (a repeat), the echo targets are ``t - j * length`` and the induction targets
    ``t - j * length + 1`` for ``j >= 1`` (earlier occurrences of the same token, and their successors)."""
    t = probs.shape[-1]
    q = np.arange(length, t)
    echo = np.zeros(probs.shape[0])
    ind = np.zeros(probs.shape[0])
    for j in range(1, t // length + 1):
        src = q - j * length
        ok = src >= 0
        echo += probs[:, q[ok], src[ok]].sum(axis=-1)
        nxt = src + 1
        ok2 = ok & (nxt < q)
        ind += probs[:, q[ok2], nxt[ok2]].sum(axis=-1)
    return echo / len(q), ind / len(q)


def retrieval_heads(model, params, *, length: int = 128, repeats: int = 4, induction_frac: float = 0.14,
                    echo_frac: float = 0.01, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Bool ``(L, Hkv)`` retrieval heads of ``model`` (global layers only) and the per-KV-head scores."""
    cfg = model.cfg
    key = (cfg, id(params["embed"]), length, repeats, induction_frac, echo_frac, seed)
    if key in _HEAD_CACHE:
        return _HEAD_CACHE[key]
    tokens = jnp.asarray(probe_tokens(cfg.vocab_size, length, repeats, seed))
    t = tokens.shape[1]
    _, _, obs = model.jit_forward(params, tokens, model.init_state(1, t), None, observe=Observe(window=t),
                                  logits="none")
    g = cfg.num_heads // cfg.num_kv_heads
    glob = [i for i in range(cfg.num_layers) if not cfg.layer_window(i)]
    echo = np.full((cfg.num_layers, cfg.num_kv_heads), -np.inf)
    ind = np.full((cfg.num_layers, cfg.num_kv_heads), -np.inf)
    for i in glob:
        e, d = echo_induction_scores(np.asarray(obs[i]["window"][0], np.float64), length)
        echo[i] = e.reshape(cfg.num_kv_heads, g).max(axis=1)
        ind[i] = d.reshape(cfg.num_kv_heads, g).max(axis=1)
    n = len(glob) * cfg.num_kv_heads
    mask = np.zeros(echo.shape, bool)
    for score, frac in ((ind, induction_frac), (echo, echo_frac)):
        k = max(1, math.ceil(frac * n)) if frac > 0 else 0
        if k:
            top = np.argsort(-score, axis=None, kind="stable")[:k]
            mask.flat[top] = True
    out = (mask, dict(echo=echo, induction=ind))
    _HEAD_CACHE[key] = out
    return out


@functools.partial(jax.jit, static_argnames=("n_sink", "min_buffer", "ratio", "size"))
def _razor_layer(layer: DenseKV, obs: dict, next_pos, retrieval, *, n_sink: int, min_buffer: int, ratio: float,
                 size: int):
    """Keeps every valid token of the retrieval heads (``retrieval`` ``(Hkv,)`` bool) and sinks + local buffer of the
    others, compacted into ``size`` slots, with a compensation token (mean of the dropped keys/values) written after
    the kept tokens of each head that dropped any. Returns ``(dense, obs, n_dropped (B, H))``."""
    valid = layer.valid
    n_tok = next_pos.astype(jnp.float32)  # real prompt tokens per row
    buf = jnp.maximum(min_buffer, jnp.floor(n_tok / ratio)).astype(jnp.int32)  # (B,)
    local = (layer.pos < n_sink) | (layer.pos >= next_pos[:, None, None] - buf[:, None, None])
    keep = valid & (retrieval[None, :, None] | local)
    drop = valid & ~keep
    cnt = jnp.sum(drop, axis=-1)  # (B, H)
    w = drop.astype(jnp.float32)[..., None]
    den = jnp.maximum(cnt, 1).astype(jnp.float32)[..., None]
    k_hat = (jnp.sum(w * layer.k.astype(jnp.float32), axis=2) / den).astype(layer.k.dtype)
    v_hat = (jnp.sum(w * layer.v.astype(jnp.float32), axis=2) / den).astype(layer.v.dtype)
    p_hat = jnp.max(jnp.where(drop, layer.pos, -1), axis=-1)  # the last dropped position: visible after it
    idx, kept = compaction_index(keep, size)
    dense = gather_layer(layer, idx, kept, 1)
    obs = gather_obs(obs, idx, kept, 1)
    slot = jnp.where(cnt > 0, dense.fill, size + 1)[..., None]  # right after the kept tokens (else dropped)
    put = jax.vmap(jax.vmap(lambda buf_, i, x: buf_.at[i].set(x, mode="drop")))
    dense = dense.replace(k=put(dense.k, slot, k_hat[:, :, None]), v=put(dense.v, slot, v_hat[:, :, None]),
                          pos=put(dense.pos, slot, p_hat[:, :, None]), fill=dense.fill + (cnt > 0))
    return dense, obs, cnt


@register
@dataclasses.dataclass(frozen=True)
class RazorAttention(Method):
    """Full cache for retrieval heads, sinks + local buffer + compensation token for the others (see module
    docstring)."""

    n_sink: int = 4
    ratio: float = 5.0  # compression ratio C: the local buffer holds N / C tokens...
    min_buffer: int = 4000  # ...but at least S0 tokens
    induction_frac: float = 0.14
    echo_frac: float = 0.01
    probe_len: int = 128
    probe_repeats: int = 4
    count_weight: bool = True  # the compensation token counts as the number of tokens it replaces
    heads: tuple = ()  # explicit retrieval heads ((layer, kv_head), ...); () = found with the probe
    name: ClassVar[str] = "razor"
    kind: ClassVar[str] = "ragged"
    family: ClassVar[str] = "eviction"
    jittable: ClassVar[bool] = False  # retrieval heads and ragged sizes are found on the host

    def __post_init__(self):
        check_positive("n_sink", self.n_sink, allow_zero=True)
        check_positive("min_buffer", self.min_buffer, allow_zero=True)
        check_positive("probe_len", self.probe_len)
        if self.ratio < 1:
            raise ValueError(f"razor ratio (compression ratio C) must be >= 1, got {self.ratio}")
        if self.probe_repeats < 2:
            raise ValueError(f"razor probe_repeats must be >= 2 (echo/induction need a repeat), got "
                             f"{self.probe_repeats}")
        for name in ("induction_frac", "echo_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"razor {name} must be in [0, 1], got {getattr(self, name)}")
        for h in self.heads:
            if not (isinstance(h, tuple) and len(h) == 2 and all(isinstance(x, int) and x >= 0 for x in h)):
                raise ValueError(f"razor heads must be (layer, kv_head) pairs of non-negative ints, got {h!r}")

    def retrieval_mask(self, ctx: Context) -> np.ndarray:
        cfg = ctx.cfg
        if self.heads:
            mask = np.zeros((cfg.num_layers, cfg.num_kv_heads), bool)
            for layer, head in self.heads:
                if layer >= cfg.num_layers or head >= cfg.num_kv_heads:
                    raise ValueError(f"razor head {(layer, head)} is outside the model's {cfg.num_layers} layers x "
                                     f"{cfg.num_kv_heads} KV heads")
                mask[layer, head] = True
            return mask
        if ctx.params is None:
            raise ValueError("razor needs the model params (ctx.params) to find retrieval heads with its probe, or "
                             "an explicit heads=((layer, kv_head), ...)")
        from kvjax.model import Model  # noqa: PLC0415

        return retrieval_heads(Model(cfg), ctx.params, length=self.probe_len, repeats=self.probe_repeats,
                               induction_frac=self.induction_frac, echo_frac=self.echo_frac)[0]

    def validate(self, ctx: Context) -> None:
        if self.heads:
            self.retrieval_mask(ctx)

    def prefill(self, state, obs, ctx: Context):
        mask = self.retrieval_mask(ctx)
        n = np.asarray(state.next_pos)

        def one(i, layer, o):
            ret = mask[i]
            buf = np.maximum(self.min_buffer, np.floor(n / self.ratio)).astype(int)
            local = int(min(layer.capacity, self.n_sink + buf.max()))
            size = layer.capacity if ret.any() else local
            dense, o, cnt = _razor_layer(layer, o, state.next_pos, jnp.asarray(ret), n_sink=self.n_sink,
                                         min_buffer=self.min_buffer, ratio=float(self.ratio), size=size)
            rag = ragged_from_dense(dense, ctx.decode_room)
            if self.count_weight:
                has = cnt > 0
                rag = rag.replace(weight_slot=jnp.where(has, rag.starts + dense.fill - 1, -1).astype(jnp.int32),
                                  log_weight=jnp.where(has, jnp.log(jnp.maximum(cnt, 1)), 0.0).astype(jnp.float32))
            return rag, o

        state, obs = map_global_layers(state, obs, one, per_layer=True)
        return unify_ragged(state, obs)

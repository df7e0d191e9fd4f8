"""Attention over the KV cache, with the observations compression methods need.

The reference path is plain jnp, blockwise over queries so that long prefills never hold a ``(T, C)`` score matrix
for all queries at once. :func:`attend` is the single entry point the models call; it can route to the Pallas kernels
of ``pallas_kernels`` (``impl="pallas"``) or use the jnp reference (``impl="reference"``, the default on CPU).

Observations (``Observe``) are returned per layer as a dict:

* ``"colsum"`` ``(B, Hq, S)``: attention probability each key slot received, summed over the call's valid queries
  (what H2O / Scissorhands / CAKE accumulate);
* ``"window"`` ``(B, Hq, W, S)``: the probabilities of the call's last ``W`` queries (SnapKV's observation window);
* ``"window_q"`` ``(B, Hq, W, D)``: those queries themselves, post-RoPE (ThinK scores key channels with them);
* ``"qkv"`` ``(B, T, (Hq + 2 Hkv) D)``: the call's queries, keys and values before RoPE, concatenated per token
  (``Observe(inputs=True)``; the input of Locret's retaining heads). Added by the model's attention block.
* ``"q_absmax"`` ``(B, Hq, D)``: per channel, the largest ``|q|`` over the call's valid (post-RoPE) queries (MiKV);
* ``"massive_pos"`` ``(B, n)``: original positions of the tokens holding the ``n`` largest ``|h|`` entries of the
  layer's input hidden state (RotateKV's massive-activation sinks; repeats when one token holds several entries).
  These two are computed by the model (``kvjax.models.llama``), not by the attention.
* ``"queries"`` ``(B, Hq, T, D)`` and ``"queries_pos"`` ``(B, T)``: all the call's queries, post-RoPE and multiplied
  by the softmax scale (so ``queries @ k.T`` are the attention logits), and their positions (``-1`` = padding). A
  method that needs a function of every query's attention other than the plain column sums (Keyformer's
  Gumbel-softmax scores) recomputes it from these, blockwise (:func:`blockwise_over_queries`), instead of asking for
  a ``(T, S)`` matrix per layer. Costs ``Hq / (2 Hkv)`` times the layer's float KV bytes while the observations live.

``S`` is the key axis the call attended over: the cache slots (after the new tokens were written).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class Observe:
    """Which observations a forward pass returns (static)."""

    window: int = 0  # last-W-query probabilities and queries; 0 = none
    colsum: bool = False  # accumulated attention per key slot
    inputs: bool = False  # the layer's attention inputs: pre-RoPE q, k, v of the call's tokens (Locret's heads)
    qmax: bool = False  # per-channel max |q| over all the call's queries (MiKV's balancer)
    massive: int = 0  # tokens holding the top-n |hidden state| entries at the layer input (RotateKV's sinks)
    queries: bool = False  # every query (scaled) and its position

    def __bool__(self) -> bool:
        return bool(self.window or self.colsum or self.inputs or self.qmax or self.massive or self.queries)


def visibility(q_pos: jax.Array, k_pos: jax.Array, window: int = 0) -> jax.Array:
    """Mask ``(B, Hkv, Tq, S)``: key slot visible to query. ``q_pos`` ``(B, Tq)``, ``k_pos`` ``(B, Hkv, S)``."""
    qp = q_pos[:, None, :, None]
    kp = k_pos[:, :, None, :]
    vis = (kp >= 0) & (qp >= 0) & (kp <= qp)
    if window:
        vis &= (qp - kp) < window
    return vis


def _scores(q, k, q_pos, k_pos, sm_scale, window, softcap, bias=None):
    """q ``(B, Hkv, G, T, D)``, k ``(B, Hkv, S, D)`` → masked f32 logits ``(B, Hkv, G, T, S)`` and mask."""
    s = jnp.einsum("bhgtd,bhsd->bhgts", q.astype(jnp.float32), k.astype(jnp.float32)) * sm_scale
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    if bias is not None:
        s = s + bias[:, :, None, None, :].astype(jnp.float32)
    vis = visibility(q_pos, k_pos, window)[:, :, None]
    return jnp.where(vis, s, NEG_INF), vis


def _probs(s, vis):
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(vis, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom > 0, denom, 1.0)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
                        sm_scale: float | None = None, window: int = 0, softcap: float = 0.0,
                        observe: Observe = Observe(), q_block: int = 512, bias: jax.Array | None = None
                        ) -> tuple[jax.Array, dict]:
    """Masked GQA attention in plain jnp.

    ``q`` ``(B, Hq, T, D)``, ``k``/``v`` ``(B, Hkv, S, D)``, ``q_pos`` ``(B, T)``, ``k_pos`` ``(B, Hkv, S)``.
    ``bias`` ``(B, Hkv, S)``: optional log-multiplicity added to a slot's logits (a slot standing for ``n`` tokens,
    like RazorAttention's compensation token, counts ``n`` times in the softmax with ``bias = log n``).
    Returns ``(out (B, Hq, T, Dv), observations)``; queries with no visible key give zeros.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = d ** -0.5 if sm_scale is None else sm_scale
    qg = q.reshape(b, hkv, g, t, d)

    def block(args):
        qb, qpb = args
        s, vis = _scores(qb, k, qpb, k_pos, scale, window, softcap, bias)
        p = _probs(s, vis)
        o = jnp.einsum("bhgts,bhsd->bhgtd", p, v.astype(jnp.float32))
        return o, jnp.sum(p, axis=3)

    if t <= q_block:
        out, colsum = block((qg, q_pos))
    else:
        nb = math.ceil(t / q_block)
        pad = nb * q_block - t
        qp = jnp.pad(qg, ((0, 0),) * 3 + ((0, pad), (0, 0)))
        pp = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1)
        qs = qp.reshape(b, hkv, g, nb, q_block, d).transpose(3, 0, 1, 2, 4, 5)
        ps = pp.reshape(b, nb, q_block).transpose(1, 0, 2)
        outs, cols = jax.lax.map(block, (qs, ps))
        out = outs.transpose(1, 2, 3, 0, 4, 5).reshape(b, hkv, g, nb * q_block, -1)[:, :, :, :t]
        colsum = jnp.sum(cols, axis=0)
    obs = {}
    if observe.colsum:
        obs["colsum"] = colsum.reshape(b, hq, -1)
    if observe.window:
        w = min(observe.window, t)
        s, vis = _scores(qg[:, :, :, t - w:], k, q_pos[:, t - w:], k_pos, scale, window, softcap, bias)
        obs["window"] = _probs(s, vis).reshape(b, hq, w, -1)
        obs["window_q"] = q[:, :, t - w:]
    if observe.queries:
        if softcap:
            raise ValueError("the queries observation does not support attention logit soft-capping")
        obs["queries"] = (q.astype(jnp.float32) * scale).astype(q.dtype)
        obs["queries_pos"] = q_pos
    return out.reshape(b, hq, t, -1).astype(q.dtype), obs


def attend(q: jax.Array, layer, q_pos: jax.Array, *, sm_scale: float | None = None, softcap: float = 0.0,
           observe: Observe = Observe(), impl: str = "reference", extra_kv=None) -> tuple[jax.Array, dict]:
    """Attention of ``q`` ``(B, Hq, T, D)`` at positions ``q_pos`` over a layer cache.

    ``layer`` is any cache class with ``dense()`` and ``pos`` (and optionally its own ``attend`` method, which
    quantized caches provide to avoid dequantizing into a float copy). ``extra_kv = (k, v, pos)`` appends keys that
    are not (yet) in the cache, e.g. a chunk whose tokens a ring buffer cannot hold.
    """
    if hasattr(layer, "attend") and extra_kv is None:
        return layer.attend(q, q_pos, sm_scale=sm_scale, softcap=softcap, observe=observe, impl=impl)
    k, v = layer.dense()
    k_pos = layer.pos
    if extra_kv is not None:
        ek, ev, ep = extra_kv
        k = jnp.concatenate([k, ek.astype(k.dtype)], axis=2)
        v = jnp.concatenate([v, ev.astype(v.dtype)], axis=2)
        k_pos = jnp.concatenate([k_pos, ep], axis=2)
    if impl == "pallas" and not observe and q.shape[2] <= 16:
        from kvjax.sharding import current_kernel_mesh  # noqa: PLC0415

        mesh = current_kernel_mesh()
        if mesh is not None:  # a sharded model: one kernel per shard, split-K across sequence shards
            from pallas_kernels.sharded import sharded_decode_attention  # noqa: PLC0415

            out = sharded_decode_attention(q, k, v, k_pos, q_pos, mesh=mesh, sm_scale=sm_scale, window=layer.window,
                                           logit_softcap=softcap)
            return out, {}
        from pallas_kernels.decode_attention import decode_attention  # noqa: PLC0415

        out = decode_attention(q, k, v, k_pos, q_pos, sm_scale=sm_scale, window=layer.window, logit_softcap=softcap)
        return out, {}
    if impl not in ("reference", "pallas"):
        raise ValueError(f"unknown attention impl {impl!r}; choose 'reference' or 'pallas'")
    return reference_attention(q, k, v, q_pos, k_pos, sm_scale=sm_scale, window=layer.window, softcap=softcap,
                               observe=observe)


def blockwise_over_queries(fn, queries: jax.Array, q_pos: jax.Array, init, q_block: int = 256):
    """Folds ``fn(acc, q_block (B, Hq, tb, D), q_pos_block (B, tb)) -> acc`` over blocks of ``q_block`` queries (a
    ``lax.scan``; padded queries get position ``-1``), so that a per-query statistic never holds all ``T`` rows."""
    b, hq, t, d = queries.shape
    nb = math.ceil(t / q_block)
    pad = nb * q_block - t
    qs = jnp.pad(queries, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, hq, nb, q_block, d).transpose(2, 0, 1, 3, 4)
    ps = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1).reshape(b, nb, q_block).transpose(1, 0, 2)
    acc, _ = jax.lax.scan(lambda a, x: (fn(a, *x), None), init, (qs, ps))
    return acc


def restrict_observations(obs: tuple[dict, ...], observe: Observe) -> tuple[dict, ...]:
    """Observations computed for a union of needs, cut down to what ``observe`` asks for.

    Lets one prefill serve several methods (the harness prefills each prompt once and compresses it many ways):
    the observation window is the union's last ``observe.window`` queries, and unrequested entries are dropped.
    """
    out = []
    for o in obs:
        r = {}
        if observe.colsum and "colsum" in o:
            r["colsum"] = o["colsum"]
        if observe.inputs and "qkv" in o:
            r["qkv"] = o["qkv"]
        if observe.window and "window" in o:
            # (A prompt shorter than the window gives fewer rows; slicing then keeps them all.)
            r["window"] = o["window"][:, :, -observe.window:]
            r["window_q"] = o["window_q"][:, :, -observe.window:]
        if observe.qmax and "q_absmax" in o:
            r["q_absmax"] = o["q_absmax"]
        if observe.massive and "massive_pos" in o:
            r["massive_pos"] = o["massive_pos"][:, :observe.massive]  # sorted by magnitude: a prefix is the top-n
        if observe.queries and "queries" in o:
            r["queries"], r["queries_pos"] = o["queries"], o["queries_pos"]
        out.append(r)
    return tuple(out)

"""The decode-attention kernel run per shard of a device mesh (``jax.shard_map``), split-K across devices.

A cache sharded by :mod:`kvjax.sharding` has its batch over ``data``, KV heads over ``model`` and (optionally) its
slots over ``sequence``. Each device runs :func:`decode_attention_partials` — the kernel of
:mod:`pallas_kernels.decode_attention` on its own block of heads and slots — which returns the un-normalised
online-softmax partials ``(m, l, acc)`` of its slots. The shards of one sequence then combine them the way
flash-decoding combines the splits of one device (log-sum-exp): ``m* = pmax(m)``, ``l* = psum(exp(m - m*) l)``,
``acc* = psum(exp(m - m*) acc)``, ``out = acc* / l*``. Only ``(m, l, acc)`` (a few floats per query row) cross
devices, never keys or values; this is the cross-device split-K of Lean Attention / flash-decoding. Heads never
communicate (GQA groups stay on one device).

Per-head ``lengths`` (leading slots that may hold data) are global; each sequence shard clips them to its own
slot range, so blocks past a head's fill are skipped on every shard.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from pallas_kernels import _common as cm
from pallas_kernels import _flash
from pallas_kernels.decode_attention import check_dense_cache


def decode_attention_partials(q, k, v, pos, q_pos, *, lengths=None, sm_scale=None, window: int = 0,
                              logit_softcap: float = 0.0, block_k=None, num_splits=None, interpret=None,
                              strategy=None, backend=None):
    """Like :func:`pallas_kernels.decode_attention` but returns the partials of this cache block:
    ``m``, ``l`` ``(B, Hkv, G, Tq, 1)`` (row max of the logits, sum of ``exp(s - m)``) and ``acc``
    ``(B, Hkv, G, Tq, Dv)`` (sum of ``exp(s - m) v``), all f32, with the kernel's splits already merged."""
    b, hkv, c, dv = check_dense_cache(q, k, v, pos)
    g, scale = cm.check_common(q, q_pos, b=b, hkv=hkv, lengths=lengths, sm_scale=sm_scale, window=window,
                               logit_softcap=logit_softcap)
    interp = cm.resolve_interpret(interpret)
    plat = cm.platform(interp, backend)
    strat = cm.resolve_strategy(strategy, plat)
    cm.check_head_dims(plat, head_dim=q.shape[3], v_head_dim=dv)
    bk = cm.choose_block_k(block_k, c, plat)
    ns, nbs = cm.split_plan(cm.cdiv(c, bk), num_splits, b, hkv, plat)
    tq = q.shape[2]
    gp = cm.gpu_heads(g, plat)
    bq = _flash.decode_block_q(tq, gp, plat)
    q5, qpos4 = _flash.prepare_queries(q, q_pos, hkv, bq, gp)
    lens = _flash.resolve_lengths(lengths, b, hkv, c)
    m, l, acc = _flash.flash_partials(
        q5, qpos4, pos.astype(jnp.int32), lens, [(k, 1), (v, 1)], _flash.cast_kv(q.dtype),
        block_k=bk, block_q=bq, num_splits=ns, blocks_per_split=nbs, dv=dv, sm_scale=scale,
        softcap=float(logit_softcap), window=int(window), plat=plat, strategy=strat, interpret=interp)
    m_max = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - m_max)
    l_tot = jnp.sum(w * l, axis=2)
    acc_tot = jnp.sum(w * acc, axis=2)
    return m_max[:, :, 0, :g, :tq], l_tot[:, :, :g, :tq], acc_tot[:, :, :g, :tq]


def combine_across(m, l, acc, axis_name):
    """Log-sum-exp merge of partials held by the devices of mesh axis ``axis_name`` (inside ``shard_map``)."""
    m_all = lax.pmax(m, axis_name)
    w = jnp.exp(m - m_all)
    l_all = lax.psum(w * l, axis_name)
    acc_all = lax.psum(w * acc, axis_name)
    return jnp.where(l_all > 0, acc_all / jnp.where(l_all > 0, l_all, 1.0), 0.0)


def sharded_decode_attention(q, k, v, pos, q_pos, *, mesh, lengths=None, sm_scale=None, window: int = 0,
                             logit_softcap: float = 0.0, block_k=None, num_splits=None, interpret=None,
                             strategy=None, backend=None, seq_sharded: bool | None = None):
    """:func:`pallas_kernels.decode_attention` over a cache sharded on ``mesh`` (axes ``data``, ``model``,
    ``sequence``): per-shard kernels under ``jax.shard_map`` and a cross-device split-K merge over ``sequence``.

    ``seq_sharded``: whether the slot axis is split over ``sequence`` (default: when the mesh has a sequence axis
    of size > 1 that divides the capacity; otherwise every sequence device holds all slots and computes the same).
    Same arguments and result as :func:`pallas_kernels.decode_attention`.
    """
    b, hkv, c, dv = check_dense_cache(q, k, v, pos)
    n_seq = int(mesh.shape.get("sequence", 1))
    if seq_sharded is None:
        seq_sharded = n_seq > 1 and c % n_seq == 0
    seq = "sequence" if seq_sharded else None
    c_local = c // n_seq if seq_sharded else c
    kw = dict(sm_scale=sm_scale, window=window, logit_softcap=logit_softcap, block_k=block_k, num_splits=num_splits,
              interpret=interpret, strategy=strategy, backend=backend)
    have_len = lengths is not None
    if not have_len:
        lengths = jnp.full((b, hkv), c, jnp.int32)

    def local(q_, k_, v_, pos_, qpos_, len_):
        if seq_sharded:
            start = lax.axis_index("sequence") * c_local
            len_ = jnp.clip(len_ - start, 0, c_local)
        m, l, acc = decode_attention_partials(q_, k_, v_, pos_, qpos_, lengths=len_, **kw)
        if seq_sharded:
            out = combine_across(m, l, acc, "sequence")
        else:
            out = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)
        bl, hl, g, tq, _ = out.shape
        return out.reshape(bl, hl * g, tq, dv).astype(q_.dtype)

    kv_spec = P("data", "model", seq, None)
    fn = jax.shard_map(local, mesh=mesh, check_vma=False,
                       in_specs=(P("data", "model", None, None), kv_spec, kv_spec, P("data", "model", seq),
                                 P("data", None), P("data", "model")),
                       out_specs=P("data", "model", None, None))
    return fn(q, k, v, pos, q_pos, lengths.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("mesh", "sm_scale", "window", "logit_softcap", "block_k", "num_splits",
                                             "interpret", "strategy", "backend", "seq_sharded"))
def jit_sharded_decode_attention(q, k, v, pos, q_pos, *, mesh, lengths=None, sm_scale=None, window: int = 0,
                                 logit_softcap: float = 0.0, block_k=None, num_splits=None, interpret=None,
                                 strategy=None, backend=None, seq_sharded=None):
    """Jitted :func:`sharded_decode_attention` (all keyword options static)."""
    return sharded_decode_attention(q, k, v, pos, q_pos, mesh=mesh, lengths=lengths, sm_scale=sm_scale,
                                    window=window, logit_softcap=logit_softcap, block_k=block_k,
                                    num_splits=num_splits, interpret=interpret, strategy=strategy, backend=backend,
                                    seq_sharded=seq_sharded)

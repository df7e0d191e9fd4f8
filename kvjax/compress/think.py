"""ThinK — "ThinK: Thinner Key Cache by Query-Driven Pruning", Xu et al., arXiv 2407.21018.

Key caches have a few dominant channels; ThinK prunes, per KV head, the key channels that contribute least to the
attention logits of the observation window's queries. The paper's score of channel ``j`` is
``||Q_w[:, j] K[:, j]^T||_F`` (``Q_w``: the last ``window`` queries), which for a rank-one outer product equals
``||Q_w[:, j]|| * ||K[:, j]||``; the authors' code ranks by ``mean_t Q_w[t, j]^2 * mean_s K[s, j]^2`` (the same
order). The ``floor(ratio * D)`` lowest-scoring channels are dropped: the prompt's keys are stored with
``D - floor(ratio * D)`` channels (:class:`ChannelPrunedKV`, plus the kept channel indices), and queries are gathered
to the same channels when they attend to them, so ``q . k`` is computed on the kept dims only. Values are untouched.
As in the authors' code, the most recent ``recent`` prompt tokens and every decoded token keep full keys (a small
full-dimension part the decode writes into).

ThinK composes with token eviction (the paper's main setting: SnapKV or H2O first, then channel pruning):
``chain(get_method("snapkv", budget=256), get_method("think"))``. Its layers are their own class (``kind =
"channel"``), so methods that need dense caches must come before it.

Defaults follow the authors' code (SalesforceAIResearch/ThinK, ``kv_pruning_utils.py``): pruning ratio 0.4, the last
32 queries score the channels, 32 recent tokens unpruned. Deviations: with GQA the query term sums the squared query
norms of the query heads that share a KV head (the authors' code targets MHA models); the key term averages over the
valid slots only (padding and evicted slots excluded); acts on global layers only; the reference path computes the
attention by zero-filling the pruned channels of the keys on the fly (equal to attention on the kept dims; nothing
is stored); ``impl="pallas"`` uses that same reference path (no channel-gathering kernel). kvjax's H2O evicts during
decoding and so cannot run before ThinK in a chain (the authors' H2O variant evicts the prompt once).

Quantization: a quantizer after ThinK (``chain(snapkv, think, int8)``) quantizes both parts as it stores a dense layer:
the pruned keys with their ``D'`` kept channels, the values, and the full-dimension recent part (its decode room
included); the kept-channel indices stay uint8. The authors combine ThinK with KIVI; with kvjax's KIVI the kept width
must fit its packing (2-bit codes: a multiple of 4 channels; SmolLM2's ``64 - floor(0.4 * 64) = 39`` does not), so
int8 / int4 (per token) are the quantizers that fit every width.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.attention import Observe, reference_attention
from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.compress.evict import compaction_index, gather_layer, gather_obs, map_global_layers
from kvjax.state import DenseKV

Array = jax.Array


@struct.dataclass
class ChannelPrunedKV:
    """A layer whose older keys keep only some channels (ThinK).

    ``pruned``: a :class:`DenseKV` whose keys are ``(B, H, Cp, Dk')`` (the kept channels, in increasing channel order)
    and values ``(B, H, Cp, Dv)``; ``recent``: a :class:`DenseKV` of full-dimension keys (the most recent prompt tokens
    and every decoded token; new tokens are appended there); ``channels`` ``(B, H, Dk')`` the kept channel indices
    (uint8 for head dims up to 256). Slot order is ``[pruned | recent]`` (observations follow it).
    ``kvjax.nbytes`` counts exactly these arrays: ``Dk'`` channels per pruned key.
    """

    pruned: DenseKV
    recent: DenseKV
    channels: Array
    window: int = struct.field(pytree_node=False, default=0)
    ring_start = -1

    @property
    def pos(self) -> Array:
        return jnp.concatenate([self.pruned.pos, self.recent.pos], axis=2)

    @property
    def valid(self) -> Array:
        return self.pos >= 0

    @property
    def num_pruned(self) -> int:
        """Slots of the pruned part (its ``pos`` order; a quantized pruned part has as many as its positions)."""
        return self.pruned.pos.shape[2]

    @property
    def capacity(self) -> int:
        return self.num_pruned + self.recent.capacity

    @property
    def fill(self) -> Array:
        """Slots used: the whole pruned part plus the recent part's fill (new tokens go to the recent part)."""
        return self.num_pruned + self.recent.fill

    @property
    def head_dim(self) -> int:
        return self.recent.k.shape[-1] if isinstance(self.recent, DenseKV) else self.recent.head_dim

    def full_keys(self) -> Array:
        """Pruned keys zero-filled back to ``D`` channels ``(B, H, Cp, D)`` (``q . k`` then equals the dot product on
        the kept channels)."""
        kp = self.pruned.dense()[0]
        b, h, cp, dk = kp.shape
        ch = jnp.broadcast_to(self.channels.astype(jnp.int32)[:, :, None, :], (b, h, cp, dk))
        zeros = jnp.zeros((b, h, cp, self.head_dim), kp.dtype)
        return jnp.put_along_axis(zeros, ch, kp, axis=-1, inplace=False)

    def dense(self) -> tuple[Array, Array]:
        """Keys (pruned channels zero) and values in slot order ``[pruned | recent]``."""
        kr, vr = self.recent.dense()
        kp = self.full_keys()
        vp = self.pruned.dense()[1]
        return (jnp.concatenate([kp, kr.astype(kp.dtype)], axis=2),
                jnp.concatenate([vp, vr.astype(vp.dtype)], axis=2))

    def quantized(self, spec) -> "ChannelPrunedKV":
        """This layer with both parts quantized by ``spec`` (a quantizer after ThinK in a chain), each the way the
        quantizer stores a dense layer that holds its decode room: the pruned part's keys with their ``D'`` kept
        channels (the width must fit the quantizer's packing and groups: int8 fits any), its values, and the recent
        part. The kept-channel indices stay as they are."""
        from kvjax.quant.cache import quantize_sub_cache  # noqa: PLC0415

        try:
            pruned = quantize_sub_cache(self.pruned, spec) if isinstance(self.pruned, DenseKV) else self.pruned
        except ValueError as e:
            raise ValueError(f"cannot quantize ThinK's pruned keys ({self.pruned.k.shape[-1]} kept channels) with "
                             f"{spec.bits}-bit codes in groups of {spec.k_group}: {e}") from None
        recent = quantize_sub_cache(self.recent, spec) if isinstance(self.recent, DenseKV) else self.recent
        return self.replace(pruned=pruned, recent=recent)

    def append(self, k: Array, v: Array, pos: Array) -> "ChannelPrunedKV":
        return self.replace(recent=self.recent.append(k, v, pos))

    def attend(self, q: Array, q_pos: Array, *, sm_scale: float | None = None, softcap: float = 0.0,
               observe: Observe = Observe(), impl: str = "reference") -> tuple[Array, dict]:
        if impl not in ("reference", "pallas"):
            raise ValueError(f"unknown attention impl {impl!r}; choose 'reference' or 'pallas'")
        k, v = self.dense()
        return reference_attention(q, k, v, q_pos, self.pos, sm_scale=sm_scale, window=self.window, softcap=softcap,
                                   observe=observe)


def channel_scores(window_q: Array, layer: DenseKV) -> Array:
    """``(B, Hkv, D)`` ThinK channel scores: ``sum_group mean_t q[t, j]^2`` times ``mean_valid k[s, j]^2``."""
    b, hq, w, d = window_q.shape
    hkv = layer.k.shape[1]
    qn = jnp.mean(window_q.astype(jnp.float32) ** 2, axis=2).reshape(b, hkv, hq // hkv, d).sum(axis=2)
    valid = layer.valid[..., None]
    kn = jnp.sum(jnp.where(valid, layer.k.astype(jnp.float32) ** 2, 0.0), axis=2) / jnp.maximum(
        jnp.sum(valid, axis=2), 1)
    return qn * kn


@functools.partial(jax.jit, static_argnames=("n_keep", "recent", "size_p", "size_r", "room"))
def _think_layer(layer: DenseKV, obs: dict, next_pos, *, n_keep: int, recent: int, size_p: int, size_r: int,
                 room: int):
    score = channel_scores(obs["window_q"], layer)
    ch = jnp.sort(jax.lax.top_k(score, n_keep)[1], axis=-1)  # (B, H, Dk') kept channels
    is_recent = layer.valid & (layer.pos >= next_pos[:, None, None] - recent)
    ip, kp = compaction_index(layer.valid & ~is_recent, size_p)
    ir, kr = compaction_index(is_recent, size_r)
    pruned = gather_layer(layer, ip, kp)
    k_small = jnp.take_along_axis(pruned.k, jnp.broadcast_to(ch[:, :, None, :], pruned.k.shape[:3] + (n_keep,)),
                                  axis=-1)
    pruned = DenseKV(k=k_small, v=pruned.v, pos=pruned.pos, fill=pruned.fill, window=layer.window)
    rec = gather_layer(layer, ir, kr, room)
    rec = DenseKV(k=rec.k, v=rec.v, pos=rec.pos, fill=rec.fill, window=layer.window)
    dt = jnp.uint8 if layer.k.shape[-1] <= 256 else jnp.int16
    out = ChannelPrunedKV(pruned=pruned, recent=rec, channels=ch.astype(dt), window=layer.window)
    o = gather_obs(obs, jnp.concatenate([ip, ir], -1), jnp.concatenate([kp, kr], -1), room)
    return out, o


@register
@dataclasses.dataclass(frozen=True)
class ThinK(Method):
    """Query-driven key-channel pruning of the prompt's cache (see module docstring)."""

    ratio: float = 0.4  # fraction of key channels pruned per head
    window: int = 32  # observation-window queries that score the channels
    recent: int = 32  # most recent prompt tokens kept with full keys
    name: ClassVar[str] = "think"
    kind: ClassVar[str] = "channel"
    jittable: ClassVar[bool] = False  # exact per-layer sizes found on the host

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"think ratio (fraction of key channels pruned) must be in [0, 1), got {self.ratio}")
        check_positive("window", self.window)
        check_positive("recent", self.recent, allow_zero=True)

    def observe(self) -> Observe:
        return Observe(window=self.window)

    def prefill(self, state, obs, ctx: Context):
        n_next = np.asarray(state.next_pos)

        def one(i, layer, o):
            if not isinstance(layer, DenseKV):
                raise ValueError(f"think needs dense layers, got a {type(layer).__name__} in layer {i}")
            d = layer.k.shape[-1]
            n_keep = d - int(np.floor(self.ratio * d))
            pos = np.asarray(layer.pos)
            rec = (pos >= 0) & (pos >= n_next[:, None, None] - self.recent)
            old = (pos >= 0) & ~rec
            size_p = max(1, int(old.sum(-1).max()))
            size_r = max(1, int(rec.sum(-1).max()))
            return _think_layer(layer, o, state.next_pos, n_keep=n_keep, recent=self.recent, size_p=size_p,
                                size_r=size_r, room=ctx.decode_room)

        return map_global_layers(state, obs, one, per_layer=True)

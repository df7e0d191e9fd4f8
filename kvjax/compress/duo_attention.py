"""DuoAttention — "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads", Xiao et al.,
arXiv 2410.10819.

Every KV head gets a gate ``alpha`` in [0, 1]. Training (:mod:`kvjax.train.duo`) mixes, per head, full attention and
streaming attention (attention sinks + a recent window): ``alpha * full + (1 - alpha) * streaming``, and optimises
the gates with the backbone frozen to match the full model's last hidden states on the answers of synthetic passkey
data (the paper's distillation loss) plus an L1 penalty on the gates. Deployment thresholds the gates at a target
``sparsity`` (the fraction of heads made streaming: the lowest gates over all layers, the authors'
``np.quantile``) or at ``threshold``; retrieval heads keep the whole cache, streaming heads only ``n_sink`` sinks and
the ``recent`` most recent tokens.

Storage (:class:`DuoKV`, one per global layer): the retrieval heads' cache is a plain :class:`~kvjax.state.DenseKV`
holding every token; the streaming heads' cache is a separate ring buffer of ``n_sink + recent`` slots (sinks never
overwritten, the window wraps), so their bytes really shrink: nothing is a masked copy of a full cache. Positions
are the original ones (DuoAttention applies RoPE before caching, like kvjax), so with every gate at 0 the cache is
exactly StreamingLLM with ``reposition=False``; with every gate at 1 it is the full cache.

Defaults are the authors' (``duo_attn/utils.py``: 64 sinks, 256 recent tokens, threshold 0.5; the gate files
of ``attn_patterns/`` are trained with lr 0.02, L1 weight 0.05). Deviations: the prompt is prefilled with full
attention in every head and then compressed (the paper runs streaming heads with a streaming mask during a chunked
prefill too, which saves prefill compute; the cache left afterwards is the same); the decode phase is a no-op so
that evaluations feed tokens through the streaming rings one at a time. Per-head ragged storage
(``kvjax.state.RaggedKV``) landed after this was written; it gives every head a growing segment, not a ring that
keeps a streaming head at ``n_sink + recent`` tokens while decoding, hence the two dense caches per layer (moving the
retrieval part onto RaggedKV would also allow per-row raggedness). Acts on global layers only.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.attention import Observe, reference_attention
from kvjax.compress.base import Context, Method, check_positive, register
from kvjax.state import DenseKV, KVState, resize_slots


@struct.dataclass
class DuoKV:
    """One layer's cache split by head kind (see module docstring): ``full`` ``(B, Hr, C, D)`` for the retrieval heads
    ``retrieval`` and ``stream`` ``(B, Hs, n_sink + recent, D)`` (a ring) for the streaming heads ``streaming``."""

    full: DenseKV
    stream: DenseKV
    retrieval: tuple[int, ...] = struct.field(pytree_node=False, default=())
    streaming: tuple[int, ...] = struct.field(pytree_node=False, default=())
    window: int = struct.field(pytree_node=False, default=0)
    ring_start = -1  # appended to before attention, like a plain buffer (the stream ring wraps internally)

    @property
    def _main(self) -> DenseKV:
        return self.full if self.retrieval else self.stream

    @property
    def pos(self):
        return self._main.pos

    @property
    def fill(self):
        # Capacity checks concern the retrieval heads' plain buffer; a layer of only streaming heads never fills.
        return self.full.fill if self.retrieval else jnp.zeros_like(self.stream.fill)

    @property
    def capacity(self) -> int:
        return self.full.capacity if self.retrieval else 1 << 30

    @property
    def extras(self) -> dict:
        return {}

    def dense(self):
        raise NotImplementedError("a DuoAttention layer has no single dense view (retrieval and streaming heads "
                                  "hold different tokens)")

    def append(self, k, v, pos) -> "DuoKV":
        r, s = jnp.asarray(self.retrieval, jnp.int32), jnp.asarray(self.streaming, jnp.int32)
        full = self.full.append(k[:, r], v[:, r], pos) if self.retrieval else self.full
        stream = self.stream.append(k[:, s], v[:, s], pos) if self.streaming else self.stream
        return self.replace(full=full, stream=stream)

    def attend(self, q, q_pos, *, sm_scale=None, softcap=0.0, observe=None, impl="reference"):
        b, hq, t, d = q.shape
        hkv = len(self.retrieval) + len(self.streaming)
        g = hq // hkv
        qg = q.reshape(b, hkv, g, t, d)
        out = None
        for heads, part in ((self.retrieval, self.full), (self.streaming, self.stream)):
            if not heads:
                continue
            idx = jnp.asarray(heads, jnp.int32)
            o, _ = reference_attention(qg[:, idx].reshape(b, len(heads) * g, t, d), part.k, part.v, q_pos,
                                       part.pos, sm_scale=sm_scale, window=self.window, softcap=softcap)
            o = o.reshape(b, len(heads), g, t, -1)
            out = jnp.zeros((b, hkv, g, t, o.shape[-1]), o.dtype) if out is None else out
            out = out.at[:, idx].set(o)
        return out.reshape(b, hq, t, -1), {}


@struct.dataclass
class GatedDuoKV:
    """The training view of one global layer (:mod:`kvjax.train.duo`): a plain :class:`~kvjax.state.DenseKV` whose
    KV head ``h`` attends ``gates[h] * full + (1 - gates[h]) * streaming``, streaming being the same softmax restricted
    to the ``n_sink`` first positions and the ``recent`` most recent ones (the authors' training mask). The model's
    own forward runs over a state of these layers, so the gates train through the same attention block (projections,
    QK-norm, RoPE, softmax scale) that inference uses; with every gate at 1 it is the model."""

    cache: DenseKV
    gates: jax.Array  # (Hkv,)
    n_sink: int = struct.field(pytree_node=False, default=64)
    recent: int = struct.field(pytree_node=False, default=256)
    ring_start = -1

    @property
    def window(self) -> int:
        return self.cache.window

    @property
    def pos(self):
        return self.cache.pos

    @property
    def fill(self):
        return self.cache.fill

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def extras(self) -> dict:
        return {}

    def dense(self):
        return self.cache.dense()

    def append(self, k, v, pos) -> "GatedDuoKV":
        return self.replace(cache=self.cache.append(k, v, pos))

    def attend(self, q, q_pos, *, sm_scale=None, softcap=0.0, observe=None, impl="reference"):
        from kvjax.attention import NEG_INF, _probs, _scores  # noqa: PLC0415

        b, hq, t, d = q.shape
        k, v = self.cache.dense()
        hkv = k.shape[1]
        qg = q.reshape(b, hkv, hq // hkv, t, d)
        scale = d ** -0.5 if sm_scale is None else sm_scale
        s, vis = _scores(qg, k, q_pos, self.cache.pos, scale, self.window, softcap)
        qp, kp = q_pos[:, None, None, :, None], self.cache.pos[:, :, None, None, :]
        local = vis & ((kp < self.n_sink) | (qp - kp < self.recent))
        vf = v.astype(jnp.float32)
        full = jnp.einsum("bhgts,bhsd->bhgtd", _probs(s, vis), vf)
        stream = jnp.einsum("bhgts,bhsd->bhgtd", _probs(jnp.where(local, s, NEG_INF), local), vf)
        a = self.gates.astype(jnp.float32)[None, :, None, None, None]
        out = a * full + (1 - a) * stream
        return out.reshape(b, hq, t, -1).astype(q.dtype), {}


def gated_layers(state: KVState, gates, n_sink: int, recent: int) -> KVState:
    """``state`` with every global dense layer ``i`` made a :class:`GatedDuoKV` with ``gates[i]`` (sliding-window
    layers, already local, are left alone)."""
    layers = tuple(GatedDuoKV(layer, gates[i], n_sink, recent)
                   if isinstance(layer, DenseKV) and not layer.window else layer
                   for i, layer in enumerate(state.layers))
    return state.replace(layers=layers)


def gated_layer_mask(cfg) -> np.ndarray:
    """Bool ``(L, Hkv)``: the heads DuoAttention acts on (those of global layers; Gemma's sliding-window layers and
    Mistral's windowed ones are already local)."""
    from kvjax.state import init_state  # noqa: PLC0415

    state = init_state(cfg, 1, 1)
    glob = [isinstance(layer, DenseKV) and not layer.window for layer in state.layers]
    return np.repeat(np.asarray(glob, bool)[:, None], cfg.num_kv_heads, axis=1)


class DuoGates:
    """Gate values ``(L, Hkv)`` (trained, in [0, 1]); hashes by identity (a static method field)."""

    def __init__(self, values, info: dict | None = None):
        self.values = np.asarray(values, np.float32)
        if self.values.ndim != 2:
            raise ValueError(f"DuoAttention gates must be (layers, kv_heads), got shape {self.values.shape}")
        self.info = dict(info or {})

    def __repr__(self) -> str:
        return f"DuoGates({self.info.get('path', 'in memory')}, shape={self.values.shape})"


@functools.lru_cache(maxsize=8)
def load_gates(path: str) -> DuoGates:
    from kvjax.train.checkpoint import load_artifact  # noqa: PLC0415

    params, info = load_artifact(path, "duo_attention")
    return DuoGates(np.clip(np.asarray(params["gates"]), 0, 1), {**info, "path": path})


def deployment_pattern(gates: np.ndarray, *, sparsity: float | None = None, threshold: float = 0.5,
                       eligible: np.ndarray | None = None) -> np.ndarray:
    """Bool ``(L, Hkv)``: True = retrieval head. ``sparsity`` (fraction of streaming heads, over all ``eligible``
    heads: those of global layers, default all) wins over ``threshold``, as in the authors'
    ``sparsify_attention_heads`` (ties broken by head order instead of their random noise, so that the split is
    deterministic). Heads outside ``eligible`` are never made streaming."""
    g = np.asarray(gates, np.float64)
    ok = np.ones(g.shape, bool) if eligible is None else np.asarray(eligible, bool)
    if sparsity is None:
        return (g >= threshold) | ~ok
    n_stream = int(round(sparsity * int(ok.sum())))
    flat = np.where(ok, g, np.inf).ravel()  # ineligible heads sort last
    order = np.lexsort((np.arange(flat.size), flat))  # lowest gates first
    keep = np.ones(flat.size, bool)
    keep[order[:n_stream]] = False
    return keep.reshape(g.shape)


@register
@dataclasses.dataclass(frozen=True)
class DuoAttention(Method):
    """Retrieval heads (full cache) + streaming heads (sinks + recent window) from trained gates."""

    gates: Any = None  # path of a trained artefact, or DuoGates
    sparsity: float | None = None  # fraction of streaming heads; None = use threshold
    threshold: float = 0.5
    n_sink: int = 64
    recent: int = 256
    name: ClassVar[str] = "duo_attention"
    family: ClassVar[str] = "eviction"  # its decode phase is a no-op (the rings wrap by themselves)
    jittable: ClassVar[bool] = False  # builds layers of data-dependent (gate-dependent) head splits

    def __post_init__(self):
        check_positive("n_sink", self.n_sink, allow_zero=True)
        check_positive("recent", self.recent)
        if self.sparsity is not None and not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"duo_attention sparsity must be in [0, 1] (fraction of streaming heads), got "
                             f"{self.sparsity}")
        if self.gates is not None and not isinstance(self.gates, (str, DuoGates)):
            raise ValueError("duo_attention gates must be a path to a trained artefact or DuoGates")

    @property
    def budget(self) -> int:  # tokens a streaming head holds (the harness' budget check)
        return self.n_sink + self.recent

    def gate_values(self) -> DuoGates:
        if self.gates is None:
            raise ValueError("duo_attention needs trained gates: get_method('duo_attention', gates='runs/duo/ckpt') "
                             "(train them with python -m kvjax.launch --config=configs/duo_train.py)")
        return load_gates(self.gates) if isinstance(self.gates, str) else self.gates

    def pattern(self, cfg) -> np.ndarray:
        g = self.gate_values().values
        if g.shape != (cfg.num_layers, cfg.num_kv_heads):
            raise ValueError(f"DuoAttention gates of shape {g.shape} do not fit this model ({cfg.num_layers} layers, "
                             f"{cfg.num_kv_heads} KV heads): they were trained for another")
        return deployment_pattern(g, sparsity=self.sparsity, threshold=self.threshold,
                                  eligible=gated_layer_mask(cfg))

    def validate(self, ctx: Context) -> None:
        self.pattern(ctx.cfg)

    def observe(self) -> Observe:
        return Observe()

    def decode(self, state, obs, ctx: Context):
        return state  # streaming heads wrap inside their ring; see module docstring

    def prefill(self, state, obs, ctx: Context):
        from kvjax.compress.streaming_llm import StreamingLLM  # noqa: PLC0415

        pat = self.pattern(ctx.cfg)
        streaming = StreamingLLM(n_sink=self.n_sink, window=self.recent, reposition=False)
        layers = list(state.layers)
        for i, layer in enumerate(layers):
            if layer.window or not isinstance(layer, DenseKV):
                continue
            r = tuple(int(h) for h in np.flatnonzero(pat[i]))
            s = tuple(int(h) for h in np.flatnonzero(~pat[i]))
            layers[i] = _split_layer(streaming, ctx, state, layer, r, s)
        return state.replace(layers=tuple(layers)), obs


def _sub(layer: DenseKV, heads: tuple[int, ...]) -> DenseKV:
    idx = jnp.asarray(heads, jnp.int32)
    return layer.replace(k=layer.k[:, idx], v=layer.v[:, idx], pos=layer.pos[:, idx], fill=layer.fill[:, idx],
                         extras={})


def _split_layer(streaming, ctx, state: KVState, layer: DenseKV, r, s) -> DuoKV:
    full = _sub(layer, r)
    full = resize_slots(full, int(np.max(np.asarray(full.fill), initial=0)) + ctx.decode_room) if r else \
        resize_slots(full, 1)
    if s:
        sub_state = KVState(layers=(_sub(layer, s),), next_pos=state.next_pos, rope_shift=state.rope_shift)
        stream = streaming.prefill(sub_state, ({},), ctx)[0].layers[0]
    else:
        stream = resize_slots(_sub(layer, s), 1)
    return DuoKV(full=full, stream=stream, retrieval=r, streaming=s, window=layer.window)

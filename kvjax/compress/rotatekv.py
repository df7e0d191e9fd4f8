"""RotateKV — "RotateKV: Accurate and Robust 2-Bit KV Cache Quantization for LLMs via Outlier-Aware Adaptive
Rotations", Su et al., arXiv 2501.16383 (authors' code: ZunhaiSu/RotateKV).

Keys are quantized **before RoPE**, after a rotation that spreads their outlier channels:

* pre-RoPE keys: the layer class :class:`PreRopeQuantKV` stores the quantized rotated pre-RoPE keys and applies RoPE
  after dequantization inside attention (the reference fuses the rotation into ``k_proj`` and applies RoPE to the
  dequantized keys, ``modeling_llama_RotateKV.py``). kvjax's model hands every layer post-RoPE keys; this layer
  rotates them back by their position (RoPE is a rotation, so this recovers the pre-RoPE key up to float rounding).
* grouped-head Hadamard rotation: the pre-RoPE keys of ``head_group`` KV heads (the paper's 4) are concatenated and
  rotated by one orthonormal Hadamard matrix over their ``head_group * head_dim`` channels. When the model has fewer
  KV heads than that (SmolLM2: 3), all KV heads form one group; sizes that are not a power of two use a Paley
  Hadamard (order 12 or 20) Kronecker a Sylvester one (:func:`kvjax.quant.quantizers.rotation_matrix`). The rotation
  is undone on the key side after dequantization (as the reference does), so queries are untouched.
* outlier-aware channel reordering, applied after the rotation (``fuse_weights.rotate_reorder_k_proj``): a per-layer
  permutation of all KV heads' channels, calibrated offline (``k_reordering_calibration.py``: channels sorted by the
  sum of the rotated pre-RoPE keys over calibration text), so that each quantization group holds channels of similar
  range. :func:`calibrate` computes it on calibration text and :func:`save_calibration` writes it (``.npz``, atomic);
  the method reads it from ``calibration`` (a path; ``""`` = no reordering). kvjax ships the SmolLM2-135M permutation
  calibrated on Wikipedia text (:data:`SMOLLM2_CALIBRATION`; made by ``scripts/calibrate_rotatekv.py``) — the
  evaluation texts (Shakespeare) were not used.
* attention sinks from massive activations: per layer, the tokens holding the ``n_pivot`` (20, the reference's
  ``PIVOT_TOKEN``) largest ``|h|`` entries of the layer's input hidden state over the prompt are kept in full
  precision (:class:`kvjax.quant.cache.KeepBlock`; several entries often fall on one token, so fewer than 20 distinct
  tokens are kept, as in the reference).
* values: rotated per head by a Hadamard matrix (the reference fuses it into ``v_proj``/``o_proj``), undone on the
  attention output.
* quantization: 2-bit per token over groups of ``group`` channels (the reference: 128 = a Llama-2 head; ``0`` here =
  one head's ``head_dim`` channels, i.e. the same per-head-slice grouping on 64-dim heads), asymmetric; every decoded
  token is quantized on arrival (``residual`` 0, as the reference's decode branch).

Remaining deviations: the reference's 2-bit setting clips the quantization range to 0.8 of min/max
(``k_clip_ratio``/``v_clip_ratio``) and rounds the zero point to an integer; kvjax uses the full min/max range with a
float zero point (its shared quantizer). RoPE positions are the original positions (``rope_shift`` 0: RotateKV does
not compose with methods that re-base positions) and the frequencies are fixed (dynamic-NTK scaling is refused).
The Pallas quantized decode kernel is not used for this layer (per-token keys, a keep block, RoPE after
dequantization): attention takes the reference path, which dequantizes. Global layers only.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import tempfile
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.attention import Observe
from kvjax.compress.base import Context, Method, register
from kvjax.compress.evict import map_global_layers
from kvjax.compress.kivi import convert_obs, room_for
from kvjax.compress.mikv import compact_rest
from kvjax.quant import quantizers as qz
from kvjax.quant.cache import QuantizedKV, QuantSpec, quantize_dense_layer
from kvjax.rope import rerotate_keys

SMOLLM2_CALIBRATION = str(pathlib.Path(__file__).resolve().parent.parent / "data" / "rotatekv" / "smollm2-135m.npz")


# ------------------------------------------------------------------------------------------------- transforms


def group_heads(num_kv_heads: int, head_group: int) -> int:
    """KV heads per rotation group: ``head_group``, or all heads when there are fewer (or it does not divide)."""
    return head_group if num_kv_heads % head_group == 0 else num_kv_heads


def grouped_forward(k: jax.Array, rot: jax.Array, perm: jax.Array | None, g: int) -> jax.Array:
    """Pre-RoPE keys ``(B, H, T, D)`` → stored space: per group of ``g`` heads ``concat(k_heads) @ R``, then the
    channels of all heads permuted (``out[..., j] = x[..., perm[j]]`` over ``H * D``), reshaped back to heads."""
    b, h, t, d = k.shape
    x = k.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b, t, h // g, g * d) @ rot
    x = x.reshape(b, t, h * d)
    if perm is not None:
        x = jnp.take(x, perm.astype(jnp.int32), axis=-1)
    return x.reshape(b, t, h, d).transpose(0, 2, 1, 3)


def grouped_inverse(x: jax.Array, rot: jax.Array, perm: jax.Array | None, g: int) -> jax.Array:
    """Inverse of :func:`grouped_forward` (stored space → pre-RoPE keys), f32."""
    b, h, t, d = x.shape
    y = x.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b, t, h * d)
    if perm is not None:
        y = jnp.take(y, jnp.argsort(perm.astype(jnp.int32)), axis=-1)
    y = y.reshape(b, t, h // g, g * d) @ rot.T
    return y.reshape(b, t, h, d).transpose(0, 2, 1, 3)


@struct.dataclass
class PreRopeQuantKV(QuantizedKV):
    """A :class:`QuantizedKV` whose keys are stored **pre-RoPE**, rotated over groups of heads and channel-permuted
    (RotateKV). ``rot`` ``(g * D, g * D)`` orthonormal (a constant built from the static group size, like weights,
    not state), ``perm`` ``(H * D,)`` (or None), ``inv_freq`` ``(D / 2,)`` the RoPE frequencies; RoPE is applied to the
    dequantized keys at their slots' positions inside attention."""

    perm: jax.Array | None = None
    inv_freq: jax.Array | None = None
    group: int = struct.field(pytree_node=False, default=1)

    @property
    def rot(self) -> jax.Array:
        return jnp.asarray(qz.rotation_matrix(self.group * self.head_dim))

    def _unrope(self, k, pos_h):
        return rerotate_keys(k.astype(jnp.float32), -jnp.maximum(pos_h, 0), self.inv_freq)

    def key_to_stored(self, k, pos):
        pos_h = jnp.broadcast_to(pos[:, None, :], k.shape[:3])
        return grouped_forward(self._unrope(k, pos_h), self.rot, self.perm, self.group)

    def key_from_stored(self, k):
        pre = grouped_inverse(k, self.rot, self.perm, self.group)
        return rerotate_keys(pre, jnp.maximum(self.pos, 0), self.inv_freq)

    def attention_operands(self, q):
        k, v = self.stored_kv()
        return q, self.key_from_stored(k), v

    def _kernel_ok(self, t, observe) -> bool:
        return False


def rotation_matrix_for(num_kv_heads: int, head_dim: int, head_group: int = 4) -> np.ndarray:
    """The grouped-head key rotation of a model with ``num_kv_heads`` heads of ``head_dim`` channels."""
    return qz.rotation_matrix(group_heads(num_kv_heads, head_group) * head_dim)


# ------------------------------------------------------------------------------------------------- calibration


def calibrate(model, params, tokens, *, head_group: int = 4, batch: int = 4) -> np.ndarray:
    """RotateKV's offline channel reordering: runs the full-cache model over calibration ``tokens`` ``(N, T)``
    (int), rotates every layer's pre-RoPE keys by the grouped-head Hadamard and sorts the ``H * D`` channels by the
    sum of the rotated keys over all calibration tokens (ascending, as ``k_reordering_calibration.py``).
    Returns the permutations ``(L, H * D)`` int16 (``perm[j]`` = the channel stored at position ``j``)."""
    cfg = model.cfg
    h, d = cfg.num_kv_heads, cfg.head_dim
    g = group_heads(h, head_group)
    rot = jnp.asarray(qz.rotation_matrix(g * d))
    inv_freq = _inv_freq(cfg)
    tokens = np.asarray(tokens)

    @jax.jit
    def layer_sums(params, toks):
        state = model.init_state(toks.shape[0], toks.shape[1])
        _, state, _ = model.forward_impl(model.cfg, params, toks, state, None, logits="none")
        out = []
        for layer in state.layers:
            pre = rerotate_keys(layer.k.astype(jnp.float32), -jnp.maximum(layer.pos, 0), inv_freq)
            x = grouped_forward(jnp.where((layer.pos >= 0)[..., None], pre, 0.0), rot, None, g)
            out.append(jnp.sum(x.transpose(0, 2, 1, 3).reshape(-1, h * d), axis=0))
        return jnp.stack(out)

    total = np.zeros((cfg.num_layers, h * d), np.float64)
    for i in range(0, len(tokens), batch):
        total += np.asarray(layer_sums(params, jnp.asarray(tokens[i:i + batch])), np.float64)
    return np.argsort(total, axis=-1, kind="stable").astype(np.int16)


def save_calibration(path, perm: np.ndarray, *, head_group: int, **meta) -> None:
    """Writes a calibration (``perm`` ``(L, H * D)``, the head group and provenance strings) atomically."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, perm=np.asarray(perm, np.int16), head_group=np.int32(head_group),
                 **{k: np.asarray(str(v)) for k, v in meta.items()})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=8)
def load_calibration(path: str, num_layers: int, channels: int, head_group: int) -> np.ndarray:
    """The permutations ``(L, H * D)`` of a calibration file, checked against the model (one-line errors)."""
    try:
        with np.load(path) as f:
            perm = np.asarray(f["perm"])
            hg = int(f["head_group"])
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"rotatekv calibration {path!r} cannot be read ({e}); run scripts/calibrate_rotatekv.py")
    if perm.shape != (num_layers, channels):
        raise ValueError(f"rotatekv calibration {path!r} has shape {perm.shape}, the model needs "
                         f"({num_layers}, {channels}) (layers, KV heads x head_dim)")
    if hg != head_group:
        raise ValueError(f"rotatekv calibration {path!r} was made with head_group={hg}, the method uses {head_group}")
    if not np.array_equal(np.sort(perm, axis=-1), np.broadcast_to(np.arange(channels), perm.shape)):
        raise ValueError(f"rotatekv calibration {path!r} is not a permutation of {channels} channels per layer")
    return perm


def _inv_freq(cfg) -> jax.Array:
    from kvjax.models.llama import rope_frequencies  # noqa: PLC0415

    return rope_frequencies(cfg, jnp.zeros((1, 1), jnp.int32))


# ------------------------------------------------------------------------------------------------- the method


def pivot_slots(layer, massive_pos):
    """Keep-block slots ``(B, H, n)`` of the massive-activation tokens (positions ``(B, n)``, repeats dropped)."""
    n = massive_pos.shape[1]
    first = jnp.all(jnp.triu(massive_pos[:, :, None] == massive_pos[:, None, :], 1) == 0, axis=1)  # (B, n)
    hit = layer.pos[:, :, None, :] == massive_pos[:, None, :, None]  # (B, H, n, C)
    ok = jnp.any(hit, axis=-1) & first[:, None, :] & (massive_pos[:, None, :] >= 0)
    idx = jnp.argmax(hit, axis=-1).astype(jnp.int32)
    assert idx.shape[-1] == n
    return idx, ok


@register
@dataclasses.dataclass(frozen=True)
class RotateKV(Method):
    """2-bit KV quantization of pre-RoPE keys after grouped-head Hadamard rotation and calibrated channel
    reordering, with massive-activation sinks in full precision (see module docstring)."""

    bits: int = 2
    group: int = 0
    head_group: int = 4
    n_pivot: int = 20
    calibration: str = ""
    rotate_values: bool = True
    residual: int = 0
    scale_dtype: str = "float16"
    name: ClassVar[str] = "rotatekv"
    kind: ClassVar[str] = "quantized"

    def __post_init__(self):
        qz.check_bits(self.bits)
        for f in ("group", "n_pivot", "residual"):
            val = getattr(self, f)
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"rotatekv {f} must be an integer >= 0, got {val!r}")
        if isinstance(self.head_group, bool) or not isinstance(self.head_group, int) or self.head_group < 1:
            raise ValueError(f"rotatekv head_group must be an integer >= 1, got {self.head_group!r}")

    def observe(self) -> Observe:
        return Observe(massive=self.n_pivot)

    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, v_bits=self.bits, k_group=self.group, v_group=self.group, k_axis="token",
                         residual=self.residual, v_rotate=self.rotate_values, scale_dtype=self.scale_dtype)

    def validate(self, ctx: Context) -> None:
        cfg = ctx.cfg
        d = cfg.head_dim
        self.spec().resolve(d, d)
        g = group_heads(cfg.num_kv_heads, self.head_group)
        qz.rotation_matrix(g * d)  # clear error if no Hadamard of that size
        if cfg.rope_scaling.rope_type == "dynamic":
            raise ValueError("rotatekv stores pre-RoPE keys with fixed frequencies; dynamic-NTK RoPE is not supported")
        if self.calibration:
            load_calibration(self.calibration, cfg.num_layers, cfg.num_kv_heads * d, self.head_group)

    def prefill(self, state, obs, ctx: Context):
        spec = self.spec()
        cfg = ctx.cfg
        h, d = cfg.num_kv_heads, cfg.head_dim
        g = group_heads(h, self.head_group)
        rot = jnp.asarray(qz.rotation_matrix(g * d))
        inv_freq = _inv_freq(cfg)
        perms = None
        if self.calibration:
            perms = jnp.asarray(load_calibration(self.calibration, cfg.num_layers, h * d, self.head_group))

        def one(i, layer, o):
            perm = None if perms is None else perms[i]
            pre = rerotate_keys(layer.k.astype(jnp.float32), -jnp.maximum(layer.pos, 0), inv_freq)
            kst = grouped_forward(pre, rot, perm, g)
            c = layer.capacity
            keep_kw, order, count = {}, None, None
            if self.n_pivot:
                idx, keep = pivot_slots(layer, o["massive_pos"])
                # repeated pivots leave keep slots empty: the stream must hold all but one token (static shape)
                order, count = compact_rest(layer.valid, idx, keep, max(c - 1, 1))
                keep_kw = dict(keep_idx=idx, keep_ok=keep, keep_bits=16)
            cache, src, ok = quantize_dense_layer(layer, spec, room=room_for(layer, ctx), stream_idx=order,
                                                  stream_n=count, k_stored=kst, **keep_kw)
            fields = {f.name: getattr(cache, f.name) for f in dataclasses.fields(QuantizedKV)}
            cache = PreRopeQuantKV(**fields, perm=None if perm is None else perm.astype(jnp.int16),
                                   inv_freq=inv_freq, group=g)
            o = {k: v for k, v in o.items() if k != "massive_pos"}
            return cache, convert_obs(o, src, ok)

        return map_global_layers(state, obs, one)

"""One global device mesh and the partition rules of kvjax's params and KV state (``jax.sharding``).

Mesh axes (always all three, size 1 when unused, so that every rule can name them):

* ``data``: the batch of sequences (data parallelism);
* ``model``: attention heads and the MLP's hidden units (tensor parallelism, Megatron style: column-parallel
  ``q``/``k``/``v``/``gate``/``up``, row-parallel ``o``/``down``), the vocabulary of the embedding and LM head;
* ``sequence``: the slot axis of long KV caches (context parallelism for caches no single device could hold).

Rules (:func:`param_specs`, :func:`state_specs`), applied with :class:`jax.sharding.NamedSharding`:

======================================  =====================================================================
array                                   PartitionSpec
======================================  =====================================================================
``q``/``k``/``v`` ``(D, H*Dh)``, gate/up   ``(None, "model")``; their biases ``("model",)``
``o`` ``(H*Dh, D)``, down ``(F, D)``       ``("model", None)``
``embed`` ``(V, D)`` / ``lm_head (D, V)``  vocabulary over ``model`` when it divides V, else replicated
norms, anything else                    replicated
cache arrays ``(B, Hkv, C, ...)``        ``("data", "model", "sequence" | None, ...)``: the slot axis over
                                        ``sequence`` when the mesh has one and it divides C (a "long" cache),
                                        else that layer's slots stay whole on each device
per-head arrays ``(B, Hkv, ...)``        ``("data", "model", ...)`` (``fill``, per-head statistics, scales)
ragged layers' flat buffers ``(B, N..)``  ``("data", None, ...)``: all heads of a row in one buffer, whole on
                                        each model/sequence device (AdaKV's ``storage="ragged"``)
``next_pos``, ``rope_shift`` ``(B,)``   ``("data",)``
======================================  =====================================================================

Heads are split in contiguous blocks, so query head ``h * G + g`` lives with its KV head ``h`` (GQA stays local).
A stacked cache or params stack (:class:`kvjax.state.StackedLayers`) gets the same specs with a leading ``None``.

Bad meshes fail before any compilation with one line (:class:`ShardingError`): an axis that does not divide the
KV heads / heads / MLP width / batch, more devices than exist, or a sequence axis with a method whose state kvjax
does not partition along slots (quantized and low-rank caches).

``Model(cfg, mesh=mesh)`` runs prefill / decode / ``generate`` under these shardings: its forward constrains the
KV state to the rules on entry and exit (so jit's outputs carry them), and routes Pallas decode attention through
:func:`pallas_kernels.sharded.sharded_decode_attention` (``jax.shard_map`` per head shard, split-K across the
sequence shards). Everything else is left to XLA's SPMD partitioner, which is exact: sharded results equal the
unsharded ones up to float reduction order.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "model", "sequence")


class ShardingError(ValueError):
    """A mesh that cannot shard this model, batch or method (the message names the value and what is allowed)."""


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Sizes of the three mesh axes."""

    data: int = 1
    model: int = 1
    sequence: int = 1

    @property
    def size(self) -> int:
        return self.data * self.model * self.sequence

    def __str__(self) -> str:
        return ",".join(f"{a}:{getattr(self, a)}" for a in AXES)


def parse_mesh(text: str | MeshSpec | dict | None) -> MeshSpec | None:
    """``"data:2,model:4"`` (axes in any order, missing ones = 1) → :class:`MeshSpec`; ``""``/None → None."""
    if text is None or isinstance(text, MeshSpec):
        return text
    if isinstance(text, dict):
        items = list(text.items())
    else:
        text = str(text).strip()
        if not text:
            return None
        items = []
        for part in text.split(","):
            m = re.fullmatch(r"\s*(\w+)\s*[:=]\s*(-?\d+)\s*", part)
            if not m:
                raise ShardingError(f"mesh {text!r}: expected comma-separated axis:size pairs, e.g. "
                                    "'data:2,model:4' (axes: data, model, sequence)")
            items.append((m.group(1), int(m.group(2))))
    sizes: dict[str, int] = {}
    for name, n in items:
        if name not in AXES:
            raise ShardingError(f"mesh axis {name!r} is unknown; axes are {', '.join(AXES)}")
        if name in sizes:
            raise ShardingError(f"mesh axis {name!r} is given twice")
        if int(n) < 1:
            raise ShardingError(f"mesh axis {name}:{n} must be a positive size")
        sizes[name] = int(n)
    return MeshSpec(**sizes)


def make_mesh(spec: str | MeshSpec | dict, devices=None) -> Mesh:
    """A :class:`Mesh` with axes ``(data, model, sequence)`` over the first ``spec.size`` of ``devices`` (default:
    this process's local devices). Axes are ``Auto`` (XLA propagates shardings; ``shard_map`` accepts any input)."""
    spec = parse_mesh(spec) or MeshSpec()
    devices = list(jax.local_devices() if devices is None else devices)
    if spec.size > len(devices):
        raise ShardingError(f"mesh {spec} needs {spec.size} devices but only {len(devices)} "
                            f"{devices[0].platform if devices else ''} device(s) exist; use a mesh of at most "
                            f"{len(devices)} devices")
    arr = np.asarray(devices[:spec.size], dtype=object).reshape(spec.data, spec.model, spec.sequence)
    return Mesh(arr, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def data_submeshes(mesh: Mesh) -> list[Mesh]:
    """One mesh per index of ``mesh``'s ``data`` axis, each with ``data:1`` and the same ``model`` / ``sequence``
    layout: the data-parallel groups an experiment deals its one-prompt generation cells to."""
    return [Mesh(mesh.devices[i:i + 1], AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
            for i in range(int(mesh.shape["data"]))]


def mesh_spec(mesh: Mesh) -> MeshSpec:
    return MeshSpec(**{a: int(mesh.shape.get(a, 1)) for a in AXES})


# ---------------------------------------------------------------------------------------------------------------
# validation (before any compilation)


def validate_mesh(mesh: Mesh | MeshSpec, cfg=None, *, batch: int | None = None, method=None) -> None:
    """Raises :class:`ShardingError` (one line) when ``mesh`` cannot shard model ``cfg``, a ``batch`` or ``method``
    (each check only when given)."""
    s = mesh if isinstance(mesh, MeshSpec) else mesh_spec(mesh)
    dims = () if cfg is None else (
        ("KV heads (num_kv_heads)", cfg.num_kv_heads), ("attention heads", cfg.num_heads),
        ("MLP width (intermediate_size)", cfg.intermediate_size))
    for what, n in dims:
        if n % s.model:
            ok = [d for d in range(1, n + 1) if n % d == 0]
            raise ShardingError(f"mesh axis model:{s.model} does not divide the model's {n} {what}; "
                                f"model must be one of {ok}")
    if batch is not None and batch % s.data:
        raise ShardingError(f"mesh axis data:{s.data} does not divide the batch of {batch} sequences; use a data "
                            f"axis that divides {batch}")
    if method is not None and s.sequence > 1:
        check_sequence_method(method)


def check_sequence_method(method) -> None:
    """A ``sequence`` axis partitions caches along their slots; only dense caches (the full cache, eviction,
    merging) are laid out so. Quantized / low-rank caches pack tokens in groups along the slot axis (KIVI's key
    groups, GEAR's outliers, residual windows) that kvjax does not split: refuse them."""
    kind = getattr(method, "kind", "dense")
    if kind != "dense":
        name = getattr(method, "name", type(method).__name__)
        raise ShardingError(f"method {name!r} leaves a {kind} cache, which cannot be sharded along the sequence "
                            "axis; use sequence:1 (data/model axes work) or a dense-cache method")


# ---------------------------------------------------------------------------------------------------------------
# partition rules

_COL = ("q", "k", "v", "gate", "up")  # (D, out): output features over model
_ROW = ("o", "down")  # (in, D): input features over model
_BIAS = ("q_bias", "k_bias", "v_bias")


def _param_spec(name: str, x, s: MeshSpec) -> P:
    nd = x.ndim
    if name in _COL and nd == 2 and x.shape[1] % s.model == 0:
        return P(None, "model")
    if name in _ROW and nd == 2 and x.shape[0] % s.model == 0:
        return P("model", None)
    if name in _BIAS and nd == 1 and x.shape[0] % s.model == 0:
        return P("model")
    if name == "embed" and nd == 2 and x.shape[0] % s.model == 0:
        return P("model", None)
    if name == "lm_head" and nd == 2 and x.shape[1] % s.model == 0:
        return P(None, "model")
    return P()


def _lead(spec: P, n: int) -> P:
    return P(*((None,) * n + tuple(spec)))


def param_specs(params, mesh: Mesh | MeshSpec):
    """PartitionSpecs for a params tree (see the module's table); stacked layer params get a leading None."""
    s = mesh if isinstance(mesh, MeshSpec) else mesh_spec(mesh)

    def leaf(path, x):
        keys = [getattr(k, "key", None) for k in path]
        name = next((k for k in reversed(keys) if isinstance(k, str)), "")
        lead = sum(getattr(k, "name", None) == "tree" for k in path)  # inside a StackedLayers: one stack axis
        if lead:
            return _lead(_param_spec(name, jax.ShapeDtypeStruct(x.shape[lead:], x.dtype), s), lead)
        return _param_spec(name, x, s)

    return jax.tree_util.tree_map_with_path(leaf, params)


def _layer_specs(layer, s: MeshSpec, lead: int, batch: int):
    """Specs for one cache layer's leaves; ``lead`` = number of leading stack axes. Head-major layers (``pos``
    ``(B, Hkv, C)``: dense, quantized) shard heads over ``model`` and long slot axes over ``sequence``; other layouts
    (a ragged layer's flat per-row buffer of all heads) shard only their batch axis."""
    pos = getattr(layer, "pos", None)
    head_major = pos is not None and pos.ndim - lead == 3
    if head_major:
        b, h, c = pos.shape[lead:lead + 3]
        seq = s.sequence > 1 and c % s.sequence == 0

    def leaf(x):
        shp = x.shape[lead:]
        if head_major and len(shp) >= 2 and tuple(shp[:2]) == (b, h):
            third = ("sequence" if seq and len(shp) >= 3 and shp[2] == c else None,) if len(shp) >= 3 else ()
            return _lead(P("data", "model", *third, *(None,) * (len(shp) - 3)), lead)
        if len(shp) >= 1 and shp[0] == batch:
            return _lead(P("data", *(None,) * (len(shp) - 1)), lead)
        return _lead(P(), lead)

    return jax.tree_util.tree_map(leaf, layer)


def state_specs(state, mesh: Mesh | MeshSpec):
    """PartitionSpecs for a :class:`kvjax.state.KVState` (tuple or stacked layers), following the module's table."""
    from kvjax.state import StackedLayers

    s = mesh if isinstance(mesh, MeshSpec) else mesh_spec(mesh)
    if isinstance(state.layers, StackedLayers):
        layers = StackedLayers(_layer_specs(state.layers.tree, s, 1, state.batch_size))
    else:
        layers = tuple(_layer_specs(layer, s, 0, state.batch_size) for layer in state.layers)
    return state.replace(layers=layers, next_pos=P("data"), rope_shift=P("data"))


def _named(mesh: Mesh, specs):
    return jax.tree_util.tree_map(lambda p: NamedSharding(mesh, p), specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings(params, mesh: Mesh):
    return _named(mesh, param_specs(params, mesh))


def state_shardings(state, mesh: Mesh):
    return _named(mesh, state_specs(state, mesh))


def shard_params(params, mesh: Mesh, cfg=None):
    """``params`` placed on ``mesh`` by the rules (``cfg`` given: the mesh is validated against the model first)."""
    if cfg is not None:
        validate_mesh(mesh, cfg)
    return jax.device_put(params, param_shardings(params, mesh))


def shard_state(state, mesh: Mesh, cfg=None):
    """The KV state placed on ``mesh`` by the rules (validated against ``cfg`` and the state's batch first)."""
    validate_mesh(mesh, cfg, batch=state.batch_size)
    return jax.device_put(state, state_shardings(state, mesh))


def shard_batch(x, mesh: Mesh):
    """A ``(B, ...)`` array (tokens, masks) with its batch over ``data``."""
    validate_mesh(mesh, batch=x.shape[0])
    return jax.device_put(x, NamedSharding(mesh, P("data", *(None,) * (x.ndim - 1))))


def constrain_state(state, mesh: Mesh):
    """``jax.lax.with_sharding_constraint`` of every state leaf to the rules (inside jit: the partitioner keeps it)."""
    return jax.lax.with_sharding_constraint(state, state_shardings(state, mesh))


# ---------------------------------------------------------------------------------------------------------------
# the mesh Pallas kernels see while a sharded model is traced

_KERNEL_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("kvjax_kernel_mesh", default=None)


@contextlib.contextmanager
def kernel_mesh(mesh: Mesh | None):
    """While active, :func:`kvjax.attention.attend` runs Pallas decode kernels per shard of ``mesh``."""
    tok = _KERNEL_MESH.set(mesh)
    try:
        yield mesh
    finally:
        _KERNEL_MESH.reset(tok)


def current_kernel_mesh() -> Mesh | None:
    return _KERNEL_MESH.get()


def sharded_forward(raw_forward, mesh: Mesh):
    """``raw_forward`` (a model forward function) constrained to the rules on entry and exit, with Pallas decode
    attention sharded over ``mesh``."""

    def forward(cfg, params, tokens, state, token_mask=None, **kw):
        with kernel_mesh(mesh):
            state = constrain_state(state, mesh)
            out, new_state, obs = raw_forward(cfg, params, tokens, state, token_mask, **kw)
            new_state = constrain_state(new_state, mesh)
        return out, new_state, obs

    forward.raw = raw_forward
    return forward


# ---------------------------------------------------------------------------------------------------------------
# bytes per device (exact, from the arrays' addressable shards)


def per_device_nbytes(tree: Any) -> dict[str, int]:
    """Bytes each device holds of ``tree``'s arrays: the sum of ``shard.data.nbytes`` over every leaf's addressable
    shards (replicated arrays count once per device that holds them). Keys: ``str(device)``."""
    out: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for sh in getattr(leaf, "addressable_shards", ()):
            out[str(sh.device)] = out.get(str(sh.device), 0) + int(sh.data.nbytes)
    return out


def max_device_nbytes(tree: Any) -> int:
    """The largest per-device byte count of ``tree`` (what must fit on one device)."""
    per = per_device_nbytes(tree)
    return max(per.values()) if per else 0


def describe_shardings(tree: Any, max_rows: int = 40) -> str:
    """One line per array leaf: path, shape, dtype and PartitionSpec (for notebooks and logs)."""
    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        sh = getattr(leaf, "sharding", None)
        spec = getattr(sh, "spec", sh)
        rows.append(f"{jax.tree_util.keystr(path):48s} {str(tuple(leaf.shape)):22s} {str(leaf.dtype):8s} {spec}")
    if len(rows) > max_rows:
        rows = rows[:max_rows] + [f"... ({len(rows) - max_rows} more)"]
    return "\n".join(rows)


__all__ = ["AXES", "MeshSpec", "ShardingError", "check_sequence_method", "constrain_state", "current_kernel_mesh",
           "describe_shardings", "kernel_mesh", "make_mesh", "max_device_nbytes", "mesh_spec", "param_shardings",
           "param_specs", "parse_mesh", "per_device_nbytes", "shard_batch", "shard_params", "shard_state",
           "sharded_forward", "state_shardings", "state_specs", "validate_mesh"]


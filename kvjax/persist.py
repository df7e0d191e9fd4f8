"""Saving and loading KV states — the storage side of CacheGen ("CacheGen: KV Cache Compression and Streaming for
Fast Large Language Model Serving", Liu et al., arXiv 2310.07240).

:func:`save_state` writes any :class:`kvjax.KVState` (dense, quantized, GEAR layers ...) to a directory:

* ``arrays-<id>/<i>``: every array leaf as a tensorstore ``zarr3`` array, chunked along the token-slot axis (CacheGen
  streams and decodes KV in token chunks; ``chunk_tokens`` per chunk), each chunk compressed with blosc-zstd with
  byte shuffling. Optionally (``token_delta=True``) float arrays of shape ``(B, H, T, D)`` are first *XOR-delta*
  coded along the token axis (each token's bit pattern XOR the previous token's): CacheGen's "token-wise locality"
  applied losslessly; loading undoes it exactly. It is off by default: on the tiny random test models it saved
  nothing (0-3% larger files); it may pay off on trained models whose neighbouring tokens' KV agree more.
* ``meta.json``: format version, kvjax version, the model config and its SHA-256 fingerprint, the compression
  method's description, the layer classes, the pytree skeleton (classes, static fields such as
  :class:`kvjax.quant.cache.QuantSpec`), per-array shapes/dtypes, ``raw_bf16_bytes`` (the same tokens' keys and values
  as uncompressed bf16), ``state_bytes`` (:func:`kvjax.nbytes`) and ``disk_bytes``, plus the caller's ``meta``.
  Per array: its pytree path (``name``, e.g. ``.layers[3].k``), shape, dtype, chunk shape, number of chunk files, and
  the SHA-256 of its bytes (``sha256``; format 2).

Crash safety and integrity (format 2): a save writes its arrays into a fresh ``arrays-<id>`` directory and then
commits by atomically replacing ``meta.json`` (written to a temporary file, fsynced, ``os.replace``d), which names
that directory; only then are older array directories removed. A save killed at any moment (even ``kill -9``) thus
leaves the previous state loadable (or, after the commit, the new one), never a mix. Every chunk is stored, even an
all-zero one (``store_data_equal_to_fill_value``), so :func:`load_state` refuses a state with a missing chunk file,
and it verifies each array's SHA-256 after decoding: a flipped byte or bit anywhere is an error naming the array, not
wrong numbers. Format-1 states (``arrays/``, no checksums) still load, without the integrity checks.

CacheGen's lossy codec (``codec="cachegen"``, format 3; :mod:`kvjax.codec.cachegen`): the keys and values of every
full-precision layer (float ``k``/``v`` ``(B, H, T, D)`` beside ``pos`` ``(B, H, T)``, e.g. a dense cache) are
stored as CacheGen byte streams — token-wise deltas against anchor tokens in groups, layer-wise quantization (coarser
in later layers), range coding with a model per channel and layer — in place of the raw arrays; everything else
(positions, already packed quantized caches) is stored losslessly as above. The SHA-256 of each stream is checked
before it is decoded and the stream carries its own CRC32, so a corrupt or truncated stream is an error, not wrong
numbers. Loading decodes to the original dtype, within the codec's quantization error.

:func:`load_state` rebuilds the state (optionally checked against ``like``, a state of the model that will use it, or
``cfg``): a file written by another model config, or for a differently shaped state, is refused with a clear error.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import json
import os
import shutil
import uuid

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "kvjax-kvstate"
FORMAT_VERSION = 3  # 3: cachegen-coded arrays (written only with codec="cachegen"; otherwise 2)
CODECS = (None, "cachegen")
META_FILE = "meta.json"
_ARRAYS_PREFIX = "arrays"


class StateFileError(ValueError):
    """A saved KV state cannot be loaded (missing, corrupt, or written for another model / state layout)."""


# ------------------------------------------------------------------------------------------------- fingerprints


def config_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str))


def config_fingerprint(cfg) -> str:
    """SHA-256 of the model config (every field that shapes the KV cache or the computation)."""
    return hashlib.sha256(json.dumps(config_dict(cfg), sort_keys=True).encode()).hexdigest()


def _head_dims(layer) -> tuple[int, int]:
    for kname, vname in (("k", "v"), ("k_res", "v_res")):
        k, v = getattr(layer, kname, None), getattr(layer, vname, None)
        if hasattr(k, "shape") and hasattr(v, "shape"):
            return int(k.shape[-1]), int(v.shape[-1])
    k, v = layer.dense()
    return int(k.shape[-1]), int(v.shape[-1])


def raw_bf16_bytes(state) -> int:
    """Bytes of the keys and values of the tokens ``state`` holds, as an uncompressed bf16 cache would store them."""
    total = 0
    for layer in state.layers:
        dk, dv = _head_dims(layer)
        total += int(np.sum(np.asarray(layer.pos) >= 0)) * (dk + dv) * 2
    return total


def disk_bytes(path: str) -> int:
    """Bytes of all files under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


# ------------------------------------------------------------------------------------------------- skeleton


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (type, np.dtype))


def _encode_static(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return {"__seq__": [_encode_static(v) for v in value], "tuple": isinstance(value, tuple)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__dataclass__": f"{type(value).__module__}.{type(value).__qualname__}",
                "fields": {f.name: _encode_static(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    raise TypeError(f"cannot save static field value {value!r} of type {type(value).__name__}")


def _import_kvjax(name: str):
    mod, _, qual = name.rpartition(".")
    if not (mod == "kvjax" or mod.startswith("kvjax.")):
        raise StateFileError(f"refusing to load class {name!r}: only kvjax classes can appear in a saved state")
    try:
        obj = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise StateFileError(f"saved state needs class {name!r}, which this kvjax version does not have") from e
    if not dataclasses.is_dataclass(obj):
        raise StateFileError(f"{name!r} is not a dataclass")
    return obj


def _decode_static(value):
    if isinstance(value, dict) and "__dataclass__" in value:
        cls = _import_kvjax(value["__dataclass__"])
        return cls(**{k: _decode_static(v) for k, v in value["fields"].items()})
    if isinstance(value, dict) and "__seq__" in value:
        items = [_decode_static(v) for v in value["__seq__"]]
        return tuple(items) if value["tuple"] else items
    return value


def _skeleton(node, arrays: list, names: list | None = None, where: str = ""):
    names = [] if names is None else names
    if node is None:
        return {"t": "none"}
    if _is_array(node):
        arrays.append(node)
        names.append(where or "<root>")
        return {"t": "array", "i": len(arrays) - 1}
    if isinstance(node, (tuple, list)):
        return {"t": "tuple" if isinstance(node, tuple) else "list",
                "items": [_skeleton(x, arrays, names, f"{where}[{j}]") for j, x in enumerate(node)]}
    if isinstance(node, dict):
        if not all(isinstance(k, str) for k in node):
            raise TypeError("only dicts with string keys can be saved")
        return {"t": "dict", "items": {k: _skeleton(v, arrays, names, f"{where}[{k!r}]") for k, v in node.items()}}
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        fields, static = {}, {}
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if f.metadata.get("pytree_node", True):
                fields[f.name] = _skeleton(value, arrays, names, f"{where}.{f.name}")
            else:
                static[f.name] = _encode_static(value)
        return {"t": "struct", "cls": f"{type(node).__module__}.{type(node).__qualname__}", "fields": fields,
                "static": static}
    if isinstance(node, (bool, int, float, str)):
        return {"t": "py", "v": node}
    raise TypeError(f"cannot save a {type(node).__name__} in a KV state")


def _check_classes(node) -> None:
    """Resolves every class named in a saved skeleton before any data is read (only kvjax classes are allowed)."""
    if isinstance(node, dict):
        for key in ("cls", "__dataclass__"):
            if key in node and isinstance(node[key], str):
                _import_kvjax(node[key])
        for v in node.values():
            _check_classes(v)
    elif isinstance(node, list):
        for v in node:
            _check_classes(v)


def _rebuild(sk, arrays):
    t = sk["t"]
    if t == "none":
        return None
    if t == "array":
        return arrays[sk["i"]]
    if t in ("tuple", "list"):
        items = [_rebuild(x, arrays) for x in sk["items"]]
        return tuple(items) if t == "tuple" else items
    if t == "dict":
        return {k: _rebuild(v, arrays) for k, v in sk["items"].items()}
    if t == "struct":
        cls = _import_kvjax(sk["cls"])
        kw = {k: _rebuild(v, arrays) for k, v in sk["fields"].items()}
        kw.update({k: _decode_static(v) for k, v in sk["static"].items()})
        return cls(**kw)
    if t == "py":
        return sk["v"]
    raise StateFileError(f"unknown node type {t!r} in the saved skeleton")


# ------------------------------------------------------------------------------------------------- arrays


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _xor_delta(x: np.ndarray, axis: int, inverse: bool) -> np.ndarray:
    u = x.view(_UINT[x.dtype.itemsize])
    if inverse:
        out = np.bitwise_xor.accumulate(u, axis=axis)
    else:
        out = u.copy()
        sl_new = [slice(None)] * u.ndim
        sl_old = [slice(None)] * u.ndim
        sl_new[axis], sl_old[axis] = slice(1, None), slice(None, -1)
        out[tuple(sl_new)] = u[tuple(sl_new)] ^ u[tuple(sl_old)]
    return out.view(x.dtype)


def _chunks(shape, chunk_tokens: int, itemsize: int) -> list[int]:
    ch = [max(1, s) for s in shape]
    if len(shape) >= 3:
        ch[2] = max(1, min(shape[2], chunk_tokens))
        # keep a chunk under ~8 MiB by splitting the batch/head axes
        while int(np.prod(ch)) * itemsize > (8 << 20) and (ch[0] > 1 or ch[1] > 1):
            i = 0 if ch[0] > 1 else 1
            ch[i] = max(1, ch[i] // 2)
    return ch


def _spec(path: str, shape=None, dtype: str | None = None, chunks=None, itemsize: int = 1, level: int = 5) -> dict:
    """tensorstore spec of a zarr3 array (``level`` 0: stored without blosc, e.g. an entropy-coded stream)."""
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
    if shape is not None:
        codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
        if level:
            codecs.append({"name": "blosc", "configuration": {"cname": "zstd", "clevel": level, "shuffle": "shuffle",
                                                              "typesize": itemsize}})
        spec["metadata"] = {
            "shape": list(shape), "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            "codecs": codecs,
        }
        spec["create"] = True
        spec["delete_existing"] = True
        spec["store_data_equal_to_fill_value"] = True  # every chunk is a file: a missing one is detectable
    return spec


def _chunk_keys(shape, chunks) -> list[str]:
    """The relative paths of a zarr3 array's chunk files (default chunk key encoding, ``/`` separator)."""
    if not shape:
        return ["c"]
    grid = [-(-s // c) for s, c in zip(shape, chunks)]
    return ["/".join(["c", *map(str, idx)]) for idx in np.ndindex(*grid)]


def _sha256(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_meta(path: str, text: str) -> None:
    """Commits a save: ``meta.json`` replaced atomically (temporary file, fsync, rename, directory fsync)."""
    tmp = os.path.join(path, f".{META_FILE}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, META_FILE))
    _fsync_dir(path)


def _is_leftover(name: str) -> bool:
    """Entries a kvjax save creates before its commit (array directories, a temporary meta file)."""
    return name == _ARRAYS_PREFIX or name.startswith(_ARRAYS_PREFIX + "-") or name.startswith(f".{META_FILE}.")


def _dtype_name(dt) -> str:
    name = np.dtype(dt).name
    return "bool" if name == "bool" else name


# ------------------------------------------------------------------------------------------------- API


def _codec_targets(state, names: list) -> dict:
    """Array index -> ``(layer index, "k"/"v", pos)`` of the leaves CacheGen codes: float ``k``/``v``
    ``(B, H, T, D)`` of a layer whose ``pos`` is ``(B, H, T)``."""
    out = {}
    layers = getattr(state, "layers", ())
    for i, name in enumerate(names):
        for li, layer in enumerate(layers):
            for kind in ("k", "v"):
                if name != f".layers[{li}].{kind}":
                    continue
                x, pos = getattr(layer, kind, None), getattr(layer, "pos", None)
                if _is_array(x) and _is_array(pos) and x.ndim == 4 and tuple(pos.shape) == tuple(x.shape[:3]) and \
                        jnp.issubdtype(x.dtype, jnp.floating):
                    out[i] = (li, kind, pos)
    return out


def save_state(path: str, state, meta: dict | None = None, *, cfg=None, method=None, chunk_tokens: int = 256,
               token_delta: bool = False, level: int = 5, codec: str | None = None, codec_config=None) -> dict:
    """Writes ``state`` (a :class:`kvjax.KVState`) to directory ``path`` (created; existing arrays overwritten).

    ``cfg``: the :class:`kvjax.ModelConfig` that produced it (its fingerprint is checked at load time); ``method``:
    the compression method (or a string) recorded in the metadata; ``meta``: extra JSON-serialisable metadata.
    ``codec``: ``None`` (lossless) or ``"cachegen"`` (CacheGen's lossy codec for full-precision keys/values, with
    ``codec_config`` a :class:`kvjax.codec.cachegen.CacheGenConfig`, default the paper's/authors' settings).
    Returns the metadata written, including ``disk_bytes``, ``raw_bf16_bytes`` and ``state_bytes``.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(map(repr, CODECS))}")
    if codec is None and codec_config is not None:
        raise ValueError("codec_config needs codec='cachegen'")
    import tensorstore as ts  # noqa: PLC0415

    from kvjax import __version__  # noqa: PLC0415
    from kvjax.state import nbytes  # noqa: PLC0415

    if meta is not None:
        try:
            json.dumps(meta)
        except TypeError as e:
            raise TypeError(f"meta must be JSON-serialisable: {e}") from e
    arrays: list = []
    names: list = []
    skeleton = _skeleton(state, arrays, names)
    for name, x in zip(names, arrays):  # refuse before writing anything: a dtype jnp cannot hold would change
        dt = np.dtype(getattr(x, "dtype", np.asarray(x).dtype))
        if jnp.asarray(np.zeros((0,), dt)).dtype != dt:
            raise TypeError(f"cannot save {name or 'an array'} of dtype {dt}: it would load as "
                            f"{jnp.asarray(np.zeros((0,), dt)).dtype} (jax_enable_x64 is off); cast it first")
    if os.path.isdir(path) and os.listdir(path):
        if os.path.exists(os.path.join(path, META_FILE)):
            read_meta(path)  # overwrite only a previous kvjax KV state
        elif not all(_is_leftover(n) for n in os.listdir(path)):  # (leftovers of an interrupted first save are fine)
            raise StateFileError(f"{path!r} is a non-empty directory that holds no saved KV state; refusing to "
                                 f"write into it")
    targets = {}
    if codec == "cachegen":
        from kvjax.codec import cachegen  # noqa: PLC0415

        cg_cfg = codec_config if codec_config is not None else cachegen.CacheGenConfig()
        if not isinstance(cg_cfg, cachegen.CacheGenConfig):
            raise TypeError(f"codec_config must be a CacheGenConfig, got {type(cg_cfg).__name__}")
        targets = _codec_targets(state, names)
    arrays_dir = f"{_ARRAYS_PREFIX}-{uuid.uuid4().hex[:12]}"
    os.makedirs(os.path.join(path, arrays_dir))
    infos, futures = [], []
    host = jax.device_get(arrays)
    n_layers = len(getattr(state, "layers", ()))
    for i, x in enumerate(host):
        x = np.asarray(x)
        if i in targets:  # CacheGen stream in place of the array (1-D uint8, no further compression)
            li, kind, pos = targets[i]
            bins = cg_cfg.bins(kind, li, n_layers)
            stream = np.frombuffer(cachegen.encode(x, np.asarray(pos) >= 0, bins, cg_cfg), np.uint8)
            chunks = [max(1, min(len(stream), 8 << 20))]
            store = ts.open(_spec(os.path.join(path, arrays_dir, str(i)), stream.shape, "uint8", chunks, 1,
                                  0)).result()
            futures.append(store.write(stream))
            infos.append({"name": names[i], "shape": list(x.shape), "dtype": _dtype_name(x.dtype),
                          "codec": "cachegen", "bins": bins, "stored_shape": list(stream.shape),
                          "chunk_shape": chunks, "n_chunks": len(_chunk_keys(stream.shape, chunks)),
                          "sha256": _sha256(stream)})
            continue
        delta = bool(token_delta and x.ndim == 4 and x.shape[2] > 1 and jnp.issubdtype(x.dtype, jnp.floating))
        data = _xor_delta(x, 2, inverse=False) if delta else x
        chunks = _chunks(x.shape, chunk_tokens, x.dtype.itemsize)
        store = ts.open(_spec(os.path.join(path, arrays_dir, str(i)), x.shape, _dtype_name(x.dtype), chunks,
                              x.dtype.itemsize, level)).result()
        futures.append(store.write(data))
        infos.append({"name": names[i], "shape": list(x.shape), "dtype": _dtype_name(x.dtype), "xor_delta": delta,
                      "chunk_shape": list(chunks), "n_chunks": len(_chunk_keys(x.shape, chunks)),
                      "sha256": _sha256(x)})
    for f in futures:
        f.result()
    layers = getattr(state, "layers", ())
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if codec else 2,
        "codec": None if codec is None else {"name": codec, **dataclasses.asdict(cg_cfg)},
        "kvjax_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "config_fingerprint": config_fingerprint(cfg) if cfg is not None else None,
        "config": config_dict(cfg) if cfg is not None else None,
        "method": method if isinstance(method, (str, type(None))) else method.describe(),
        "layer_classes": [f"{type(x).__module__}.{type(x).__qualname__}" for x in layers],
        "raw_bf16_bytes": raw_bf16_bytes(state) if layers else None,
        "state_bytes": nbytes(state),
        "skeleton": skeleton,
        "arrays_dir": arrays_dir,
        "arrays": infos,
        "meta": meta or {},
    }
    array_bytes = disk_bytes(os.path.join(path, arrays_dir))
    info["disk_bytes"] = 0
    for _ in range(4):  # the total includes meta.json, whose length depends on the number written into it
        text = json.dumps(info, indent=1)
        total = array_bytes + len(text.encode())
        if total == info["disk_bytes"]:
            break
        info["disk_bytes"] = total
    _write_meta(path, text)  # the commit point: before it the old state is intact, after it the new one is complete
    for name in os.listdir(path):  # older states' arrays (and leftovers of interrupted saves)
        if name != arrays_dir and _is_leftover(name):
            p = os.path.join(path, name)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)
    return info


def read_meta(path: str) -> dict:
    """The metadata of a saved state (see :func:`save_state`)."""
    fn = os.path.join(path, META_FILE)
    if not os.path.exists(fn):
        raise StateFileError(f"no saved KV state at {path!r} (missing {META_FILE})")
    with open(fn) as f:
        try:
            info = json.load(f)
        except json.JSONDecodeError as e:
            raise StateFileError(f"corrupt {fn}: {e}") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise StateFileError(f"{path!r} is not a kvjax KV state (format "
                             f"{info.get('format') if isinstance(info, dict) else info!r})")
    _check_meta_fields(info, fn)
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise StateFileError(f"{path!r} was written by a newer kvjax (format {info['format_version']}); "
                             f"this version reads format <= {FORMAT_VERSION}")
    return info


def _check_meta_fields(info: dict, fn: str) -> None:
    """Every field ``load_state`` reads is present with its type (a clear error naming the field otherwise)."""
    def need(d, key, types, where):
        if key not in d:
            raise StateFileError(f"corrupt {fn}: field {where}{key!r} is missing")
        if not isinstance(d[key], types) or isinstance(d[key], bool):
            raise StateFileError(f"corrupt {fn}: field {where}{key!r} is {d[key]!r}, expected "
                                 f"{' or '.join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))}")

    need(info, "format_version", int, "")
    need(info, "arrays", list, "")
    need(info, "skeleton", (dict, list), "")
    if "arrays_dir" in info:
        need(info, "arrays_dir", str, "")
    for i, a in enumerate(info["arrays"]):
        if not isinstance(a, dict):
            raise StateFileError(f"corrupt {fn}: arrays[{i}] is {a!r}, expected an object")
        need(a, "shape", list, f"arrays[{i}].")
        need(a, "dtype", str, f"arrays[{i}].")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in a["shape"]):
            raise StateFileError(f"corrupt {fn}: arrays[{i}].shape={a['shape']!r} is not a list of sizes")
        try:
            np.dtype(a["dtype"])
        except TypeError:
            raise StateFileError(f"corrupt {fn}: arrays[{i}].dtype={a['dtype']!r} is not a dtype") from None


def _config_diff(saved: dict | None, cfg) -> str:
    if saved is None:
        return ""
    now = config_dict(cfg)
    diffs = [f"{k}: saved {saved.get(k)!r} vs {now.get(k)!r}" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k)]
    return "; ".join(diffs[:6])


def _check_like(loaded, like, path: str, info: dict) -> None:
    la, ta = jax.tree_util.tree_flatten_with_path(loaded)
    lb, tb = jax.tree_util.tree_flatten_with_path(like)
    hint = (" — the file was written by a different model config or compression layout"
            + (f" (saved config: {info['config'].get('architecture')}, {info['config'].get('num_layers')} layers, "
               f"{info['config'].get('num_kv_heads')} KV heads, head_dim {info['config'].get('head_dim')})"
               if info.get("config") else ""))
    if ta != tb:
        na, nb = len(getattr(loaded, "layers", ())), len(getattr(like, "layers", ()))
        raise StateFileError(f"saved state at {path!r} does not match the expected state structure (layers: saved "
                             f"{na} {info.get('layer_classes')}, expected {nb}){hint}")
    for (p, a), (_, b) in zip(la, lb):
        if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
            raise StateFileError(f"saved state at {path!r}: {jax.tree_util.keystr(p)} has shape {tuple(a.shape)} "
                                 f"{np.dtype(a.dtype)}, expected {tuple(b.shape)} {np.dtype(b.dtype)}{hint}")


def _decode_cachegen(x: np.ndarray, a: dict, what: str) -> np.ndarray:
    """A stored CacheGen stream (uint8) -> the array of ``a["shape"]``/``a["dtype"]``, checked (SHA-256, CRC32)."""
    from kvjax.codec import cachegen  # noqa: PLC0415

    if x.dtype != np.uint8 or x.ndim != 1 or list(x.shape) != a.get("stored_shape"):
        raise StateFileError(f"{what}: cachegen stream is {x.shape} {x.dtype}, metadata says {a.get('stored_shape')} "
                             "uint8 (corrupt file)")
    if _sha256(x) != a.get("sha256"):
        raise StateFileError(f"{what}: SHA-256 checksum mismatch of its cachegen stream (the stored bytes are corrupt)")
    try:
        y = cachegen.decode(x.tobytes())
    except cachegen.CacheGenError as e:
        raise StateFileError(f"{what}: {e}") from None
    if list(y.shape) != a["shape"]:
        raise StateFileError(f"{what}: cachegen stream decodes to {y.shape}, metadata says {a['shape']} (corrupt file)")
    return y.astype(np.dtype(a["dtype"]))


def load_state(path: str, like=None, *, cfg=None):
    """Loads a state written by :func:`save_state`, bit-exact.

    ``cfg``: refuse a file written for another model config (fingerprint mismatch). ``like``: a state of the
    expected structure (e.g. ``model.init_state(...)`` passed through the same method): refuse a file whose layer
    classes, static layout, shapes or dtypes differ. Raises :class:`StateFileError` (a ``ValueError``).
    """
    import tensorstore as ts  # noqa: PLC0415

    info = read_meta(path)
    if cfg is not None:
        fp = info.get("config_fingerprint")
        if fp is None:
            raise StateFileError(f"saved state at {path!r} has no model config fingerprint; cannot check it against "
                                 f"the given config (save it with cfg=...)")
        if fp != config_fingerprint(cfg):
            raise StateFileError(f"saved state at {path!r} was written by a different model config "
                                 f"({_config_diff(info.get('config'), cfg)})")
    _check_classes(info.get("skeleton"))
    arrays_dir = os.path.join(path, info.get("arrays_dir", _ARRAYS_PREFIX))
    arrays = []
    for i, a in enumerate(info["arrays"]):
        what = f"array {i} ({a.get('name', '?')}) of the saved state at {path!r}"
        where = os.path.join(arrays_dir, str(i))
        coded = a.get("codec")
        if coded not in CODECS:
            raise StateFileError(f"{what}: unknown codec {coded!r} (corrupt {META_FILE} or a newer kvjax)")
        stored_shape = a.get("stored_shape", a["shape"]) if coded else a["shape"]
        if "chunk_shape" in a:
            keys = _chunk_keys(stored_shape, a["chunk_shape"])
            missing = [k for k in keys if not os.path.isfile(os.path.join(where, k))]
            if len(keys) != a.get("n_chunks", len(keys)) or missing:
                raise StateFileError(f"{what}: {len(missing)} of {len(keys)} chunk files missing (e.g. "
                                     f"{os.path.join(where, missing[0]) if missing else '?'}); the state is incomplete")
        try:
            store = ts.open(_spec(where)).result()
            x = np.asarray(store.read().result())
        except Exception as e:  # tensorstore raises ValueError subclasses with long messages
            raise StateFileError(f"cannot read {what}: {' '.join(str(e).split())}") from e
        if coded == "cachegen":
            arrays.append(jnp.asarray(_decode_cachegen(x, a, what)))
            continue
        if list(x.shape) != a["shape"] or _dtype_name(x.dtype) != a["dtype"]:
            raise StateFileError(f"{what} is {x.shape} {x.dtype}, metadata says {a['shape']} {a['dtype']} (corrupt "
                                 "file)")
        if a.get("xor_delta"):
            x = _xor_delta(x, 2, inverse=True)
        if "sha256" in a and _sha256(x) != a["sha256"]:
            raise StateFileError(f"{what}: SHA-256 checksum mismatch (the stored bytes are corrupt)")
        elif "sha256" not in a and info.get("format_version", 1) >= 2:
            raise StateFileError(f"{what}: no checksum in the metadata (corrupt {META_FILE})")
        arrays.append(jnp.asarray(x))
    state = _rebuild(info["skeleton"], arrays)
    if like is not None:
        _check_like(state, like, path, info)
    return state


__all__ = ["StateFileError", "config_fingerprint", "disk_bytes", "load_state", "raw_bf16_bytes", "read_meta",
           "save_state"]

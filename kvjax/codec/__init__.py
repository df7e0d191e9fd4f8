"""Lossy KV-cache codecs for storage and streaming (:mod:`kvjax.codec.cachegen`: CacheGen, arXiv 2310.07240)."""
from kvjax.codec.cachegen import CacheGenConfig, CacheGenError, decode, encode

__all__ = ["CacheGenConfig", "CacheGenError", "decode", "encode"]

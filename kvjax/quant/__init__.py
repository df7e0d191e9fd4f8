"""Quantized KV storage: bit packing, quantizers, and the QuantizedKV layer cache."""

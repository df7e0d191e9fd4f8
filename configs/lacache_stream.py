"""LaCache in its streaming setting (issue 14) on SmolLM2-135M: perplexity token by token through a fixed-size cache
(the setting the LaCache paper measures, on shorter streams here), against the full cache (which grows) and
StreamingLLM of the same size.

Every variant keeps 256 tokens per layer and head (LaCache's default ``cache_size``; StreamingLLM 4 sinks + 252
recent), LaCache alone and followed by per-token int8 (``chain(lacache, int8)``). Perplexity of 2 x 256 Shakespeare
tokens after a 768-token context: the context is compacted to the cache size after prefill, then every eval token is
decoded with the method's decode phase (LaCache's iterative compaction, StreamingLLM's ring), ``perplexity_stream``.
Decode speed is the eval tokens per second of the same run.

python -m kvjax.launch --config=configs/lacache_stream.py
"""
import ml_collections

from kvjax import configs

CACHE = 256


def get_config() -> ml_collections.ConfigDict:
    c = configs.experiment("runs/lacache_stream")
    c.methods = ml_collections.ConfigDict({
        "full": {},
        "streaming_llm": {"name": "streaming_llm", "n_sink": 4, "window": CACHE - 4},
        "lacache": {"name": "lacache", "cache_size": CACHE},
        "lacache_int8": {"name": "chain", "chain": ("lacache", "int8"), "lacache": {"cache_size": CACHE}, "int8": {}},
    })
    c.tasks = ml_collections.ConfigDict({})
    c.perplexity = ml_collections.ConfigDict({"enabled": True, "corpus": "shakespeare", "context_tokens": 768,
                                              "eval_tokens": 256, "n_segments": 2, "mode": ("stream",)})
    return c

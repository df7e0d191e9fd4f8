"""Perplexity like for like: decode-time and one-shot eviction methods scored in both settings, on SmolLM2-135M.

* ``perplexity_once``: the 768-token context is compressed once to 128 tokens per layer and KV head, then the next 256
  tokens are scored in one teacher-forced chunk while the cache grows (decode-time eviction off; how kvpress scores
  every press, and how one-shot methods are used);
* ``perplexity_stream``: the 256 tokens go through the cache one at a time with each method's decode phase:
  decode-time methods (StreamingLLM, H2O, Scissorhands, LazyEviction) hold a fixed-size cache, one-shot methods (SnapKV)
  have no decode phase and grow ("cache grows" in the tables).

Before this config the eviction table scored decode-time methods only in the stream setting and one-shot methods only
in the once setting, which made the decode-time methods look worse. 2 Shakespeare segments.

python -m kvjax.launch --config=configs/perplexity_settings.py
"""
import ml_collections

from kvjax import configs

BUDGET = 128


def get_config() -> ml_collections.ConfigDict:
    c = configs.experiment("runs/perplexity-settings")
    c.methods = ml_collections.ConfigDict({
        "full": {},
        "streaming_llm": {"n_sink": 4, "window": (BUDGET - 4,)},
        "h2o": {"budget": (BUDGET,)},
        "scissorhands": {"budget": (BUDGET,)},
        "lazy_eviction": {"budget": (BUDGET,)},
        "snapkv": {"budget": (BUDGET,)},
    })
    c.tasks = ml_collections.ConfigDict({})
    c.perplexity = ml_collections.ConfigDict({
        "enabled": True, "corpus": "shakespeare", "context_tokens": 768, "eval_tokens": 256, "n_segments": 2,
        "mode": ("once", "stream")})
    return c

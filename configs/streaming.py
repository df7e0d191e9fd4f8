"""StreamingLLM's claim, token by token: window-only attention collapses once the first tokens leave the cache,
attention sinks keep perplexity near the full cache (SmolLM2-135M, 640 streamed tokens of Shakespeare).

python -m kvjax.launch --config=configs/streaming.py
"""
import ml_collections

from kvjax import configs


def get_config() -> ml_collections.ConfigDict:
    c = configs.experiment("runs/streaming", max_new_tokens=8)
    c.methods = ml_collections.ConfigDict({
        "full": {},
        "streaming_llm": {"n_sink": 4, "window": (124,)},
        "window_only": {"name": "streaming_llm", "n_sink": 0, "window": (128,)},
        "h2o": {"budget": (128,)},
    })
    c.tasks = ml_collections.ConfigDict({})
    c.perplexity = ml_collections.ConfigDict({
        "enabled": True, "corpus": "shakespeare", "context_tokens": 128, "eval_tokens": 640, "n_segments": 2,
        "mode": "stream"})
    return c

"""A seconds-long smoke run on a tiny random model (tests use it; handy to check an install)."""
import ml_collections

from kvjax import configs


def get_config() -> ml_collections.ConfigDict:
    c = configs.experiment("runs/tiny", model="tiny-random", max_new_tokens=4)
    c.methods = ml_collections.ConfigDict({
        "full": {},
        "snapkv": {"budget": (48,), "window": 8},
        "streaming_llm": {"n_sink": 4, "window": 28},
    })
    c.tasks = ml_collections.ConfigDict({
        "passkey": {"context_tokens": (96,), "depths": (0.5,), "seeds": (0, 1), "kwargs": {"filler": "repeat"}},
    })
    c.perplexity = ml_collections.ConfigDict({
        "enabled": True, "corpus": "hamlet", "context_tokens": 64, "eval_tokens": 32, "n_segments": 2,
        "mode": ("once", "stream")})
    return c

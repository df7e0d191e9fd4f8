"""The smallest experiment that divides among processes (2 prompts = 2 units): the 2-process test runs it."""
import ml_collections

from kvjax import configs


def get_config() -> ml_collections.ConfigDict:
    c = configs.experiment("runs/tiny-distributed", model="tiny-random", precompile=False, max_new_tokens=2)
    c.mesh = ""  # e.g. "model:2" to shard each process's work over its local devices
    c.methods = ml_collections.ConfigDict({"full": {}, "streaming_llm": {"n_sink": 4, "window": 28}})
    c.tasks = ml_collections.ConfigDict({
        "passkey": {"context_tokens": (64,), "depths": (0.5,), "seeds": (0, 1), "kwargs": {"filler": "repeat"}},
    })
    c.perplexity = ml_collections.ConfigDict({"enabled": False, "corpus": "hamlet", "context_tokens": 32,
                                              "eval_tokens": 8, "n_segments": 2, "mode": "chunk"})
    return c

"""Gemma 3 270M (hybrid local/global attention): full cache vs eviction and quantization on its global layers.

python -m kvjax.launch --config=configs/gemma3_methods.py
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_dir = "runs/gemma3-methods"
    c.model = ml_collections.ConfigDict({"name": "gemma3-270m", "dtype": "float32"})
    c.precompile = True  # compile every program before its timed call, so no timing includes compilation
    c.prompt_style = "plain"
    c.max_new_tokens = 10
    c.methods = ml_collections.ConfigDict({
        "full": {},
        "streaming_llm": {"n_sink": 4, "window": (124,)},
        "snapkv": {"budget": (128,)},
        "h2o": {"budget": (128,)},
        "kivi": {"bits": (2,)},
    })
    c.tasks = ml_collections.ConfigDict({
        "passkey": {"context_tokens": (1024,), "depths": (0.5,), "seeds": (0, 1),
                    "kwargs": {"filler": "shakespeare"}},
        "niah_single": {"context_tokens": (1024,), "depths": (0.5,), "seeds": (0,),
                        "kwargs": {"filler": "wikipedia"}},
    })
    c.perplexity = ml_collections.ConfigDict({
        "enabled": True, "corpus": "hamlet", "context_tokens": 768, "eval_tokens": 256, "n_segments": 2,
        "mode": "chunk"})
    return c

"""Quantization methods (packed storage) vs the full cache on SmolLM2-135M at ~1K tokens, plus SnapKV + KIVI.

python -m kvjax.launch --config=configs/quantization.py
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_dir = "runs/quantization"
    c.model = ml_collections.ConfigDict({"name": "smollm2-135m", "dtype": "float32"})
    c.precompile = True  # compile every program before its timed call, so no timing includes compilation
    c.prompt_style = "plain"
    c.max_new_tokens = 10
    c.methods = ml_collections.ConfigDict({
        "full": {},
        "int8": {},
        "int4": {},
        "kivi": {"bits": (2, 4)},
        "gear": {"bits": (2, 4)},
        "mikv": {},
        "rotatekv": {},
        "snapkv_kivi2": {"name": "chain", "chain": ("snapkv", "kivi"), "snapkv": {"budget": 256}, "kivi": {"bits": 2}},
    })
    c.tasks = ml_collections.ConfigDict({
        "niah_single": {"context_tokens": (1024,), "depths": (0.25, 0.75), "seeds": (0, 1),
                        "kwargs": {"filler": "shakespeare"}},
        "passkey": {"context_tokens": (1024,), "depths": (0.25, 0.75), "seeds": (0,),
                    "kwargs": {"filler": "shakespeare"}},
    })
    c.perplexity = ml_collections.ConfigDict({
        "enabled": True, "corpus": "shakespeare", "context_tokens": 768, "eval_tokens": 256, "n_segments": 2,
        "mode": "chunk"})
    return c

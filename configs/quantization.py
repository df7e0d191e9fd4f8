"""Quantization methods (packed storage) vs the full cache on SmolLM2-135M at ~1K tokens, plus SnapKV + KIVI.

MiKV is run at its default (20% of the prompt in high precision) and, beside H2O, at the same high-precision budget
(204 tokens per head, half recent): MiKV keeps H2O's evicted tokens in 2 bits instead of dropping them. RotateKV uses
the shipped SmolLM2 channel-reordering calibration (Wikipedia text; ``scripts/calibrate_rotatekv.py``).

python -m kvjax.launch --config=configs/quantization.py
"""
import ml_collections

from kvjax import configs


def get_config() -> ml_collections.ConfigDict:
    c = configs.experiment("runs/quantization")
    c.methods = ml_collections.ConfigDict({
        "full": {},
        "int8": {},
        "int4": {},
        "kivi": {"bits": (2, 4)},
        "gear": {"bits": (2, 4)},
        "mikv": {},
        "mikv_hi204": {"name": "mikv", "hi_budget": 204},
        "h2o_204": {"name": "h2o", "budget": 204},
        "rotatekv": {"calibration": "kvjax/data/rotatekv/smollm2-135m.npz"},
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
        "mode": ("once", "stream")})
    return c

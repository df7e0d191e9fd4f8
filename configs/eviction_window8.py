"""SnapKV's uniform allocation with PyramidKV's scoring defaults (observation window 8, max pooling with kernel 7):
the row that tells whether PyramidKV's needles in the papers'-defaults table (``configs/eviction_changed.py``) come
from its pyramid or from its scoring. Same cells as the eviction tables (8 single-needle prompts, perplexity compressed
once), budget 128.

python -m kvjax.launch --config=configs/eviction_window8.py             (SmolLM2-135M)
python -m kvjax.launch --config=configs/eviction_window8.py:gemma3-270m
"""
import ml_collections

from kvjax import configs

_shared = configs.sibling_module(__file__, "eviction_shared")


def get_config(model: str = "") -> ml_collections.ConfigDict:
    c = _shared.get_config(model)
    c.run_dir = f"runs/eviction-window8-{model}" if model else "runs/eviction-window8"
    c.methods = ml_collections.ConfigDict({
        "full": {},
        "snapkv_w8": {"name": "snapkv", "budget": (_shared.BUDGET,), "window": 8, "kernel": 7, "pooling": "maxpool"},
    })
    c.perplexity.mode = ("once",)
    return c

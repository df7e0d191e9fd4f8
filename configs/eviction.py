"""Every eviction / merging method at its paper's (or authors' code's) default scoring settings vs the full cache, on
SmolLM2-135M at ~1K tokens: the *papers' defaults* table. Methods differ here in scoring window, pooling kernel and
pooling kind as well as in budget allocation (SnapKV W32/k5/avg, PyramidKV W8/k7/max, AdaKV W32/k7/max with GQA mean
before pooling, CAKE W32/k5/avg with its variance term, KVCrush on SnapKV's defaults), so a difference between two
SnapKV-family rows is not an allocation effect alone; ``configs/eviction_shared.py`` isolates the allocation.

Cells: 8 single-needle prompts (4 depths x 2 seeds, Shakespeare filler, ~1K tokens) per method and budget, with 95%
Wilson intervals; perplexity of 2 x 256 Shakespeare tokens after a 768-token context in both settings, labelled:
``perplexity_once`` (compressed once, then the cache grows over the continuation; decode-time eviction off, as kvpress
scores every press) and ``perplexity_stream`` (token by token with each method's decode phase: decode-time methods
hold a fixed-size cache, one-shot methods have no decode phase and grow). Bytes: allocated and valid entries.

python -m kvjax.launch --config=configs/eviction.py
Gemma 3 270M instead of SmolLM2 (retrieves better): --config.model.name=gemma3-270m
"""
import ml_collections

from kvjax import configs

BUDGETS = (128, 256)
NEEDLES = {"context_tokens": (1024,), "depths": (0.2, 0.4, 0.6, 0.8), "seeds": (0, 1),
           "kwargs": {"filler": "shakespeare"}}
PERPLEXITY = {"enabled": True, "corpus": "shakespeare", "context_tokens": 768, "eval_tokens": 256, "n_segments": 2,
              "mode": ("once", "stream")}


def methods(budgets) -> dict:
    b = tuple(budgets)
    return {
        "full": {},
        "streaming_llm": {"n_sink": 4, "window": tuple(x - 4 for x in b)},
        "window_only": {"name": "streaming_llm", "n_sink": 0, "window": b},
        **{m: {"budget": b} for m in ("snapkv", "pyramidkv", "adakv", "cake", "h2o", "scissorhands", "keyformer",
                                      "lazy_eviction", "d2o", "kvcrush")},
    } | {"adakv": {"budget": b, "fixed_shapes": True}}  # static ragged sizes: one program for all prompts


def get_config() -> ml_collections.ConfigDict:
    c = configs.experiment("runs/eviction")
    c.methods = ml_collections.ConfigDict(methods(BUDGETS))
    c.tasks = ml_collections.ConfigDict({"niah_single": dict(NEEDLES)})
    c.perplexity = ml_collections.ConfigDict(dict(PERPLEXITY))
    return c

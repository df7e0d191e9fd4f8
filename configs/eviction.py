"""Every eviction / merging method at two budgets vs the full cache, on SmolLM2-135M at ~1K tokens.

python -m kvjax.launch --config=configs/eviction.py
"""
import ml_collections

BUDGETS = (128, 256)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_dir = "runs/eviction"
    c.model = ml_collections.ConfigDict({"name": "smollm2-135m", "dtype": "float32"})
    c.precompile = True  # compile every program before its timed call, so no timing includes compilation
    c.prompt_style = "plain"
    c.max_new_tokens = 10
    c.methods = ml_collections.ConfigDict({
        "full": {},
        "streaming_llm": {"n_sink": 4, "window": tuple(b - 4 for b in BUDGETS)},
        "window_only": {"name": "streaming_llm", "n_sink": 0, "window": BUDGETS},
        "snapkv": {"budget": BUDGETS},
        "pyramidkv": {"budget": BUDGETS},
        "adakv": {"budget": BUDGETS},
        "cake": {"budget": BUDGETS},
        "h2o": {"budget": BUDGETS},
        "scissorhands": {"budget": BUDGETS},
        "keyformer": {"budget": BUDGETS},
        "lazy_eviction": {"budget": BUDGETS},
        "d2o": {"budget": BUDGETS},
        "kvcrush": {"budget": BUDGETS},
    })
    c.tasks = ml_collections.ConfigDict({
        "niah_single": {"context_tokens": (1024,), "depths": (0.25, 0.75), "seeds": (0,),
                        "kwargs": {"filler": "shakespeare"}},
    })
    c.perplexity = ml_collections.ConfigDict({
        "enabled": True, "corpus": "shakespeare", "context_tokens": 768, "eval_tokens": 256, "n_segments": 2,
        "mode": "chunk"})
    return c

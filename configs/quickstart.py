"""Quickstart: the embedded SmolLM2-135M, full cache vs each method at 2 budgets, passkey + needle + perplexity.

Sized to finish in about 10 minutes on 2 CPU cores. Run: ``python -m kvjax.launch --config=configs/quickstart.py``.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_dir = "runs/quickstart"
    c.model = ml_collections.ConfigDict({"name": "smollm2-135m", "dtype": "float32"})
    c.retime_first = True  # time a second run of each compiled shape, so no timing includes compilation
    c.prompt_style = "auto"
    c.max_new_tokens = 10
    # Method name -> hyper-parameters; a list/tuple is a sweep. Defaults are the papers'.
    c.methods = ml_collections.ConfigDict({
        "full": {},
        "streaming_llm": {"n_sink": 4, "window": (124, 252)},
        "snapkv": {"budget": (128, 256), "window": 16},
    })
    # Task name -> lengths (model tokens), needle depths, seeds (one example each), generator kwargs.
    c.tasks = ml_collections.ConfigDict({
        "passkey": {"context_tokens": (1024,), "depths": (0.2, 0.5, 0.8), "seeds": (0, 1),
                    "kwargs": {"filler": "repeat"}},
        "niah_single": {"context_tokens": (1024,), "depths": (0.25, 0.75), "seeds": (0, 1),
                        "kwargs": {"filler": "shakespeare"}},
    })
    c.perplexity = ml_collections.ConfigDict({
        "enabled": True, "corpus": "shakespeare", "context_tokens": 768, "eval_tokens": 256, "n_segments": 2,
        "mode": "chunk"})
    return c

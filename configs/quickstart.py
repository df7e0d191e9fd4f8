"""Quickstart: the embedded SmolLM2-135M, the full cache vs one method of each family at two settings.

Passkey and single-needle retrieval at ~1K tokens (Shakespeare filler) and perplexity on Shakespeare, with quality,
KV bytes, compression ratio and decode speed against the full cache of the same run. Measured: 13 minutes on a
shared 2-core CPU with a warm XLA compilation cache; a cold first run takes longer (see the README). Every registered method is compared in configs/eviction.py and
configs/quantization.py.

Run: ``python -m kvjax.launch --config=configs/quickstart.py``
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_dir = "runs/quickstart"
    c.model = ml_collections.ConfigDict({"name": "smollm2-135m", "dtype": "float32"})
    c.retime_first = True  # time a second run of each compiled shape, so no timing includes compilation
    c.prompt_style = "auto"
    c.max_new_tokens = 10
    # Method name -> hyper-parameters; a tuple is a sweep. Unlisted hyper-parameters take the paper's defaults.
    c.methods = ml_collections.ConfigDict({
        "full": {},
        "streaming_llm": {"n_sink": 4, "window": (124, 252)},
        "snapkv": {"budget": (128, 256)},
        "h2o": {"budget": (128, 256)},
        "kivi": {"bits": (2, 4)},
        "snapkv_kivi2": {"name": "chain", "chain": ("snapkv", "kivi"), "snapkv": {"budget": 256}, "kivi": {"bits": 2}},
    })
    # Task name -> lengths (model tokens), needle depths, seeds (one example each), generator kwargs.
    c.tasks = ml_collections.ConfigDict({
        "niah_single": {"context_tokens": (1024,), "depths": (0.25, 0.75), "seeds": (0, 1),
                        "kwargs": {"filler": "shakespeare"}},
        "passkey": {"context_tokens": (1024,), "depths": (0.5,), "seeds": (0, 1),
                    "kwargs": {"filler": "shakespeare"}},
    })
    c.perplexity = ml_collections.ConfigDict({
        "enabled": True, "corpus": "shakespeare", "context_tokens": 768, "eval_tokens": 256, "n_segments": 2,
        "mode": "chunk"})
    return c

"""Quickstart: the embedded SmolLM2-135M, the full cache vs every registered method at two settings.

Every eviction / merging method at 128 and 256 tokens per layer and head (1/8 and 1/4 of a 1K-token prompt), every
quantizer at two bit widths (int8 / int4 for plain round-to-nearest), and one chain (SnapKV then KIVI). Tasks:
passkey and single-needle retrieval at ~1K tokens (Shakespeare filler, one example each) and perplexity of 128
Shakespeare tokens after a 512-token compressed context (two segments; methods with a decode phase are scored token by
token through their cache). Reported per method: quality, KV bytes, compression ratio and decode speed against the
full cache of the same run. Larger comparisons: configs/eviction.py, configs/quantization.py.

Run: ``python -m kvjax.launch --config=configs/quickstart.py`` (wall time on a 2-core CPU: see the README).
"""
import ml_collections

BUDGETS = (128, 256)
EVICTION = ("snapkv", "pyramidkv", "adakv", "cake", "h2o", "scissorhands", "keyformer", "lazy_eviction", "d2o",
            "kvcrush")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_dir = "runs/quickstart"
    c.model = ml_collections.ConfigDict({"name": "smollm2-135m", "dtype": "float32"})
    c.precompile = True  # compile every program before its timed call, so no timing includes compilation
    c.prompt_style = "auto"
    c.max_new_tokens = 10
    # Method name -> hyper-parameters; a tuple is a sweep. Unlisted hyper-parameters take the paper's defaults.
    methods = {"full": {}, "streaming_llm": {"n_sink": 4, "window": tuple(b - 4 for b in BUDGETS)}}
    methods.update({m: {"budget": BUDGETS} for m in EVICTION})
    methods.update({
        "int8": {}, "int4": {},
        "kivi": {"bits": (2, 4)},
        "gear": {"bits": (2, 4)},
        "mikv": {"lo_bits": (2, 4)},
        "rotatekv": {"bits": (2, 4)},
        "snapkv_kivi2": {"name": "chain", "chain": ("snapkv", "kivi"), "snapkv": {"budget": 256}, "kivi": {"bits": 2}},
    })
    c.methods = ml_collections.ConfigDict(methods)
    # Task name -> lengths (model tokens), needle depths, seeds (one example each), generator kwargs.
    c.tasks = ml_collections.ConfigDict({
        "niah_single": {"context_tokens": (1024,), "depths": (0.5,), "seeds": (0,),
                        "kwargs": {"filler": "shakespeare"}},
        "passkey": {"context_tokens": (1024,), "depths": (0.5,), "seeds": (0,),
                    "kwargs": {"filler": "shakespeare"}},
    })
    c.perplexity = ml_collections.ConfigDict({
        "enabled": True, "corpus": "shakespeare", "context_tokens": 512, "eval_tokens": 128, "n_segments": 2,
        "mode": "chunk"})
    return c

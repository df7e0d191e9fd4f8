"""Quickstart: the embedded SmolLM2-135M, the full cache vs representative compression methods of each family.

Eviction at 128 tokens per layer and head (1/8 of a 1K-token prompt): StreamingLLM (recency), SnapKV, PyramidKV
(per-layer budgets), AdaKV (per-head budgets, ragged storage), KVCrush (representatives on top of SnapKV), H2O
(decode-time heavy hitters); quantization at the papers' default bits: KIVI-2, RotateKV-2 and a plain per-token int4.
Task: single-needle retrieval at ~1K tokens, 8 prompts per method (4 depths x 2 seeds, Shakespeare filler, padded to
one shape; accuracy with a 95% Wilson interval, and the teacher-forced answer log-probability). Reported per method:
quality, KV bytes allocated and bytes of valid entries, compression ratios and decode speed against the full cache of
the same run.

It is sized to finish within 10 minutes on 2 CPU cores with a cold compilation cache. Compiling each method's
programs (~20-60 s per method and prompt shape on such a CPU) dominates, so the quickstart keeps one prompt shape and
ten variants. Every other registered method (CAKE, D2O, Scissorhands, Keyformer, LazyEviction, GEAR, MiKV, int8, the
structural and trained methods) runs in the family configs: ``configs/eviction.py``, ``configs/eviction_shared.py``,
``configs/eviction_changed.py``, ``configs/quantization.py``, ``configs/heads_channels.py``. CAKE and D2O compile
their programs once per prompt (their per-layer cache sizes are found on the host), Keyformer scores every prompt
query, GEAR and MiKV compile for over a minute: together they would double the quickstart's time. Perplexity (a second
shape) is left to those configs too; add it here with ``--config.perplexity.enabled=True``.

Run: ``python -m kvjax.launch --config=configs/quickstart.py``
"""
import ml_collections

from kvjax import configs

BUDGET = 128
EVICTION = ("snapkv", "pyramidkv", "adakv", "kvcrush", "h2o")


def get_config() -> ml_collections.ConfigDict:
    c = configs.experiment("runs/quickstart", prompt_style="auto")
    # Method name -> hyper-parameters; a tuple is a sweep. Unlisted hyper-parameters take the paper's defaults.
    methods = {"full": {}, "streaming_llm": {"n_sink": 4, "window": (BUDGET - 4,)}}
    methods.update({m: {"budget": (BUDGET,)} for m in EVICTION})
    methods["adakv"]["fixed_shapes"] = True  # static ragged sizes: one compiled program for all prompts
    methods.update({"kivi": {"bits": (2,)}, "rotatekv": {"bits": (2,)}, "int4": {}})
    c.methods = ml_collections.ConfigDict(methods)
    # Task name -> lengths (model tokens), needle depths, seeds (one example each), generator kwargs.
    c.tasks = ml_collections.ConfigDict({
        "niah_single": {"context_tokens": (1024,), "depths": (0.2, 0.4, 0.6, 0.8), "seeds": (0, 1),
                        "kwargs": {"filler": "shakespeare"}},
    })
    c.perplexity = ml_collections.ConfigDict({
        "enabled": False, "corpus": "shakespeare", "context_tokens": 512, "eval_tokens": 64, "n_segments": 1,
        "mode": ("once",)})
    return c

"""Per-head storage and channel pruning (issue 14) on SmolLM2-135M at ~1K tokens: AdaKV with ragged vs padded
storage at the same kept tokens, RazorAttention (with and without its count-weighted compensation token) and ThinK
(40% of key channels pruned) on top of SnapKV-128, the cross-layer methods xKV (groups of 4 layers, the authors'
rank fractions) and MiniCache (SLERP merge of adjacent layers from the middle on), xKV on top of SnapKV-128, LaCache,
and the quantized chains below, against the full cache and SnapKV-128 alone, all in one run (decode speed vs the full
cache of the same run). Variants run in the order listed (a resumed run continues where it stopped).

Cells: 8 single-needle prompts (4 depths x 2 seeds, Shakespeare filler, ~1K tokens) per method, answer
log-probability, perplexity of 2 x 256 Shakespeare tokens after a 768-token compressed context (compressed once),
KV bytes and decode speed vs the full cache in the same run.

RazorAttention's threshold S0 = 4000 tokens would leave a 1K prompt uncompressed, so ``min_buffer=0`` here (local
buffer = N / 5 = ~205 tokens + 4 sinks + 1 compensation token in the non-retrieval heads; 15% of KV heads are
retrieval heads, found with the echo/induction probe).

Composed chains (eviction -> method -> quantizer): SnapKV-128 -> xKV -> int4 (per token, groups of 16 channels:
they divide xKV's factor widths 96 / 144 and the head dim 64), SnapKV-128 -> MiniCache -> KIVI-4 (the paper's 4-bit
combination), SnapKV-128 -> ThinK -> int8 (ThinK's 39 kept key channels fit int8, not KIVI's 2-bit packing),
LaCache-128 (its ladder after the prompt, then compaction while decoding) and LaCache-128 -> int8. LaCache
in its streaming setting (perplexity token by token with the fixed-size cache) is ``configs/lacache_stream.py``.

python -m kvjax.launch --config=configs/heads_channels.py
Gemma 3 270M: --config.model.name=gemma3-270m --config.run_dir=runs/heads_channels_gemma (the methods act on its
global layers only; see the README).
"""
import ml_collections

from kvjax import configs

NEEDLES = {"context_tokens": (1024,), "depths": (0.2, 0.4, 0.6, 0.8), "seeds": (0, 1),
           "kwargs": {"filler": "shakespeare"}}
PERPLEXITY = {"enabled": True, "corpus": "shakespeare", "context_tokens": 768, "eval_tokens": 256, "n_segments": 2,
              "mode": ("once",)}


NEW = ("full", "snapkv_xkv_int4", "snapkv_minicache_kivi4", "lacache", "lacache_int8", "snapkv_think_int8", "snapkv")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """``arg``: ``""`` every variant; ``"new"`` the full cache, this run's new variants and SnapKV only (the cells are
    the same: a later run of the whole config in the same run directory reuses them)."""
    if arg not in ("", "new"):
        raise ValueError(f"configs/heads_channels.py:{arg}: choose '' (every variant) or 'new'")
    c = configs.experiment("runs/heads_channels")
    # The new variants of this run first (a run cut short keeps them), then the re-measured ones.
    c.methods = ml_collections.ConfigDict({
        "full": {},
        "snapkv_xkv_int4": {"name": "chain", "chain": ("snapkv", "xkv", "int4"), "snapkv": {"budget": 128},
                            "xkv": {}, "int4": {"group": 16}},
        "snapkv_minicache_kivi4": {"name": "chain", "chain": ("snapkv", "minicache", "kivi"),
                                   "snapkv": {"budget": 128}, "minicache": {}, "kivi": {"bits": 4}},
        "lacache": {"name": "lacache", "cache_size": 128},
        "lacache_int8": {"name": "chain", "chain": ("lacache", "int8"), "lacache": {"cache_size": 128}, "int8": {}},
        "snapkv_think_int8": {"name": "chain", "chain": ("snapkv", "think", "int8"), "snapkv": {"budget": 128},
                              "think": {}, "int8": {}},
        "snapkv": {"name": "snapkv", "budget": 128},
        "snapkv_xkv": {"name": "chain", "chain": ("snapkv", "xkv"), "snapkv": {"budget": 128}, "xkv": {}},
        "xkv": {"name": "xkv"},
        "minicache": {"name": "minicache"},
        "snapkv_think": {"name": "chain", "chain": ("snapkv", "think"), "snapkv": {"budget": 128}, "think": {}},
        "razor": {"name": "razor", "min_buffer": 0},
        # Measured in an earlier run of this file (README), left out of this one for the time the shared 2-core
        # machine allowed:
        # "adakv_ragged": {"name": "adakv", "budget": 128},
        # "razor_unweighted": {"name": "razor", "min_buffer": 0, "count_weight": False},
        # "adakv_padded": {"name": "adakv", "budget": 128, "storage": "padded"},
    })
    if arg == "new":
        c.methods = ml_collections.ConfigDict({k: v for k, v in c.methods.to_dict().items() if k in NEW})
    c.tasks = ml_collections.ConfigDict({"niah_single": dict(NEEDLES)})
    c.perplexity = ml_collections.ConfigDict(dict(PERPLEXITY))
    return c

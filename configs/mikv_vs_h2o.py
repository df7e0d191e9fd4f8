"""MiKV vs H2O at the same high-precision budget on SmolLM2-135M (issue 11).

MiKV ("No Token Left Behind", arXiv 2402.18096) claims that keeping the tokens H2O evicts in low precision (2 bits)
instead of dropping them preserves quality that eviction loses. Here both keep the same ``B`` tokens per layer and head
in full precision, chosen the same way (H2O's accumulated attention, half heavy hitters and half recent tokens, scores
summed over the query heads of a KV head); MiKV additionally keeps every other token in 2 bits (per-token groups of
32 channels, its outlier-aware channel balancer on; also with a 4-bit low part, the paper's INT4 setting). B = 64
and 128 of a ~1K-token prompt. Task: single-needle
retrieval, 8 prompts (4 depths x 2 seeds, Shakespeare filler; accuracy with a Wilson interval and the teacher-forced
answer log-probability) and perplexity of 256 Shakespeare tokens after 768 in both settings (compressed once then
growing; streaming token by token with the methods' decode phases: H2O evicts, MiKV demotes to 2 bits).

nice -n 10 python -m kvjax.launch --config=configs/mikv_vs_h2o.py
"""
import ml_collections

from kvjax import configs

BUDGETS = (64, 128)


def get_config() -> ml_collections.ConfigDict:
    c = configs.experiment("runs/mikv_vs_h2o")
    methods = {"full": {}}
    for b in BUDGETS:
        methods[f"h2o_{b}"] = {"name": "h2o", "budget": b}
        methods[f"mikv_hi{b}"] = {"name": "mikv", "hi_budget": b}
        methods[f"mikv_hi{b}_lo4"] = {"name": "mikv", "hi_budget": b, "lo_bits": 4}  # the paper's INT4 low part
    c.methods = ml_collections.ConfigDict(methods)
    c.tasks = ml_collections.ConfigDict({
        "niah_single": {"context_tokens": (1024,), "depths": (0.2, 0.4, 0.6, 0.8), "seeds": (0, 1),
                        "kwargs": {"filler": "shakespeare"}},
    })
    c.perplexity = ml_collections.ConfigDict({
        "enabled": True, "corpus": "shakespeare", "context_tokens": 768, "eval_tokens": 256, "n_segments": 1,
        "mode": ("once", "stream")})
    return c

"""Evaluate trained compressors by path with the experiment harness: ``python -m kvjax.launch
--config=configs/locret_eval.py`` after ``configs/locret_train.py`` (the DuoAttention gates default to the committed
``docs/results/duo_smollm2_gates``, trained by ``configs/duo_train.py``; ``runs/duo/ckpt`` after a new training).

The harness prefills each prompt once and compresses it one-shot, so Locret scores and evicts the whole prompt at
once here (the same final cache policy, without the bounded prefill memory); ``benchmarks/trained_compressors.py``
runs Locret's chunked prefill and reports peak prefill bytes. Perplexity: the context compressed once, then the
continuation scored while the cache grows (``once``, as the other tables since issue 11).
"""
import ml_collections

from kvjax import configs


def get_config() -> ml_collections.ConfigDict:
    c = configs.experiment("runs/locret_eval", max_new_tokens=8)
    c.methods = ml_collections.ConfigDict({
        "full": {},
        "snapkv": {"budget": (64,)},
        "h2o": {"budget": (64,)},
        "locret": {"heads": "runs/locret/ckpt", "budget": (64,), "chunk_size": 32, "stabilizers": 24,
                   "local_len": 8},
        "duo_attention": {"gates": "docs/results/duo_smollm2_gates", "sparsity": (0.5,), "n_sink": 16, "recent": 48},
    })
    c.tasks = ml_collections.ConfigDict({
        "niah_single": {"context_tokens": (512,), "depths": (0.1, 0.3, 0.5, 0.7), "seeds": (0, 1),
                        "kwargs": {"filler": "wikipedia"}},
    })
    c.perplexity = ml_collections.ConfigDict({
        "enabled": True, "corpus": "wikipedia", "context_tokens": 384, "eval_tokens": 64, "n_segments": 1,
        "mode": ("once",)})
    return c

"""Locret retaining heads on Gemma 3 270M (CPU): ``python -m kvjax.launch --config=configs/locret_train_gemma.py``.
Writes runs/locret-gemma3/{metrics.jsonl, loss_curve.png, summary.json, ckpt/}; evaluate with
``get_method("locret", heads="runs/locret-gemma3/ckpt", ...)`` (``benchmarks/trained_compressors.py locret --model
gemma3-270m``).

The recipe of ``configs/locret_train.py`` (the authors' AdamW (0.9, 0.95), lr 5e-4, linear warmup/decay,
per-element clipping at 0.5, Smooth-L1 + 0.0025 x smoothness; head width 256; 300 steps of one sequence) on Gemma 3
270M. Only the 3 global layers (5, 11, 17) get targets and gradients: Locret leaves the 15 sliding-window layers (512
tokens) alone at inference, so their heads (present in the artefact, one per layer like every kvjax head set) stay at
their initialisation and are never used. Sequences are 768 tokens, longer than the local window, so that the later
queries' attention in the global layers covers tokens the local layers no longer see (Wikipedia windows start with
BOS, as Gemma expects).
"""
import ml_collections

from kvjax import configs

_base = configs.sibling_module(__file__, "locret_train")


def get_config() -> ml_collections.ConfigDict:
    c = _base.get_config()
    c.run_dir = "runs/locret-gemma3"
    c.model.name = "gemma3-270m"
    c.train.data.seq_len = 768
    c.train.data.query_tokens = 64
    return c

"""configs/eviction.py (each paper's own scoring defaults) restricted to what fits a shared 2-core machine: budget 128
only, the rows issue 11 changed (PyramidKV with layer budgets from the prompt's length, AdaKV with FFY0's rule,
Scissorhands keeping B after prefill, Keyformer scoring all prompt queries) and the rows they are read against (full
cache, StreamingLLM 4 + 124, SnapKV, H2O); 8 single-needle prompts per row as configs/eviction.py, perplexity only
compressed once (then growing; decode-time eviction off, as kvpress scores every press), not token by token.
KIVI-2 (its paper's defaults) is the reference quantizer row: another way to an ~5x smaller cache that keeps every
token.

python -m kvjax.launch --config=configs/eviction_changed.py
Gemma 3 270M, same cells (run dir ``runs/eviction_changed-gemma3-270m``):
``--config=configs/eviction_changed.py:gemma3-270m``.
On Gemma 3 the methods act on its 3 global layers; its 15 sliding-window layers keep their 512-slot rings.
"""
import ml_collections

from kvjax import configs

_base = configs.sibling_module(__file__, "eviction")

KEEP = ("full", "streaming_llm", "snapkv", "pyramidkv", "adakv", "h2o", "scissorhands", "keyformer")
ORDER = KEEP[:6] + ("kivi",) + KEEP[6:]


def get_config(model: str = ""):
    """``model`` (``--config=configs/eviction_changed.py:<model>``): another model than SmolLM2-135M, same cells, run
    directory suffixed with its name."""
    c = _base.get_config()
    c.run_dir = f"runs/eviction_changed-{model}" if model else "runs/eviction_changed"
    if model:
        c.model.name = model
    methods = c.methods.to_dict()
    methods["streaming_llm"]["window"] = (124,)
    for name in KEEP[2:]:
        methods[name]["budget"] = (128,)
    methods["kivi"] = {"bits": (2,)}
    c.methods = ml_collections.ConfigDict({name: methods[name] for name in ORDER})  # the run's order
    c.perplexity.mode = ("once",)
    return c

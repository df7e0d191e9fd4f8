"""configs/quantization.py restricted to the methods issue 11 changed (KIVI, GEAR, MiKV, RotateKV) and the rows they
are compared with (full cache, H2O at MiKV's high-precision budget), at a reduced size that fits a shared 2-core
machine: 2 needle prompts (1024 tokens, depths 0.25 / 0.75), no passkey, perplexity of 128 tokens after a 768-token
context (1 Shakespeare window), compressed once then growing (no token-by-token setting); MiKV only at H2O's budget,
KIVI only at 2 bits.

python -m kvjax.launch --config=configs/quantization_changed.py
"""
from kvjax import configs

_base = configs.sibling_module(__file__, "quantization")


def get_config():
    c = _base.get_config()
    c.run_dir = "runs/quantization_changed"
    for name in ("int8", "int4", "snapkv_kivi2", "mikv"):
        del c.methods[name]
    c.methods.kivi.bits = (2,)
    c.perplexity.mode = ("once",)
    del c.tasks["passkey"]
    c.tasks.niah_single.seeds = (0,)
    c.perplexity.eval_tokens = 128
    c.perplexity.n_segments = 1
    return c

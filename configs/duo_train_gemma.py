"""DuoAttention gates on Gemma 3 270M (CPU): ``python -m kvjax.launch --config=configs/duo_train_gemma.py``. Writes
runs/duo-gemma3/{metrics.jsonl, loss_curve.png, gates.png, summary.json, ckpt/}; deploy with
``get_method("duo_attention", gates="runs/duo-gemma3/ckpt", sparsity=1/3, n_sink=16, recent=64)``.

The recipe of ``configs/duo_train.py`` (the authors' AdamW lr 0.02, L1 weight 0.05, gates initialised at 1 and
clamped to [0, 1], trapezoid schedule, passkey / needle data, distillation on the answer tokens; 16 sinks + 64 recent
tokens) on Gemma 3 270M. Gemma 3's 15 sliding-window layers (512 tokens) are already local and get no gate: the 3
global layers (5, 11, 17) x 1 KV head are the 3 trained gates. The examples are 768 tokens long, longer than the
local window, so that for needles in the first third only the global layers can see them (with SmolLM2's 320 tokens
every layer of Gemma would see the whole example and the gates would not learn what the global layers carry).
12 steps of one example, as for SmolLM2 (the authors: 2,000 steps of 1K-32K tokens).
"""
import ml_collections

from kvjax import configs

_base = configs.sibling_module(__file__, "duo_train")


def get_config() -> ml_collections.ConfigDict:
    c = _base.get_config()
    c.run_dir = "runs/duo-gemma3"
    c.model.name = "gemma3-270m"
    c.train.data.seq_len = 768
    return c

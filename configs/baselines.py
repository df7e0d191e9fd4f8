"""Full-cache baselines of the embedded models at 2K/4K/8K tokens: can the uncompressed model do each task at all?

Run once per model:
    python -m kvjax.launch --config=configs/baselines.py --config.model.name=smollm2-135m --config.run_dir=runs/baselines-smollm2
    python -m kvjax.launch --config=configs/baselines.py --config.model.name=gemma3-270m --config.run_dir=runs/baselines-gemma3
"""
import ml_collections

from kvjax import configs


def get_config() -> ml_collections.ConfigDict:
    c = configs.experiment("runs/baselines", precompile=False)  # speed is not the point: timings include compiling
    c.methods = ml_collections.ConfigDict({"full": {}})
    lengths = (2048, 4096, 8192)
    c.tasks = ml_collections.ConfigDict({
        "passkey": {"context_tokens": lengths, "depths": (0.25, 0.75), "seeds": (0,),
                    "kwargs": {"filler": "shakespeare"}},
        "niah_single": {"context_tokens": lengths, "depths": (0.25, 0.75), "seeds": (0,),
                        "kwargs": {"filler": "wikipedia"}},
    })
    c.perplexity = ml_collections.ConfigDict({
        "enabled": True, "corpus": "hamlet", "context_tokens": 2048, "eval_tokens": 256, "n_segments": 2,
        "mode": "chunk"})
    return c

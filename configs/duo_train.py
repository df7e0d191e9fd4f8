"""DuoAttention gates on SmolLM2-135M (CPU): ``python -m kvjax.launch --config=configs/duo_train.py``. Writes
runs/duo/{metrics.jsonl, loss_curve.png, gates.png, summary.json, ckpt/}; deploy with
``get_method("duo_attention", gates="runs/duo/ckpt", sparsity=0.5, n_sink=16, recent=64)``.

The authors' recipe (AdamW lr 0.02, no weight decay, L1 weight 0.05, gates initialised at 1 and clamped to [0, 1],
trapezoid schedule with 1/5 warmup and decay, synthetic passkey data, distillation on the answer tokens) scaled to
this shared 2-core CPU: 12 steps of one ~320-token passkey / needle example instead of 2,000 steps of 1K-32K tokens,
and the streaming window scaled with the context (16 sinks + 64 recent tokens instead of 64 + 256).
"""
import ml_collections

from kvjax import configs


def get_config() -> ml_collections.ConfigDict:
    c = configs.training("runs/duo")
    c.train = ml_collections.ConfigDict({
        "kind": "duo_attention",
        "steps": 12,
        "seed": 0,
        "log_every": 1,
        "eval_every": 6,
        "eval_batches": 1,
        "data_parallel": 0,
        "method": {"n_sink": 16, "recent": 64, "reg_weight": 0.05, "initial_value": 1.0},
        "optim": {"optimizer": "adamw", "lr": 0.02, "b1": 0.9, "b2": 0.999, "weight_decay": 0.0,
                  "schedule": "trapezoid", "warmup_steps": 3, "min_ratio": 0.1},
        "data": {"sources": ("task:passkey", "task:niah_single"), "weights": (0.5, 0.5),
                 "seq_len": 320, "batch_size": 1, "query_tokens": 32, "heldout_fraction": 0.1,
                 "max_chars": 200_000, "seed": 0, "task_kwargs": {}},
        "checkpoint": {"every": 6, "keep": 2},
    })
    return c

"""Locret retaining heads on SmolLM2-135M (CPU): ``python -m kvjax.launch
--config=configs/locret_train.py``. Writes runs/locret/{metrics.jsonl, loss_curve.png, summary.json, ckpt/}; evaluate
with ``get_method("locret", heads="runs/locret/ckpt", ...)`` (configs/locret_eval.py).

The authors' optimiser (AdamW (0.9, 0.95), lr 5e-4, linear warmup/decay, per-element gradient clipping at 0.5),
scaled to this shared 2-core CPU: 3000 steps of 10K-token sequences become 300 steps of one 384-token sequence
(Wikipedia windows and passkey / needle examples, whose question and answer are the "later queries"), and the head
width 1024 (for Llama-3.1-8B's 6144-wide q/k/v) becomes 256 for SmolLM2's 960-wide q/k/v (the heads cost as much
compute as the backbone's forward at 1024). ``--config.model.name=tiny-random --config.train.steps=20`` is a seconds-long smoke run.
"""
import ml_collections

from kvjax import configs


def get_config() -> ml_collections.ConfigDict:
    c = configs.training("runs/locret")
    c.train = ml_collections.ConfigDict({
        "kind": "locret",
        "steps": 300,
        "seed": 0,
        "log_every": 1,
        "eval_every": 100,
        "eval_batches": 2,
        "data_parallel": 0,
        "method": {"hidden": 256},
        "optim": {"optimizer": "adamw", "lr": 5e-4, "b1": 0.9, "b2": 0.95, "weight_decay": 0.0,
                  "schedule": "linear", "warmup_steps": 30, "end_lr": 0.0, "clip_value": 0.5},
        "data": {"sources": ("text:wikipedia", "task:niah_single", "task:passkey"), "weights": (0.4, 0.3, 0.3),
                 "seq_len": 384, "batch_size": 1, "query_tokens": 48, "heldout_fraction": 0.1,
                 "max_chars": 400_000, "seed": 0, "task_kwargs": {}},
        "checkpoint": {"every": 100, "keep": 2},
    })
    return c

"""MLA upcycling of SmolLM2-135M with X-EcoMLA's SVD initialisation and KL distillation from the original model
(CPU): ``python -m kvjax.launch --config=configs/mla_distill.py`` (override e.g. ``--config.train.method.kv_rank=96
--config.run_dir=runs/mla_r96``). Writes runs/mla/{metrics.jsonl, loss_curve.png, summary.json, ckpt/, model/};
``load_pretrained("runs/mla/model")`` loads the distilled MLA model.

The authors' recipe (X-EcoMLA, arXiv 2503.11132: ``configs/SmolLM_135M/mla_kv_rank_16_1.7bt.yaml`` — KL weight 1, CE
weight 0, AdamW, cosine schedule with 1% warmup, lr 8e-5, 1.7B tokens of SFT data, a SmolLM-1.7B teacher, every
weight trained) scaled to a shared 2-core CPU: the original model as teacher, the attention weights only, 20 steps of
2 x 128 Wikipedia tokens (the train split; the held-out split and Shakespeare stay unseen; a step took about 20-40 s on
the shared machine), peak lr 1e-3 (twenty steps at 8e-5 would barely move the weights). RoPE: one 64-wide decoupled RoPE key (TransMLA's RoRoPE, calibrated on 8 x
256 tokens), the latent rank ``kv_rank``.
"""
import ml_collections

from kvjax import configs


def get_config() -> ml_collections.ConfigDict:
    c = configs.training("runs/mla")
    c.train = ml_collections.ConfigDict({
        "kind": "mla",
        "steps": 20,
        "seed": 0,
        "log_every": 1,
        "eval_every": 10,
        "eval_batches": 1,
        "data_parallel": 0,
        "method": {"rope_heads": 1, "kv_rank": 96, "init": "svd", "calib_source": "text:wikipedia",
                   "calib_seqs": 8, "calib_len": 256, "balance_kv": True, "temperature": 1.0},
        "optim": {"optimizer": "adamw", "lr": 1e-3, "b1": 0.9, "b2": 0.999, "weight_decay": 0.0,
                  "schedule": "cosine", "warmup_steps": 3, "end_lr": 1e-4, "clip_norm": 1.0},
        "data": {"sources": ("text:wikipedia",), "seq_len": 128, "batch_size": 2, "query_tokens": 32,
                 "heldout_fraction": 0.1, "max_chars": 400_000, "seed": 0},
        "checkpoint": {"every": 10, "keep": 1},
    })
    return c

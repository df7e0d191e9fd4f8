"""Training runs driven by ``python -m kvjax.launch --config=configs/locret_train.py`` (any config with a ``train``
section): loads the model, builds deterministic batches (:mod:`kvjax.train.data`), trains the method's trainable part
with a progress bar (loss, tokens/s), logs ``metrics.jsonl``, checkpoints (resuming a run directory continues it),
evaluates on the held-out split, writes ``loss_curve.png`` and saves the trained artefact to ``<run_dir>/ckpt``
(what ``get_method(kind, heads=...)`` / ``gates=...`` loads).

Config fields (see ``configs/locret_train.py``)::

    run_dir, model.name, model.dtype
    train.kind (locret | duo_attention | mla), train.steps, train.seed, train.log_every, train.eval_every,
    train.eval_batches, train.data_parallel (devices of the data axis; 0 = 1 device), train.method (kind-specific)
    train.optim (optimizer, lr, schedule, warmup_steps, end_lr, b1, b2, weight_decay, clip_norm, clip_value)
    train.data (kvjax.train.data.DataConfig fields)
    train.checkpoint (every, keep)
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from kvjax.train.checkpoint import Checkpointer, fingerprint, save_artifact
from kvjax.train.data import Batches, DataConfig
from kvjax.train.loop import TrainState, data_mesh, eval_loss, make_optimizer, make_train_step


def get_trainer(kind: str, method_cfg: dict):
    if kind == "locret":
        from kvjax.train.locret import LocretTrainer  # noqa: PLC0415

        return LocretTrainer(method_cfg)
    if kind == "duo_attention":
        from kvjax.train.duo import DuoTrainer  # noqa: PLC0415

        return DuoTrainer(method_cfg)
    if kind == "mla":
        from kvjax.train.mla import MLATrainer  # noqa: PLC0415

        return MLATrainer(method_cfg)
    raise ValueError(f"train.kind={kind!r}: choose locret, duo_attention or mla")


def _atomic_json_line(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()


def plot_curve(rows: list[dict], path: str, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    tr = [r for r in rows if r.get("split") == "train"]
    ev = [r for r in rows if r.get("split") == "heldout"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train", lw=1)
    if ev:
        ax.plot([r["step"] for r in ev], [r["loss"] for r in ev], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def check_training(config) -> tuple:
    """Checks a training config without loading the model; returns ``(trainer, data config, optax optimizer)``.
    Raises ValueError (one line naming the field) for bad steps, kind, method, data or optimiser settings."""
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    tc = dict(c["train"])
    steps = int(tc["steps"])
    if steps <= 0:
        raise ValueError(f"train.steps must be > 0, got {steps}")
    trainer = get_trainer(tc["kind"], dict(tc.get("method", {})))
    return trainer, DataConfig.from_dict(tc.get("data", {})), make_optimizer(dict(tc.get("optim", {})), steps)


def run_training(config, progress: bool = True, lm=None) -> dict:
    """Runs (or resumes) the training described by ``config`` (an ml_collections config or dict); returns a summary
    dict (also written to ``<run_dir>/summary.json``). ``lm``: an already loaded model (tests, notebooks)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    tc = dict(c["train"])
    run_dir = c["run_dir"]
    steps = int(tc["steps"])
    trainer, data_cfg, optimizer = check_training(c)
    if lm is None:
        from kvjax.pretrained import load_pretrained  # noqa: PLC0415

        lm = load_pretrained(c["model"]["name"], dtype=c["model"].get("dtype", "float32"))
    os.makedirs(run_dir, exist_ok=True)
    batches = Batches(data_cfg, lm.tokenizer)
    loss_fn = trainer.loss_fn(lm.model)
    n_dev = int(tc.get("data_parallel", 0))
    mesh = data_mesh(n_dev) if n_dev > 1 else None
    step_fn = make_train_step(loss_fn, optimizer, project=trainer.project, mesh=mesh)
    evaluate = eval_loss(loss_fn)
    seed = int(tc.get("seed", 0))
    state = TrainState.create(trainer.init(lm, jax.random.PRNGKey(seed)), optimizer, jax.random.PRNGKey(seed + 1))
    fp = fingerprint(lm.cfg, {**tc, "model": c["model"]})
    ck = dict(tc.get("checkpoint", {}))
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), fp, every=int(ck.get("every", 50)),
                        keep=int(ck.get("keep", 3)))
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        rows = [r for r in read_metrics(metrics_path) if r["step"] <= int(state.step)]
        with open(metrics_path + ".tmp", "w") as f:  # drop rows logged after the checkpoint (they are redone)
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        os.replace(metrics_path + ".tmp", metrics_path)
    else:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(c, f, indent=1, sort_keys=True, default=str)
        open(metrics_path, "w").close()
    log_every = int(tc.get("log_every", 1))
    eval_every = int(tc.get("eval_every", max(1, steps // 4)))
    n_eval = int(tc.get("eval_batches", 2))

    def heldout(step: int) -> dict:
        vals = [jax.device_get(evaluate(state.params, lm.params, batches.heldout(i), jax.random.PRNGKey(0)))
                for i in range(n_eval)]
        out = {"split": "heldout", "step": step, "loss": float(np.mean([float(v[0]) for v in vals]))}
        for k in vals[0][1]:
            out[k] = float(np.mean([float(v[1][k]) for v in vals]))
        return out

    start = int(state.step)
    t_start = time.perf_counter()
    tokens_done = 0
    bar = tqdm(total=steps, initial=start, disable=not progress, desc=f"train {tc['kind']}")
    first_s = None
    for step in range(start, steps):
        batch = batches.train(step)
        t0 = time.perf_counter()
        state, m = step_fn(state, lm.params, batch)
        m = jax.device_get(m)
        dt = time.perf_counter() - t0
        if first_s is None:
            first_s = dt  # includes compilation
        tokens_done += int(batch["mask"].sum())
        tps = tokens_done / max(time.perf_counter() - t_start, 1e-9)
        row = {"split": "train", "step": step + 1, "step_s": dt, "tokens_per_s": tps,
               **{k: float(v) for k, v in m.items()}}
        if (step + 1) % log_every == 0 or step + 1 == steps:
            _atomic_json_line(metrics_path, row)
        bar.set_postfix(loss=f"{row['loss']:.4g}", tok_s=f"{tps:.0f}")
        bar.update(1)
        if (step + 1) % eval_every == 0 and step + 1 != steps:
            _atomic_json_line(metrics_path, heldout(step + 1))
        ckpt.save(state)
    bar.close()
    ckpt.save(state, force=True)
    final_eval = heldout(int(state.step))
    if not any(r["split"] == "heldout" and r["step"] == int(state.step) for r in read_metrics(metrics_path)):
        _atomic_json_line(metrics_path, final_eval)  # (a resumed finished run has it already)
    rows = read_metrics(metrics_path)
    plot_curve(rows, os.path.join(run_dir, "loss_curve.png"), f"{tc['kind']} on {c['model']['name']}")
    info = {"kind": tc["kind"], "model": c["model"]["name"], "model_fingerprint": fingerprint(lm.cfg, {}),
            "steps": int(state.step), "config": tc, **trainer.info()}
    extra = trainer.finalize(lm, state.params, info) if hasattr(trainer, "finalize") else {}
    if tc["kind"] == "duo_attention":
        from kvjax.compress.duo_attention import gated_layer_mask  # noqa: PLC0415
        from kvjax.train.duo import plot_gates  # noqa: PLC0415

        plot_gates(np.asarray(state.params["gates"]), os.path.join(run_dir, "gates.png"),
                   f"DuoAttention gates, {c['model']['name']}", eligible=gated_layer_mask(lm.cfg))
    info.update(extra)
    save_artifact(os.path.join(run_dir, "ckpt"), jax.device_get(state.params), info)
    if hasattr(trainer, "save_model"):  # trainers that produce a whole model (MLA upcycling): loadable by path
        trainer.save_model(lm, jax.device_get(state.params), os.path.join(run_dir, "model"), info)
        extra = {**extra, "model": os.path.join(run_dir, "model")}
    train_rows = [r for r in rows if r["split"] == "train"]
    summary = {"kind": tc["kind"], "steps": int(state.step), "resumed_from": start,
               "train_seconds_this_session": time.perf_counter() - t_start,
               "first_step_seconds_incl_compile": first_s,
               "first_loss": train_rows[0]["loss"] if train_rows else None,
               "last_loss": train_rows[-1]["loss"] if train_rows else None,
               "heldout": final_eval, "artifact": os.path.join(run_dir, "ckpt"), **extra}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True, default=str)
    return summary

"""Checkpoints of a training run with orbax: save every ``every`` steps and at the end, keep the last ``keep``, resume
exactly (params, optimizer state, step, PRNG key and the data position, which is the step: batches are a pure
function of ``(seed, step)``), refuse to resume into a different model or config, and fail clearly on a corrupt one.

Each checkpoint holds ``state`` (the :class:`kvjax.train.TrainState`, orbax StandardSave) and ``meta`` (JSON: the
run's fingerprint — a hash of the model's config and the training config minus fields that do not change the run,
such as the number of steps or logging — plus the data position).

Trained artefacts (what inference loads by path, e.g. ``get_method("locret", heads="runs/locret/ckpt")``) are written
by :func:`save_artifact`: the trainable params (orbax) and a JSON description, checked when read by
:func:`load_artifact`.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from kvjax.train.loop import TrainState

# Training-config fields that may change between a run and its resumption (they do not change the trajectory;
# `steps` does, through the learning-rate schedule).
RESUMABLE_FIELDS = ("run_dir", "log_every", "eval_every", "checkpoint", "progress", "eval")


class CheckpointError(ValueError):
    """A checkpoint is corrupt, incomplete, or belongs to another model/config."""


def fingerprint(model_cfg: Any, train_cfg: dict) -> str:
    """Stable hash of what determines a run (the model config and the training config minus RESUMABLE_FIELDS)."""
    tc = {k: v for k, v in dict(train_cfg).items() if k not in RESUMABLE_FIELDS}
    mc = model_cfg.__dict__ if hasattr(model_cfg, "__dict__") else model_cfg
    blob = json.dumps({"model": mc, "train": tc}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Checkpointer:
    """orbax CheckpointManager for one run directory (see module docstring)."""

    def __init__(self, directory: str, fp: str, *, every: int = 50, keep: int = 3):
        if every <= 0 or keep <= 0:
            raise ValueError(f"checkpoint every and keep must be > 0, got every={every}, keep={keep}")
        self.directory = os.path.abspath(directory)
        self.fp = fp
        self.every = int(every)
        opts = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, *, force: bool = False) -> bool:
        step = int(state.step)
        if not force and step % self.every:
            return False
        if step in self.manager.all_steps():
            return False
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"fingerprint": self.fp, "step": step, "data_position": step})))
        self.manager.wait_until_finished()
        return True

    def restore(self, target: TrainState, step: int | None = None) -> TrainState:
        """The checkpoint at ``step`` (latest by default), checked against this run's fingerprint and ``target``'s
        structure, shapes and dtypes."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        path = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 (orbax raises many types for damaged files)
            raise CheckpointError(f"checkpoint {path} is corrupt or incomplete (metadata unreadable: "
                                  f"{type(e).__name__}: {str(e)[:200]})") from None
        if not isinstance(meta, dict) or meta.get("fingerprint") != self.fp:
            got = meta.get("fingerprint") if isinstance(meta, dict) else meta
            raise CheckpointError(f"checkpoint {path} was written by a different model or training config "
                                  f"(fingerprint {got}, this run {self.fp}); use another run_dir or the same config")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {path} is corrupt or does not match this run's train state "
                                  f"({type(e).__name__}: {str(e)[:300]})") from None
        if int(state.step) != step or int(meta.get("data_position", -1)) != step:
            raise CheckpointError(f"checkpoint {path} is inconsistent: step {int(state.step)} in the state, {step} "
                                  "in its name")
        return state


def save_artifact(path: str, params: Any, info: dict) -> None:
    """Writes trained params (orbax) and ``info.json`` (method, model, config) to ``path`` (replacing it)."""
    import shutil  # noqa: PLC0415

    path = os.path.abspath(path)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, "params"), jax.tree_util.tree_map(np.asarray, params))
    ckptr.wait_until_finished()
    leaves = jax.tree_util.tree_leaves(params)
    info = {**info, "num_params": int(sum(np.size(x) for x in leaves))}
    with open(os.path.join(tmp, "info.json"), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True, default=str)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


_TRAIN_CONFIGS = {"duo_attention": "duo_train", "locret": "locret_train", "mla": "mla_distill"}  # kind -> configs/


def load_artifact(path: str, kind: str) -> tuple[Any, dict]:
    """``(params, info)`` of an artefact written by :func:`save_artifact` for method ``kind``; clear errors for a
    missing, corrupt or wrong-kind artefact."""
    path = os.path.abspath(path)
    info_path = os.path.join(path, "info.json")
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"no trained {kind} artefact at {path} (expected {info_path}; train one with "
                                f"python -m kvjax.launch --config=configs/{_TRAIN_CONFIGS.get(kind, kind + '_train')}.py)")
    try:
        with open(info_path) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"artefact {path}: info.json unreadable ({e})") from None
    if info.get("kind") != kind:
        raise CheckpointError(f"artefact {path} holds {info.get('kind')!r}, not {kind!r}")
    try:
        params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"artefact {path} is corrupt ({type(e).__name__}: {str(e)[:200]})") from None
    n = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
    if n != info.get("num_params"):
        raise CheckpointError(f"artefact {path} is corrupt: {n} parameters, info.json says {info.get('num_params')}")
    return params, info

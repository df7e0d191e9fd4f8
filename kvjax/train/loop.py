"""A small training loop over pure functions: a :class:`TrainState` pytree, an optax optimizer built from a config,
and a jitted step built from a loss function.

Only the *trainable* part (retaining heads, gates, projections ...) is differentiated and lives in the optimizer
state; the backbone is passed to the loss as a separate, frozen argument that is never copied into the optimizer
state and gets no gradient::

    opt = make_optimizer(cfg.optim, total_steps=cfg.steps)
    state = TrainState.create(trainable, opt, jax.random.PRNGKey(0))
    step = make_train_step(loss_fn, opt)               # loss_fn(trainable, frozen, batch, key) -> (loss, metrics)
    state, metrics = step(state, frozen, batch)

Data parallelism: pass ``mesh`` (a :class:`jax.sharding.Mesh` with a ``"data"`` axis) to :func:`make_train_step`;
batches are split along their leading axis over it and the train state and frozen params are replicated. The loss
must be a mean over the batch, so the result equals the single-device step up to float reassociation.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict]]


@struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (and checkpoints)."""

    params: Any  # the trainable pytree only
    opt_state: Any
    step: jax.Array  # int32 scalar
    key: jax.Array  # PRNG key (raw uint32 data, so that it checkpoints as a plain array)

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation, key: jax.Array) -> "TrainState":
        return cls(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
                   key=jnp.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                   else key, jnp.uint32))


def make_schedule(cfg: dict, total_steps: int) -> optax.Schedule:
    """An optax learning-rate schedule from a config dict.

    ``schedule``: ``constant``, ``cosine`` (warmup then cosine decay to ``end_lr``), ``linear`` (warmup then linear
    decay to ``end_lr``: the schedule Locret's authors use) or ``trapezoid`` (DuoAttention's: linear warmup over
    ``warmup_steps``, flat, linear decay over the last ``warmup_steps``, never below ``min_ratio * lr``).
    """
    lr = float(cfg.get("lr", 1e-3))
    kind = cfg.get("schedule", "constant")
    warm = int(cfg.get("warmup_steps", 0))
    end = float(cfg.get("end_lr", 0.0))
    if lr <= 0:
        raise ValueError(f"optim.lr must be > 0, got {lr}")
    if warm < 0 or warm > total_steps:
        raise ValueError(f"optim.warmup_steps must be in [0, steps={total_steps}], got {warm}")
    if kind == "constant":
        return optax.constant_schedule(lr) if not warm else optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warm, 1), max(total_steps, warm + 1), end)
    if kind == "linear":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warm, 1)),
                                     optax.linear_schedule(lr, end, max(total_steps - warm, 1))], [max(warm, 1)])
    if kind == "trapezoid":
        lo = float(cfg.get("min_ratio", 0.1))
        w = max(warm, 1)

        def trapezoid(step):
            s = jnp.asarray(step, jnp.float32)
            return lr * jnp.minimum(1.0, jnp.maximum(jnp.minimum((s + 1) / w, (total_steps - s) / w), lo))

        return trapezoid
    raise ValueError(f"optim.schedule={kind!r}: choose constant, cosine, linear or trapezoid")


def make_optimizer(cfg: dict, total_steps: int) -> optax.GradientTransformation:
    """optax chain from a config dict: clipping (``clip_norm`` global norm and/or ``clip_value`` per element, 0 =
    off), then ``optimizer`` (``adamw`` with ``b1``, ``b2``, ``weight_decay``; ``adam``; ``sgd``) on the schedule."""
    cfg = dict(cfg)
    sched = make_schedule(cfg, total_steps)
    parts = []
    if float(cfg.get("clip_value", 0.0)) > 0:
        parts.append(optax.clip(float(cfg["clip_value"])))
    if float(cfg.get("clip_norm", 0.0)) > 0:
        parts.append(optax.clip_by_global_norm(float(cfg["clip_norm"])))
    name = cfg.get("optimizer", "adamw")
    b1, b2 = float(cfg.get("b1", 0.9)), float(cfg.get("b2", 0.999))
    if name == "adamw":
        parts.append(optax.adamw(sched, b1=b1, b2=b2, weight_decay=float(cfg.get("weight_decay", 0.0))))
    elif name == "adam":
        parts.append(optax.adam(sched, b1=b1, b2=b2))
    elif name == "sgd":
        parts.append(optax.sgd(sched, momentum=float(cfg.get("momentum", 0.0)) or None))
    else:
        raise ValueError(f"optim.optimizer={name!r}: choose adamw, adam or sgd")
    return optax.chain(*parts)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, project: Callable | None = None,
                    mesh: jax.sharding.Mesh | None = None, donate: bool = False):
    """``step(state, frozen, batch) -> (state, metrics)``, jitted.

    ``loss_fn(trainable, frozen, batch, key) -> (loss, metrics)``; gradients are taken w.r.t. ``trainable`` only.
    ``project``: applied to the params after each update (e.g. clamp gates to [0, 1], as DuoAttention does).
    ``mesh``: data parallelism over its ``"data"`` axis (see module docstring). ``metrics`` include ``loss`` and
    ``grad_norm``.
    """

    def step(state: TrainState, frozen, batch):
        key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, sub)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if project is not None:
            params = project(params)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        new = TrainState(params=params, opt_state=opt_state, step=state.step + 1,
                         key=jax.random.key_data(key))
        return new, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=(0,) if donate else ())
    from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

    rep = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    jitted = jax.jit(step, out_shardings=(rep, rep))

    def sharded_step(state, frozen, batch):
        n = mesh.shape["data"]
        for leaf in jax.tree_util.tree_leaves(batch):
            if leaf.shape[0] % n:
                raise ValueError(f"batch size {leaf.shape[0]} is not divisible by the {n} devices of the data axis")
        state, frozen = jax.device_put((state, frozen), rep)
        batch = jax.device_put(batch, data)
        return jitted(state, frozen, batch)

    return sharded_step


def data_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """The mesh of :func:`kvjax.sharding.make_mesh` with ``num_devices`` (all by default) on its ``"data"`` axis
    (``model`` and ``sequence`` of size 1): pure data parallelism."""
    from kvjax.sharding import make_mesh  # noqa: PLC0415

    n = len(jax.local_devices()) if num_devices is None else int(num_devices)
    if n < 1:
        raise ValueError(f"data-parallel devices must be >= 1, got {n}")
    return make_mesh(f"data:{n}")


def eval_loss(loss_fn: LossFn):
    """Jitted ``(trainable, frozen, batch, key) -> (loss, metrics)`` for held-out evaluation (no gradient)."""
    return jax.jit(loss_fn)

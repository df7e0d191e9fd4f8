"""The user-facing model: a config plus pure ``prefill`` / ``decode_step`` functions over a :class:`KVState`.

Example::

    cfg, params = kvjax.load_pretrained("smollm2-135m")
    model = kvjax.Model(cfg)
    state = model.init_state(batch=1, capacity=2048)
    logits, state = model.prefill(params, tokens, state)
    logits, state = model.decode_step(params, next_token, state)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention import Observe
from kvjax.config import ModelConfig
from kvjax.models import forward_fn
from kvjax.state import KVState, init_state


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


@dataclasses.dataclass(frozen=True)
class Model:
    """A decoder model config bound to its forward function. Hashable, so it can be a static jit argument.

    ``impl`` selects the attention implementation: ``"reference"`` (jnp) or ``"pallas"`` (kernels).
    ``mesh`` (a :func:`kvjax.sharding.make_mesh` mesh, or None): the forward keeps the KV state sharded by
    :mod:`kvjax.sharding`'s rules and runs Pallas decode attention per shard; ``init_state`` places the new state on
    the mesh. Params are placed with :func:`kvjax.sharding.shard_params` (or :meth:`shard_params`).
    """

    cfg: ModelConfig
    impl: str = "reference"
    mesh: Any = None

    def __post_init__(self):
        if self.impl == "expanded" and self.cfg.attention_type == "mla":
            pass  # MLA's reference path with per-head keys/values materialised (kvjax.models.mla)
        elif self.impl not in ("reference", "pallas"):
            raise ValueError(f"unknown attention impl {self.impl!r}; choose 'reference' or 'pallas'"
                             + (" (or 'expanded' for an MLA model)" if self.cfg.attention_type == "mla" else ""))
        if self.mesh is not None:
            from kvjax import sharding  # noqa: PLC0415

            sharding.validate_mesh(self.mesh, self.cfg)

    @property
    def forward_impl(self):
        if self.mesh is None:
            return forward_fn(self.cfg)
        return _sharded_forward(forward_fn(self.cfg), self.mesh)

    def init_state(self, batch: int, capacity: int, dtype=jnp.float32, *, local_ring: bool = True,
                   local_capacity: int | None = None) -> KVState:
        """An empty full KV cache with ``capacity`` slots per global layer (see :func:`kvjax.state.init_state`);
        on the model's mesh, sharded by the rules."""
        state = init_state(self.cfg, batch, capacity, dtype, local_ring=local_ring, local_capacity=local_capacity)
        return state if self.mesh is None else self.shard_state(state)

    def shard_state(self, state: KVState) -> KVState:
        """``state`` placed on the model's mesh by :func:`kvjax.sharding.state_specs` (unchanged without a mesh)."""
        if self.mesh is None:
            return state
        from kvjax import sharding  # noqa: PLC0415

        return sharding.shard_state(state, self.mesh, self.cfg)

    def shard_params(self, params):
        """``params`` placed on the model's mesh by :func:`kvjax.sharding.param_specs` (unchanged without a mesh)."""
        if self.mesh is None:
            return params
        from kvjax import sharding  # noqa: PLC0415

        return sharding.shard_params(params, self.mesh, self.cfg)

    @staticmethod
    def check_tokens(tokens) -> None:
        """Raises a clear error unless ``tokens`` is a 2-D integer array with at least one time step."""
        if not hasattr(tokens, "ndim") or not hasattr(tokens, "dtype"):
            raise TypeError(f"tokens must be a 2-D (batch, time) integer jax or numpy array, got a "
                            f"{type(tokens).__name__} (wrap it: jnp.asarray(tokens, jnp.int32))")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be a 2-D (batch, time) integer array, got shape {getattr(tokens, 'shape', None)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must have an integer dtype, got {tokens.dtype}")
        b, t = tokens.shape
        if t == 0:
            raise ValueError("tokens has no time steps")

    def check_inputs(self, tokens, state: KVState, token_mask=None) -> None:
        """Raises a clear error for malformed tokens, masks, or a chunk that does not fit in the cache."""
        self.check_tokens(tokens)
        b, t = tokens.shape
        if b != state.batch_size:
            raise ValueError(f"tokens have batch {b} but the KV state was made for batch {state.batch_size}")
        if len(state.layers) != self.cfg.num_layers:
            raise ValueError(f"KV state has {len(state.layers)} layers, the model {self.cfg.num_layers}")
        mla = self.cfg.attention_type == "mla"
        for i, layer in enumerate(state.layers):  # a state of another model (a loaded one) fails here, not in XLA
            if mla != (type(layer).__name__ == "LatentKV"):
                raise ValueError(f"KV state layer {i} is a {type(layer).__name__} but the model's attention is "
                                 f"{self.cfg.attention_type.upper()}: a state made for another model")
            if mla:
                r, dr = layer.c.shape[-1], layer.kr.shape[-1]
                if (r, dr) != (self.cfg.mla_kv_rank, self.cfg.mla_rope_dim):
                    raise ValueError(f"KV state layer {i} holds latents of width {r} and RoPE keys of width {dr}, "
                                     f"the model {self.cfg.mla_kv_rank} and {self.cfg.mla_rope_dim}: a state made for "
                                     "another model")
                continue
            if type(layer).__name__ != "DenseKV":  # other classes hold head subsets or pruned channels by design
                continue
            heads, dim = layer.k.shape[1], layer.k.shape[3]
            if heads != self.cfg.num_kv_heads or dim != self.cfg.head_dim:
                raise ValueError(f"KV state layer {i} has {heads} KV heads of dim {dim}, the model "
                                 f"{self.cfg.num_kv_heads} of dim {self.cfg.head_dim}: a state made for another model")
        if token_mask is not None and tuple(getattr(token_mask, "shape", ())) != (b, t):
            raise ValueError(f"token_mask shape {tuple(getattr(token_mask, 'shape', ()))} != tokens shape {(b, t)}")
        if token_mask is not None and _concrete(token_mask):
            m = np.asarray(token_mask)
            if m.dtype != np.bool_:
                raise TypeError(f"token_mask must be a bool array (True = real token), got dtype {m.dtype}")
            empty = np.flatnonzero(~m.any(axis=1))
            if empty.size and state is not None and _concrete(state.next_pos) and \
                    (np.asarray(state.next_pos)[empty] == 0).any():
                raise ValueError(f"row(s) {empty.tolist()} of token_mask are all padding: a prompt needs at least one "
                                 "real token")
        if _concrete(tokens):
            tk = np.asarray(tokens)
            if tk.size and (tk.min() < 0 or tk.max() >= self.cfg.vocab_size):
                raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got range [{tk.min()}, {tk.max()}]")
        for i, layer in enumerate(state.layers):
            if getattr(layer, "ring_start", -1) >= 0 or not _concrete(layer.fill):
                continue
            if hasattr(layer, "head_capacity"):  # ragged layer: every head has its own segment
                over = np.asarray(layer.fill) + t - np.asarray(layer.head_capacity)
                if over.max() > 0:
                    raise ValueError(f"positions past capacity: layer {i} is ragged and a head's segment lacks "
                                     f"{int(over.max())} of the {t} slots the new tokens need (compress it with "
                                     f"more decode room)")
                continue
            need = int(np.max(np.asarray(layer.fill))) + t
            if need > layer.capacity:
                raise ValueError(
                    f"positions past capacity: layer {i} holds {layer.capacity} slots, {need - t} are used and "
                    f"{t} more tokens were given (make the state with a larger capacity or compress it first)")

    def forward(self, params, tokens, state: KVState, token_mask=None, *, observe: Observe = Observe(),
                logits: str = "all"):
        """``(logits, new_state, observations)``; see :func:`kvjax.models.llama.forward`.

        A chunk that does not fit in the cache is refused on the host (``ValueError``) whenever the state's fill is
        known, i.e. outside ``jit``. Traced inside a caller's ``jit`` the fill is unknown until run time: the rows
        whose tokens did not fit then get NaN logits (the write past capacity is dropped, never silently used)."""
        self.check_inputs(tokens, state, token_mask)
        out, new_state, obs = self.forward_impl(self.cfg, params, tokens, state, token_mask, observe=observe,
                                                impl=self.impl, logits=logits)
        if out is not None and not all(_concrete(getattr(l, "fill", 0)) for l in state.layers):
            over = overflow_rows(state, tokens.shape[1])
            if over is not None:
                out = jnp.where(over.reshape((-1,) + (1,) * (out.ndim - 1)), jnp.nan, out)
        return out, new_state, obs

    def prefill(self, params, tokens, state: KVState, token_mask=None, *, logits: str = "all"):
        """Writes a (batch of) prompt(s) into ``state``: returns ``(logits, new_state)``.

        Padding: pass ``token_mask`` (False = pad); left and right padding both work, each row's positions count
        only its real tokens. Call repeatedly for chunked prefill.
        """
        out, new_state, _ = self.forward(params, tokens, state, token_mask, logits=logits)
        return out, new_state

    def decode_step(self, params, token, state: KVState):
        """One token per sequence (``token`` ``(B,)``): returns ``(logits (B, V), new_state)``."""
        token = jnp.asarray(token)
        if token.ndim != 1:
            raise ValueError(f"decode_step takes one token per sequence, shape (batch,), got {token.shape}")
        out, new_state, _ = self.forward(params, token[:, None], state)
        return out[:, 0], new_state

    # Jitted entry points. They are module-level functions with the (hashable) model as a static argument, so every
    # equal Model shares one compilation cache.
    def jit_prefill(self, params, tokens, state: KVState, token_mask=None, *, logits: str = "all"):
        self.check_inputs(tokens, state, token_mask)
        return _jit_prefill(self, params, tokens, state, token_mask, logits)

    def jit_decode_step(self, params, token, state: KVState):
        token = jnp.asarray(token)
        if token.ndim != 1:
            raise ValueError(f"decode_step takes one token per sequence, shape (batch,), got {token.shape}")
        self.check_inputs(token[:, None], state)  # room, on the host, before the compiled step runs
        return _jit_decode_step(self, params, token, state)

    def jit_forward(self, params, tokens, state: KVState, token_mask=None, *, observe: Observe = Observe(),
                    logits: str = "all"):
        self.check_inputs(tokens, state, token_mask)
        return _jit_forward(self, params, tokens, state, token_mask, observe, logits)


    def compile_forward(self, params, tokens, state: KVState, token_mask=None, *, observe: Observe = Observe(),
                        logits: str = "all") -> None:
        """Compiles :meth:`jit_forward` for these arguments without running it (the executable lands in its call
        cache), so that a timed call which follows excludes compilation."""
        self.check_inputs(tokens, state, token_mask)
        _jit_forward.lower(self, params, tokens, state, token_mask, observe, logits).compile()


def overflow_rows(state: KVState, n_new: int):
    """``(B,)`` bool: rows for which writing ``n_new`` more tokens passes a (non-ring) layer's capacity; None when
    every layer is a ring (rings wrap by design)."""
    flags = []
    for layer in state.layers:
        if getattr(layer, "ring_start", -1) >= 0 or not hasattr(layer, "fill"):
            continue
        cap = layer.head_capacity if hasattr(layer, "head_capacity") else layer.capacity  # ragged: per head
        flags.append(jnp.any(layer.fill + n_new > cap, axis=-1))
    if not flags:
        return None
    return functools.reduce(jnp.logical_or, flags)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _jit_prefill(model, params, tokens, state, token_mask, logits):
    out, new_state, _ = model.forward_impl(model.cfg, params, tokens, state, token_mask, impl=model.impl,
                                           logits=logits)
    return out, new_state


@functools.partial(jax.jit, static_argnums=(0,))
def _jit_decode_step(model, params, token, state):
    out, new_state, _ = model.forward_impl(model.cfg, params, token[:, None], state, None, impl=model.impl)
    return out[:, 0], new_state


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _jit_forward(model, params, tokens, state, token_mask, observe, logits):
    return model.forward_impl(model.cfg, params, tokens, state, token_mask, observe=observe, impl=model.impl,
                              logits=logits)


@functools.lru_cache(maxsize=64)
def _sharded_forward(raw, mesh):
    from kvjax import sharding  # noqa: PLC0415

    return sharding.sharded_forward(raw, mesh)

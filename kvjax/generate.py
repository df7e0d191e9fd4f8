"""Jitted autoregressive generation over the KV state: greedy or temperature / top-k / top-p sampling.

The decode loop is a ``lax.while_loop`` (one compiled program for all steps). A compression method (see
:mod:`kvjax.compress`) compacts the prompt's cache once after prefill and, if it has a decode phase, transforms the
state every ``method.every`` steps inside the loop (streaming eviction such as StreamingLLM or H2O).
"""
from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp

from kvjax.model import Model
from kvjax.state import KVState


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        import math  # noqa: PLC0415

        for name, v in (("temperature", self.temperature), ("top_p", self.top_p)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise TypeError(f"top_k must be an int, got {self.top_k!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_token(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Next token ``(B,)`` from logits ``(B, V)``."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        cutoff_idx = jnp.sum(cum < cfg.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class GenerateOutput:
    tokens: jax.Array  # (B, max_new_tokens); positions after a stop token hold the stop token
    lengths: jax.Array  # (B,) generated tokens including the stop token
    state: KVState
    prefill_logits: jax.Array  # (B, V) logits after the prompt


jax.tree_util.register_dataclass(GenerateOutput, data_fields=["tokens", "lengths", "state", "prefill_logits"],
                                 meta_fields=[])


def prefill_compressed(model: Model, params, prompt: jax.Array, *, method=None, prompt_mask: jax.Array | None = None,
                       decode_room: int = 0, state: KVState | None = None, dtype=jnp.float32):
    """Prefills ``prompt`` into a fresh (or given) state and applies ``method``'s one-shot ``prefill`` transform.

    The full cache is allocated for the prompt (plus ``decode_room`` slots when ``method`` is None/full), the model
    returns the observations the method declared, and the method compacts the state (keeping ``decode_room`` free
    slots). Returns ``(last_logits (B, V), state)``.
    """
    from kvjax.compress.base import Context, Identity  # noqa: PLC0415

    method = Identity() if method is None else method
    b, t = prompt.shape
    ctx = Context(cfg=model.cfg, decode_room=decode_room, params=params, prompt_len=t)
    from kvjax.compress.base import check_latent  # noqa: PLC0415

    check_latent(method, model.cfg)
    method.validate(ctx)
    full = type(method) is Identity
    if state is None:
        state = model.init_state(b, t + (decode_room if full else 0), dtype)
    logits, state, obs = model.jit_forward(params, prompt, state, prompt_mask, observe=method.observe(),
                                           logits="last")
    if not full:
        state = compress_prefilled(method, state, obs, ctx)
    return logits, state


def compress_prefilled(method, state: KVState, obs, ctx) -> KVState:
    """Applies ``method``'s one-shot ``prefill`` transform to a prefilled state and its observations.

    ``obs`` may hold more than the method asked for (a shared prefill for several methods): it is cut down first.
    Jittable methods run jitted with ``(method, ctx)`` static; others (data-dependent shapes) run eagerly.
    """
    from kvjax.attention import restrict_observations  # noqa: PLC0415
    from kvjax.compress.base import check_latent  # noqa: PLC0415

    check_latent(method, ctx.cfg)
    obs = restrict_observations(obs, method.observe())
    if getattr(method, "jittable", True):  # params stay out of the static context (they are not hashable)
        return _apply_prefill(method, dataclasses.replace(ctx, params=None), state, obs)
    return method.prefill(state, obs, ctx)[0]


def precompile_prefilled(method, state: KVState, obs, ctx) -> bool:
    """Compiles :func:`compress_prefilled`'s program for these arguments without running it; False for methods that
    run eagerly (nothing to compile ahead)."""
    from kvjax.attention import restrict_observations  # noqa: PLC0415

    if not getattr(method, "jittable", True):
        return False
    obs = restrict_observations(obs, method.observe())
    _apply_prefill.lower(method, dataclasses.replace(ctx, params=None), state, obs).compile()
    return True


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply_prefill(method, ctx, state, obs):
    return method.prefill(state, obs, ctx)[0]


def generate(model: Model, params, prompt: jax.Array, state: KVState | None = None, *,
             prompt_mask: jax.Array | None = None, max_new_tokens: int = 32,
             sampling: SamplingConfig = SamplingConfig(), key: jax.Array | None = None,
             stop_tokens: tuple[int, ...] = (), method=None) -> GenerateOutput:
    """Prefills ``prompt`` ``(B, T)``, compresses it with ``method`` (a :class:`kvjax.compress.Method`, or None for
    the full cache) and decodes ``max_new_tokens`` tokens in one jitted ``lax.while_loop``.

    ``state``: an existing state to continue (multi-turn); by default a fresh one sized for prompt + new tokens.
    """
    import numbers  # noqa: PLC0415

    if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if state is not None:
        model.check_inputs(prompt, state, prompt_mask)
        for i, layer in enumerate(state.layers):
            if getattr(layer, "ring_start", -1) < 0 and method is None:
                need = int(jnp.max(layer.fill)) + prompt.shape[1] + max_new_tokens
                if need > layer.capacity:
                    raise ValueError(f"positions past capacity: layer {i} has {layer.capacity} slots but prompt + "
                                     f"{max_new_tokens} new tokens need {need}")
    else:
        model.check_tokens(prompt)
        model.check_inputs(prompt, model.init_state(prompt.shape[0], prompt.shape[1]), prompt_mask)
    logits, state = prefill_compressed(model, params, prompt, method=method, prompt_mask=prompt_mask,
                                       decode_room=max_new_tokens, state=state)
    if key is None:
        key = jax.random.PRNGKey(0)
    from kvjax.compress.base import Context  # noqa: PLC0415

    ctx = Context(cfg=model.cfg, decode_room=max_new_tokens, params=None, prompt_len=prompt.shape[1])
    if method is None or not method.has_decode():  # (methods with a decode phase make room as they define)
        try:  # the room the compressed state left, on the host, before the decode loop (which cannot check it)
            model.check_inputs(jnp.zeros((prompt.shape[0], max_new_tokens), jnp.int32), state)
        except ValueError as e:
            raise ValueError(f"{e} [after {'prefill' if method is None else method.describe()}, "
                             f"for {max_new_tokens} new tokens]") from None
    tokens, lengths, state = decode_loop(model, params, logits, state, key, max_new_tokens, sampling,
                                         tuple(stop_tokens), method, ctx)
    return GenerateOutput(tokens=tokens, lengths=lengths, state=state, prefill_logits=logits)


def stack_for_loop(model: Model, params, state: KVState):
    """For a loop over decode steps: the layers are stacked once, so each step scans over them (no per-step
    re-stacking, compile time independent of depth). Layers that differ only in capacity are padded to the largest
    (:func:`kvjax.state.pad_stack`). Returns ``(params, state, layout)``; ``layout`` is None when the layers stay a
    tuple, else what :func:`unstack_after_loop` needs."""
    from kvjax.models import llama  # noqa: PLC0415
    from kvjax.state import StackedLayers, pad_stack, stack_layers, stackable  # noqa: PLC0415

    raw = getattr(model.forward_impl, "raw", model.forward_impl)  # (a sharded model wraps the forward)
    if raw is not llama.forward or not stackable(params["layers"]):
        return params, state, None
    stacked = {**params, "layers": stack_layers(params["layers"])}  # (params of loop_params are already stacked)
    if stackable(state.layers):
        return stacked, state.replace(layers=stack_layers(state.layers)), ()
    padded = pad_stack(state.layers)
    if padded is None:  # mixed layer classes (e.g. ragged layers of different sizes): unrolled, params per layer
        if isinstance(params["layers"], StackedLayers):
            params = {**params, "layers": params["layers"].unstack()}
        return params, state, None
    return stacked, state.replace(layers=padded[0]), padded[1]


def loop_params(model: Model, params, state: KVState):
    """``params`` as :func:`decode_loop` will use them over ``state``: the layers' weights stacked once (one copy of
    the weights) when the loop scans over layers, else unchanged. Passing the result to :func:`decode_loop` takes
    that copy out of the call, so a timed decode measures the loop alone whichever layout the cache gives it (the
    copy is a per-call constant that a scanned loop pays and an unrolled one does not)."""
    from kvjax.state import StackedLayers  # noqa: PLC0415

    if isinstance(params["layers"], StackedLayers):
        return params
    shapes = jax.eval_shape(lambda p, s: stack_for_loop(model, p, s)[0], params, state)
    if not isinstance(shapes["layers"], StackedLayers):
        return params
    return _stack_params(params)


@jax.jit
def _stack_params(params):
    from kvjax.state import stack_layers  # noqa: PLC0415

    return {**params, "layers": stack_layers(params["layers"])}


def unstack_after_loop(state: KVState, layout) -> KVState:
    from kvjax.state import unpad_unstack  # noqa: PLC0415

    if layout is None:
        return state
    return state.replace(layers=unpad_unstack(state.layers, layout) if layout else state.layers.unstack())


def decode_hook(method, ctx, stacked: bool):
    """``hook(state, step_obs) -> state``: the method's decode phase, on a stacked cache when the method maps over
    layers (``stacked_decode``), else on the unstacked tuple (re-stacked afterwards)."""
    from kvjax.state import stack_layers  # noqa: PLC0415

    if not stacked or method.stacked_decode:
        return lambda s, o: method.decode(s, o, ctx)

    def hook(s, o):
        s = method.decode(s.replace(layers=s.layers.unstack()), o, ctx)
        return s.replace(layers=stack_layers(s.layers))

    return hook


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8, 9))
def decode_loop(model, params, logits, state, key, max_new, sampling, stop_tokens, method=None, ctx=None):
    """Samples ``max_new`` tokens starting from ``logits`` ``(B, V)``; runs ``method.decode`` every ``every`` steps.

    Returns ``(tokens (B, max_new), lengths (B,), state)``.
    """
    from kvjax.attention import Observe  # noqa: PLC0415

    b = logits.shape[0]
    stop = jnp.asarray(stop_tokens, jnp.int32) if stop_tokens else jnp.zeros((0,), jnp.int32)
    streaming = method is not None and method.has_decode()
    step_observe = method.decode_observe() if streaming else Observe()
    params, state, layout = stack_for_loop(model, params, state)
    hook = decode_hook(method, ctx, layout is not None) if streaming else None

    def body(carry):
        i, tok_logits, st, out, done, lengths, key = carry
        key, sub = jax.random.split(key)
        tok = sample_token(tok_logits, sub, sampling)
        tok = jnp.where(done, out[:, jnp.maximum(i - 1, 0)], tok)
        out = out.at[:, i].set(tok)
        lengths = jnp.where(done, lengths, i + 1)
        done = done | jnp.any(tok[:, None] == stop[None, :], axis=-1)
        lg, st, o = model.forward_impl(model.cfg, params, tok[:, None], st, None, observe=step_observe,
                                       impl=model.impl, logits="last")
        if streaming:
            st = jax.lax.cond((i + 1) % method.every == 0, lambda s: hook(s, o), lambda s: s, st)
        return i + 1, lg, st, out, done, lengths, key

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < max_new) & ~jnp.all(done)

    out0 = jnp.zeros((b, max_new), jnp.int32)
    init = (jnp.int32(0), logits, state, out0, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), key)
    _, _, state, out, _, lengths, _ = jax.lax.while_loop(cond, body, init)
    state = unstack_after_loop(state, layout)
    # Rows that stopped early: fill the tail with their last token (the stop token).
    last = jnp.take_along_axis(out, jnp.maximum(lengths - 1, 0)[:, None], axis=1)
    out = jnp.where(jnp.arange(max_new)[None] < lengths[:, None], out, last)
    return out, lengths, state


@dataclasses.dataclass
class ChunkedPrefill:
    logits: jax.Array  # (B, V) after the prompt's last token
    state: KVState
    peak_bytes: int  # the largest kvjax.nbytes(state) while the prompt was prefilled (after each chunk's write)
    chunk_bytes: list  # nbytes after each chunk's write (before its eviction)


def prefill_chunked(model: Model, params, prompt: jax.Array, method=None, *, chunk_size: int,
                    prompt_mask: jax.Array | None = None, decode_room: int = 0, dtype=jnp.float32,
                    scores_fn=None) -> ChunkedPrefill:
    """Chunked prefill with a method's ``chunk`` phase between chunks (bounded peak memory: Locret).

    The prompt is written ``chunk_size`` tokens at a time; after every chunk but the last the method's ``chunk``
    transform compresses the state, leaving room for the next chunk; after the last, its ``prefill`` transform leaves
    ``decode_room`` free slots. ``method=None`` is the full cache written chunk by chunk. ``scores_fn(i, chunk_obs)``
    is a test hook for methods that accept externally given scores (Locret's oracle). Returns a
    :class:`ChunkedPrefill` with the peak bytes held while prefilling.
    """
    from kvjax.compress.base import Context, Identity  # noqa: PLC0415
    from kvjax.state import nbytes  # noqa: PLC0415

    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    method = Identity() if method is None else method
    b, t = prompt.shape
    full = type(method) is Identity
    mask = jnp.ones(prompt.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
    bounds = list(range(0, t, chunk_size)) + [t]
    observe = method.observe()
    # A method's chunk phase bounds the global layers; sliding-window layers (Gemma 3) are left alone by every method,
    # so they get what a full prefill gives them (a ring of the window, or the whole prompt if it is shorter).
    state = model.init_state(b, t + decode_room if full else bounds[1], dtype, local_capacity=t + decode_room)
    peak, per_chunk, logits = 0, [], None
    for j in range(len(bounds) - 1):
        lo, hi = bounds[j], bounds[j + 1]
        logits, state, obs = model.jit_forward(params, prompt[:, lo:hi], state, mask[:, lo:hi], observe=observe,
                                               logits="last")
        per_chunk.append(nbytes(state))
        peak = max(peak, per_chunk[-1])
        if full:
            continue
        last = j == len(bounds) - 2
        room = decode_room if last else bounds[j + 2] - hi
        ctx = Context(cfg=model.cfg, decode_room=room, params=params, prompt_len=t)
        if j == 0 and scores_fn is None:
            method.validate(ctx)
        if scores_fn is not None:
            state, _ = method.evict_given(state, obs, ctx, scores_fn(j, obs), final=last)
        elif getattr(method, "jittable", True):
            phase = _apply_prefill if last else _apply_chunk
            state = phase(method, dataclasses.replace(ctx, params=None), state, obs)
        else:
            state = (method.prefill if last else method.chunk)(state, obs, ctx)[0]
    return ChunkedPrefill(logits=logits, state=state, peak_bytes=peak, chunk_bytes=per_chunk)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply_chunk(method, ctx, state, obs):
    return method.chunk(state, obs, ctx)[0]

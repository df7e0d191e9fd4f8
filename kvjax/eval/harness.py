"""The experiment harness: model x method x budget x task -> quality, bytes, speed.

One *cell* is (method variant, task, context length, depth, seed) for generation tasks, or (method variant,
perplexity segment batch) for perplexity. Each finished cell is appended as one JSON line to ``results.jsonl`` in the
run directory; a resumed run skips the cells already there. At the end the harness writes ``summary.csv``,
``summary.json``, prints the table and plots quality against KV bytes (``quality_vs_bytes.png``).

Measurements, per cell:

* quality: the task's scoring rule (``meta["metric"]`` of the example: ``exact_first`` for passkey, ``contains_all``
  for RULER-style tasks) on the greedy continuation, and the teacher-forced log-probability of the reference answer
  (a smoother signal than accuracy on a small model); perplexity and the KL divergence of next-token distributions
  from the full cache's on real text;
* bytes: :func:`kvjax.nbytes` of the state after prefill + compression (what the state *allocates*) and at the end
  of decoding, and of the full cache for the same prompt (the shared prefill's state), hence the ratio; beside it
  :func:`kvjax.state.valid_nbytes`, the bytes of the *valid* entries (slots holding a token; padding of ragged heads
  to the largest one and free decode room not charged), and its ratio to the full cache's valid bytes; on models
  with sliding-window layers (Gemma 3) both also for the global-attention layers alone (``*_global``), the part the
  methods compress (they leave the local rings alone);
* speed: prefill and compression seconds and decode tokens/s, timed with ``block_until_ready``; every program is
  compiled ahead of its timed call (``jit(...).lower(...).compile()``, which fills the call cache), so no figure
  includes compilation and nothing runs twice.

Every prompt is prefilled once (:func:`shared_prefill`, with the union of the observations all methods need) and
each method compresses that same state: methods are compared on identical inputs, and the run costs one prefill per
example instead of one per (method, example).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.compress.base import Context, Identity, Method, get_method
from kvjax.eval import scoring
from kvjax.eval.tasks import Example, format_prompt, get_task
from kvjax.generate import SamplingConfig, compress_prefilled, decode_loop, loop_params, precompile_prefilled
from kvjax.state import global_layer_nbytes, nbytes, valid_nbytes

PPL_TASK = "perplexity"
# Perplexity settings: "once" = compress the context once, then score the continuation in one chunk while the cache
# grows (decode-time eviction off: every method compared like one-shot methods, as kvpress does); "stream" = token by
# token through the cache with each method's decode phase (decode-time methods keep a fixed-size cache; one-shot
# methods have no decode phase, so their cache grows); "chunk" = the earlier mixed setting (one chunk for one-shot
# methods, stream for decode-time ones), kept for old configs.
PPL_MODES = ("once", "stream", "chunk")


def ppl_task_name(mode: str) -> str:
    """Task name of a perplexity setting in results and tables (``perplexity`` for the legacy ``chunk`` setting)."""
    return PPL_TASK if mode == "chunk" else f"{PPL_TASK}_{mode}"


def is_ppl_task(task: str) -> bool:
    return task == PPL_TASK or task.startswith(PPL_TASK + "_")


def grow_room(state, room: int):
    """``state`` with at least ``room`` free slots after the fullest head of every global dense layer, so that a
    continuation of ``room`` tokens is appended without decode-time eviction (decode-time methods size their cache to
    about their budget; StreamingLLM's ``[sinks | window ring]`` layout, and DuoAttention's streaming heads', become
    plain growing buffers). Sliding-window
    (local) layers keep their rings."""
    from kvjax.compress.duo_attention import DuoKV
    from kvjax.quant.cache import QuantizedKV, pad_slots
    from kvjax.state import DenseKV, StackedLayers, resize_slots

    def grow_dense(layer):
        if layer.ring_start >= 0:  # a ring that has wrapped holds `capacity` tokens; new ones go after them
            layer = layer.replace(ring_start=-1, fill=jnp.minimum(layer.fill, layer.capacity))
        need = int(np.max(np.asarray(layer.fill))) + room
        return resize_slots(layer, need) if layer.capacity < need else layer

    if isinstance(state.layers, StackedLayers):
        return state
    layers = []
    for layer in state.layers:
        if isinstance(layer, DenseKV) and not layer.window:
            layer = grow_dense(layer)
        elif type(layer) is DuoKV and not layer.window:  # DuoAttention: its streaming heads' ring grows like
            # StreamingLLM's (a chunk written into a ring at once would overwrite the window its first queries need)
            layer = layer.replace(full=grow_dense(layer.full) if layer.retrieval else layer.full,
                                  stream=grow_dense(layer.stream) if layer.streaming else layer.stream)
        elif type(layer) is QuantizedKV and not layer.window and layer.residual == 0 and layer.keep is None \
                and layer.spec.k_axis == "token":  # per-token codes (a decode-time evictor -> int8/int4, LaCache's)
            need = int(np.max(np.asarray(layer.fill))) + room
            if layer.capacity < need:
                n = need - layer.capacity
                layer = layer.replace(**{f: pad_slots(getattr(layer, f), n) for f in (
                    "k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")}, pos=pad_slots(layer.pos, n, -1))
        layers.append(layer)
    return state.replace(layers=tuple(layers))


def _global_tokens(state) -> int:
    """Valid (token-holding) slots summed over the global layers' heads (sliding-window layers excluded)."""
    from kvjax.state import StackedLayers

    layers = [state.layers.tree] if isinstance(state.layers, StackedLayers) else state.layers
    return sum(int(np.sum(np.asarray(layer.pos) >= 0)) for layer in layers
               if hasattr(layer, "pos") and not getattr(layer, "window", 0))


def _heads(state) -> int:
    from kvjax.state import StackedLayers

    layers = [state.layers.tree] if isinstance(state.layers, StackedLayers) else state.layers
    return sum(int(np.prod(layer.pos.shape[:-1])) for layer in layers
               if hasattr(layer, "pos") and not getattr(layer, "window", 0))


_COMPILER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvjax-compile")


# ----------------------------------------------------------------------------------------------------------------------
# Method variants from the config
# ----------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
    """One method with concrete hyper-parameters, and the label it carries in tables and plots."""

    label: str
    method: Method
    hparams: tuple[tuple[str, Any], ...]

    @property
    def is_full(self) -> bool:
        return isinstance(self.method, Identity)


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def expand_methods(methods_cfg: dict[str, dict]) -> list[Variant]:
    """``{"snapkv": {"budget": [128, 256], "window": 32}, ...}`` -> one :class:`Variant` per sweep point.

    A list/tuple value is a sweep; an entry may name its method with ``name`` (so one method can appear with several
    fixed settings under different keys); ``chain`` lists methods applied in order, e.g.
    ``{"name": "chain", "chain": ("snapkv", "kivi"), "snapkv": {"budget": 256}, "kivi": {"bits": 2}}``.
    """
    variants = []
    for key, raw in methods_cfg.items():
        raw = dict(raw or {})
        name = raw.pop("name", key)
        sweep_keys = [k for k, v in raw.items() if isinstance(v, (list, tuple)) and k != "chain"]
        empty = [k for k in sweep_keys if not raw[k]]
        if empty:
            raise ValueError(f"methods.{key}.{empty[0]}=(): an empty sweep runs nothing; give at least one value")
        raw = {k: (dict(v) if hasattr(v, "items") else v) for k, v in raw.items()}
        points: list[dict] = [{}]
        for k in sweep_keys:
            points = [{**p, k: v} for p in points for v in raw[k]]
        for point in points:
            hp = {k: v for k, v in raw.items() if k not in sweep_keys} | point
            method = _build(name, hp)
            shown = ",".join(f"{k}={v}" for k, v in point.items())
            label = key if not shown else f"{key}[{shown}]"
            variants.append(Variant(label, method, tuple(sorted((k, _hashable(v)) for k, v in hp.items()))))
    labels = [v.label for v in variants]
    dup = sorted({l for l in labels if labels.count(l) > 1})
    if dup:
        raise ValueError(f"duplicate method labels {dup}: give the entries distinct keys")
    return variants


def _hashable(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return tuple(v) if isinstance(v, list) else v


def _build(name: str, hp: dict) -> Method:
    if name != "chain":
        if isinstance(hp.get("base"), dict):  # a wrapped method given as {"name": ..., hyper-parameters} (KVCrush)
            inner = dict(hp["base"])
            if "name" not in inner:
                raise ValueError(f"{name}: a base given as a dict needs its method's name, e.g. "
                                 "{'name': 'snapkv', 'window': 32}")
            hp = {**hp, "base": get_method(inner.pop("name"), **inner)}
        return get_method(name, **hp)
    from kvjax.compress.base import chain

    hp = dict(hp)
    parts = hp.pop("chain", None)
    if not parts:
        raise ValueError("a chain entry needs chain=(method names, in order)")
    unknown = sorted(set(hp) - set(parts))
    if unknown:
        raise ValueError(f"chain entry keys {unknown} are not methods of the chain {tuple(parts)}; give each "
                         "method's hyper-parameters as a dict under its name")
    return chain(*(get_method(p, **dict(hp.get(p) or {})) for p in parts))


def method_budget(method: Method) -> int | None:
    """The token budget of a method (for the budget-vs-context check), if it has one."""
    inner = getattr(method, "methods", None)
    if inner:
        budgets = [b for b in (method_budget(m) for m in inner) if b is not None]
        return min(budgets) if budgets else None
    b = getattr(method, "budget", None)
    return int(b) if isinstance(b, (int, np.integer)) else None


# ----------------------------------------------------------------------------------------------------------------------
# Running cells
# ----------------------------------------------------------------------------------------------------------------------
def _ready(x):
    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


@dataclasses.dataclass
class Prepared:
    """A tokenized example, left-padded to the shape shared by its group."""

    example: Example
    tokens: np.ndarray  # (T,)
    mask: np.ndarray  # (T,) bool
    answer_ids: np.ndarray  # (A,) padded with 0
    answer_mask: np.ndarray


def prepare_examples(lm, examples: list[Example], style: str, answer_len: int = 16) -> list[Prepared]:
    """Tokenizes prompts (with the model's BOS policy) and left-pads the group to one length (one compile)."""
    tok = lm.tokenizer
    encoded = []
    for ex in examples:
        text = format_prompt(ex, "chat", lm.chat_prefix) if style == "chat" else format_prompt(ex, "plain")
        ids = tok.encode(text, add_bos=tok.add_bos_token and tok.bos_id is not None)
        ans = tok.encode(" " + ex.answers[0])[:answer_len]
        encoded.append((ex, ids, ans))
    t = max(len(ids) for _, ids, _ in encoded)
    out = []
    for ex, ids, ans in encoded:
        tokens = np.zeros((t,), np.int32)
        mask = np.zeros((t,), bool)
        tokens[t - len(ids):] = ids
        mask[t - len(ids):] = True
        a = np.zeros((answer_len,), np.int32)
        am = np.zeros((answer_len,), bool)
        a[: len(ans)] = ans
        am[: len(ans)] = True
        out.append(Prepared(ex, tokens, mask, a, am))
    return out


def pad_prepared(prepared: list[Prepared], length: int) -> list[Prepared]:
    """Left-pads prepared prompts further to ``length`` tokens (masked), so that groups of different tasks share one
    prompt shape and hence every compiled program."""
    out = []
    for p in prepared:
        extra = length - len(p.tokens)
        if extra < 0:
            raise ValueError(f"cannot pad a {len(p.tokens)}-token prompt to {length} tokens")
        out.append(dataclasses.replace(p, tokens=np.pad(p.tokens, (extra, 0)), mask=np.pad(p.mask, (extra, 0))))
    return out


def answer_logprob(model, params, state, last_logits, answer_ids, answer_mask, method=None, ctx=None) -> float:
    """Teacher-forced log p(answer | compressed context), summed over the answer's tokens.

    With a decode-time method (``method.has_decode()``) the answer goes through the cache token by token with the
    method's decode phase, as generation would; otherwise in one chunk.
    """
    if method is not None and method.has_decode():
        nll, _, _ = _stream_nll(model, method, ctx, params, state, jnp.asarray(answer_ids[None]), last_logits)
        return float(-np.asarray(nll[0])[: int(answer_mask.sum())].sum())
    first = np.asarray(jax.nn.log_softmax(last_logits[0]))[answer_ids[0]]
    if answer_mask.sum() <= 1:
        return float(first)
    inp = jnp.asarray(answer_ids[None, :-1])
    m = jnp.asarray(answer_mask[None, :-1] & answer_mask[None, 1:])
    logits, _, _ = model.jit_forward(params, inp, state, m, logits="all")
    rest = scoring.answer_token_logprobs(np.asarray(logits[0]), answer_ids[1:])
    n = int(answer_mask.sum()) - 1
    return float(first + rest[:n].sum())


def generation_room(prep: Prepared, max_new_tokens: int) -> int:
    """Free slots a generation cell needs after the prompt: the decoded tokens and the teacher-forced answer."""
    return max(max_new_tokens, len(prep.answer_ids))


def shared_prefill(lm, tokens: jax.Array, mask: jax.Array | None, variants: list[Variant], room: int,
                   precompile: bool = True):
    """Prefills a prompt once, into a full cache with ``room`` free slots, with the union of the observations the
    ``variants`` need; every variant is then compressed from this one state. Returns ``(logits, state, obs, seconds)``.

    ``precompile``: compile first, so that the timed call excludes compilation (true of every ``precompile`` below).
    """
    from kvjax.compress.base import merge_observe

    model, params = lm.model, lm.params
    observe = merge_observe(*(v.method.observe() for v in variants if not v.is_full))
    state = model.init_state(tokens.shape[0], tokens.shape[1] + room)
    if precompile:
        model.compile_forward(params, tokens, state, mask, observe=observe, logits="last")
    t0 = time.perf_counter()
    logits, state, obs = model.jit_forward(params, tokens, state, mask, observe=observe, logits="last")
    _ready((logits, state, obs))
    return logits, state, obs, time.perf_counter() - t0


def compress_variant(lm, variant: Variant, state, obs, room: int, prompt_len: int, precompile: bool = True):
    """The variant's one-shot compression of a shared prefill. Returns ``(state, seconds)``.

    Eagerly run methods (host-side allocations) have nothing to compile ahead: with ``precompile`` they run once
    untimed first, so that the small jitted pieces they call are compiled.
    """
    if variant.is_full:
        return state, 0.0
    ctx = Context(cfg=lm.cfg, decode_room=room, params=lm.params, prompt_len=prompt_len)
    if precompile and not precompile_prefilled(variant.method, state, obs, ctx):
        _ready(compress_prefilled(variant.method, state, obs, ctx))
    t0 = time.perf_counter()
    state = _ready(compress_prefilled(variant.method, state, obs, ctx))
    dt = time.perf_counter() - t0
    return lm.model.shard_state(state), dt  # host-side allocators return unsharded arrays: back onto the mesh


def run_generation_cell(lm, variant: Variant, prep: Prepared, max_new_tokens: int, prefilled,
                        precompile: bool = True) -> dict:
    """Compression of the shared prefill, teacher-forced answer log-prob, greedy decode and scoring of one example.

    ``prefilled`` = :func:`shared_prefill`'s result for this example. ``precompile``: compression and decoding are
    compiled before they are timed.
    """
    model, params = lm.model, lm.params
    logits, full_state, obs, prefill_s = prefilled
    room = generation_room(prep, max_new_tokens)
    state, compress_s = compress_variant(lm, variant, full_state, obs, room, len(prep.tokens), precompile)
    bytes_prefill, valid_prefill = nbytes(state), valid_nbytes(state)
    global_bytes = _global_bytes(model.cfg, state, full_state)
    method = None if variant.is_full else variant.method
    streaming = method if (method is not None and method.has_decode()) else None
    ctx = Context(cfg=model.cfg, decode_room=room, prompt_len=len(prep.tokens)) if streaming else None
    # The weights stacked for a scanned loop outside the timed call (a per-call copy that an unrolled loop, e.g.
    # DuoAttention's mixed layers, does not make): decode_tok_s is the loop's alone in every layout.
    args = (model, _ready(loop_params(model, params, state)), logits, state, jax.random.PRNGKey(0), max_new_tokens,
            SamplingConfig(), tuple(lm.stop_tokens()), streaming, ctx)
    # The decoding program compiles in a second thread while the answer's log-prob is computed (and its program
    # compiled) in this one: XLA compiles a program on one core, and compilation dominates short CPU runs.
    pending = _COMPILER.submit(lambda: decode_loop.lower(*args).compile()) if precompile else None
    logp = answer_logprob(model, params, state, logits, prep.answer_ids, prep.answer_mask, streaming, ctx)
    if pending is not None:
        pending.result()
    t2 = time.perf_counter()
    out, lengths, state = decode_loop(*args)
    _ready(out)
    t3 = time.perf_counter()
    n = int(lengths[0])
    text = lm.tokenizer.decode(np.asarray(out[0, :n]).tolist(), skip_special_tokens=True)
    ex = prep.example
    metric = ex.meta.get("metric", "contains_all")
    full_bytes = nbytes(full_state)
    full_valid = valid_nbytes(full_state)
    return dict(
        task=ex.task, context_tokens=int(ex.meta.get("requested_context_tokens", ex.context_tokens)),
        prompt_tokens=int(prep.mask.sum()), depth=None if math.isnan(ex.depth) else float(ex.depth), seed=ex.seed,
        prediction=text, answers=list(ex.answers), metric=metric, score=float(scoring.score(metric, text, ex.answers)),
        answer_logprob=logp, kv_bytes_prefill=bytes_prefill, kv_bytes_end=nbytes(state), kv_bytes_full=full_bytes,
        kv_valid_bytes_prefill=valid_prefill, kv_valid_bytes_full=full_valid,
        compression_ratio=full_bytes / max(1, bytes_prefill), valid_ratio=full_valid / max(1, valid_prefill),
        prefill_s=prefill_s + compress_s,
        compress_s=compress_s, decode_s=t3 - t2, decode_tokens=n, decode_tok_s=n / max(t3 - t2, 1e-9),
        **global_bytes,
    )


def _global_bytes(cfg, state, full_state) -> dict:
    """Allocated / valid bytes of the global-attention layers after prefill (+ compression) and of the full cache, for
    models with sliding-window layers (Gemma 3), whose rings the methods leave alone; ``{}`` for the others (all their
    layers are global, the whole-cache figures say it all) or when layers were merged."""
    if not any(cfg.layer_window(i) for i in range(cfg.num_layers)):
        return {}
    got, full = global_layer_nbytes(state, cfg), global_layer_nbytes(full_state, cfg)
    if got is None or full is None:
        return {}
    return dict(kv_bytes_prefill_global=got[0], kv_valid_bytes_prefill_global=got[1], kv_bytes_full_global=full[0],
                kv_valid_bytes_full_global=full[1])


def _stream_nll_impl(model, method, ctx, params, state, tokens, first_logits):
    """Teacher-forced token-by-token NLL through the cache (method.decode runs every ``every`` steps); the cache is
    carried stacked over layers like in :func:`kvjax.generate.decode_loop`."""
    from kvjax.attention import Observe
    from kvjax.generate import decode_hook, stack_for_loop, unstack_after_loop

    observe = method.decode_observe() if method is not None else Observe()
    params, state, layout = stack_for_loop(model, params, state)
    hook = decode_hook(method, ctx, layout is not None) if method is not None else None

    def step(carry, tok):
        st, logits, i = carry
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
        lg, st, o = model.forward_impl(model.cfg, params, tok[:, None], st, None, observe=observe, impl=model.impl,
                                       logits="last")
        if hook is not None:
            st = jax.lax.cond((i + 1) % method.every == 0, lambda s: hook(s, o), lambda s: s, st)
        return (st, lg, i + 1), (nll, logits)

    (st, _, _), (nll, logits) = jax.lax.scan(step, (state, first_logits, jnp.int32(0)), tokens.T)
    return nll.T, jnp.swapaxes(logits, 0, 1), unstack_after_loop(st, layout)


_stream_nll = jax.jit(_stream_nll_impl, static_argnums=(0, 1, 2))


@jax.jit
def _chunk_nll(logits_first, logits_rest, targets):
    """NLL of ``targets`` (B, M) given the prefill's last logits and the chunk's logits for positions 0..M-2."""
    logits = jnp.concatenate([logits_first[:, None], logits_rest[:, :-1]], axis=1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], logits


def run_perplexity_cell(lm, variant: Variant, segments: np.ndarray, context_tokens: int, mode: str,
                        reference: dict | None, prefilled, precompile: bool = True) -> tuple[dict, dict]:
    """Perplexity of ``segments[:, context_tokens:]`` after compressing the first ``context_tokens`` tokens.

    ``mode="once"``: compressed once, then the continuation is scored in one teacher-forced chunk while the cache grows
    (decode-time methods get room for it and their decode phase does not run). ``mode="stream"``: token by token
    through the cache with the method's decode phase every ``every`` steps (how StreamingLLM measures perplexity; a
    method without a decode phase lets its cache grow, ``cache_grows`` in the row). ``mode="chunk"`` (legacy): "once"
    for one-shot methods, "stream" for decode-time ones.
    ``prefilled`` = :func:`shared_prefill` of the contexts. Returns the result row and the logits/perplexity that
    serve as the full-cache reference.
    """
    if mode not in PPL_MODES:
        raise ValueError(f"perplexity mode must be one of {', '.join(PPL_MODES)}, got {mode!r}")
    model, params = lm.model, lm.params
    b = segments.shape[0]
    cont = jnp.asarray(segments[:, context_tokens:])
    m = cont.shape[1]
    last, full_state, obs, prefill_s = prefilled
    state, compress_s = compress_variant(lm, variant, full_state, obs, m, context_tokens, precompile)
    method = None if variant.is_full else variant.method
    bytes_prefill, valid_prefill = nbytes(state), valid_nbytes(state)
    tokens_prefill = _global_tokens(state)
    setting = mode
    if mode == "chunk":  # legacy: a decode-time method sees the continuation token by token (its cache holds ~budget)
        mode = "stream" if (method is not None and method.has_decode()) else "once"
    if mode == "once":
        state = grow_room(state, m)
        if precompile:
            model.compile_forward(params, cont, state, logits="all")
            _chunk_nll.lower(last, jax.ShapeDtypeStruct((b, m, last.shape[-1]), jnp.float32), cont).compile()
        t1 = time.perf_counter()
        rest, state, _ = model.jit_forward(params, cont, state, logits="all")
        nll, logits = _chunk_nll(last, rest, cont)
    else:  # stream
        ctx = Context(cfg=model.cfg, decode_room=m, prompt_len=context_tokens)
        streaming = method if (method is not None and method.has_decode()) else None
        args = (model, streaming, ctx if streaming else None, _ready(loop_params(model, params, state)), state, cont,
                last)  # (weights stacked outside the timed call, as for decoding)
        if precompile:
            _stream_nll.lower(*args).compile()
        t1 = time.perf_counter()
        nll, logits, state = _stream_nll(*args)
    _ready(nll)
    t2 = time.perf_counter()
    nll = np.asarray(nll, np.float64)
    row = dict(task=ppl_task_name(setting), context_tokens=context_tokens, eval_tokens=m, segments=b, mode=mode,
               setting=setting, nll=float(nll.mean()), perplexity=float(np.exp(nll.mean())),
               kv_bytes_prefill=bytes_prefill, kv_bytes_end=nbytes(state), kv_bytes_full=nbytes(full_state),
               kv_valid_bytes_prefill=valid_prefill, kv_valid_bytes_end=valid_nbytes(state),
               kv_valid_bytes_full=valid_nbytes(full_state), prefill_s=prefill_s + compress_s,
               compress_s=compress_s, eval_s=t2 - t1, eval_tok_s=b * m / max(t2 - t1, 1e-9),
               # the cache grew with the continuation (more than half of it kept) rather than holding a fixed size
               cache_grows=bool(_global_tokens(state) - tokens_prefill > _heads(state) * m / 2))
    row["compression_ratio"] = row["kv_bytes_full"] / max(1, bytes_prefill)
    row["valid_ratio"] = row["kv_valid_bytes_full"] / max(1, valid_prefill)
    if reference is not None:
        row["kl_vs_full"] = float(scoring.kl_divergence(np.asarray(reference["logits"]).reshape(-1, logits.shape[-1]),
                                                        np.asarray(logits).reshape(-1, logits.shape[-1])))
        row["ppl_ratio_vs_full"] = row["perplexity"] / reference["perplexity"]
    return row, {"logits": logits, "perplexity": row["perplexity"]}


# ----------------------------------------------------------------------------------------------------------------------
# Results file (resume) and summaries
# ----------------------------------------------------------------------------------------------------------------------
def cell_key(label: str, task: str, context_tokens: int, depth, seed) -> str:
    return f"{label}|{task}|{context_tokens}|{depth}|{seed}"


def read_results(path: str) -> list[dict]:
    """The rows of a results file, each cell once; torn or garbage lines are skipped with a warning, so their cells
    are redone (see :func:`kvjax.eval.rundir.read_rows`)."""
    from kvjax.eval.rundir import read_rows

    return read_rows(path)


def summarize(rows: Iterable[dict]) -> list[dict]:
    """One row per (method label, task, context length): quality with a 95% interval, bytes, ratio, speed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["task"], r["context_tokens"]), []).append(r)
    out = []
    for (label, task, ctx), rs in groups.items():
        s: dict[str, Any] = dict(label=label, method=rs[0]["method"], task=task, context_tokens=ctx, n=len(rs))
        if is_ppl_task(task):
            nll = float(np.mean([r["nll"] for r in rs]))
            s.update(quality=float(np.exp(nll)), quality_name="perplexity", ci_low=None, ci_high=None)
            kls = [r["kl_vs_full"] for r in rs if "kl_vs_full" in r]
            s["kl_vs_full"] = float(np.mean(kls)) if kls else 0.0
            warm = [r for r in rs if r.get("warm")] or rs
            s["tok_s"] = float(np.mean([r["eval_tok_s"] for r in warm]))
        else:
            ci = scoring.mean_and_ci([r["score"] for r in rs])
            s.update(quality=ci.mean, quality_name="accuracy", ci_low=ci.low, ci_high=ci.high,
                     answer_logprob=float(np.mean([r["answer_logprob"] for r in rs])))
            warm = [r for r in rs if r.get("warm")] or rs
            s["tok_s"] = float(np.mean([r["decode_tok_s"] for r in warm]))
            s["prefill_s"] = float(np.mean([r["prefill_s"] for r in warm]))
        s["kv_bytes"] = float(np.mean([r["kv_bytes_prefill"] for r in rs]))
        s["kv_bytes_full"] = float(np.mean([r["kv_bytes_full"] for r in rs]))
        s["compression_ratio"] = s["kv_bytes_full"] / max(1.0, s["kv_bytes"])
        if all("kv_valid_bytes_prefill" in r for r in rs):  # rows of runs before valid bytes were recorded lack it
            s["kv_valid_bytes"] = float(np.mean([r["kv_valid_bytes_prefill"] for r in rs]))
            s["kv_valid_bytes_full"] = float(np.mean([r["kv_valid_bytes_full"] for r in rs]))
            s["valid_ratio"] = s["kv_valid_bytes_full"] / max(1.0, s["kv_valid_bytes"])
        if is_ppl_task(task) and all("cache_grows" in r for r in rs):
            s["cache_grows"] = any(r["cache_grows"] for r in rs)
        s["speed_warm"] = any(r.get("warm") for r in rs)
        out.append(s)
    # Speed relative to the full cache of the same task and length, measured in the same run.
    base = {(s["task"], s["context_tokens"]): s["tok_s"] for s in out if s["method"] == "full"}
    for s in out:
        ref = base.get((s["task"], s["context_tokens"]))
        s["speed_vs_full"] = s["tok_s"] / ref if ref else None
    return sorted(out, key=lambda s: (s["task"], s["context_tokens"], s["label"]))


def format_table(summary: list[dict]) -> str:
    """A fixed-width text table of the summary."""
    head = f"{'task':<18}{'ctx':>6} {'method':<34}{'quality':>10}{'ans logp':>10}{'KV MiB':>9}{'ratio':>7}" \
           f"{'valid MiB':>10}{'v.ratio':>8}{'tok/s':>8}{'vs full':>8}"
    lines = [head, "-" * len(head)]
    for s in summary:
        q = f"{s['quality']:.3f}" if s["quality_name"] == "accuracy" else f"{s['quality']:.2f}"
        lp = f"{s['answer_logprob']:.2f}" if "answer_logprob" in s else f"{s.get('kl_vs_full', 0):.4f}"
        vs = f"{s['speed_vs_full']:.2f}" if s.get("speed_vs_full") else "-"
        vb = f"{s['kv_valid_bytes'] / 2**20:.2f}" if "kv_valid_bytes" in s else "-"
        vr = f"{s['valid_ratio']:.2f}" if "valid_ratio" in s else "-"
        lines.append(f"{s['task']:<18}{s['context_tokens']:>6} {s['label'][:33]:<34}{q:>10}{lp:>10}"
                     f"{s['kv_bytes'] / 2**20:>9.2f}{s['compression_ratio']:>7.2f}{vb:>10}{vr:>8}{s['tok_s']:>8.1f}"
                     f"{vs:>8}")
    return "\n".join(lines)


def plot_summary(summary: list[dict], path: str) -> None:
    """Quality against KV bytes per method variant (see :func:`kvjax.eval.report.plot_quality_vs_bytes`)."""
    from kvjax.eval.report import plot_quality_vs_bytes

    plot_quality_vs_bytes(summary, path)


def write_summary(run_dir: str, rows: list[dict]) -> list[dict]:
    """Writes ``summary.json`` and ``summary.csv`` (each through a temporary file renamed into place), the plot and
    ``report.md``."""
    import csv
    import io

    from kvjax.eval.rundir import atomic_write_text

    summary = summarize(rows)
    atomic_write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=1))
    if summary:
        keys = sorted({k for s in summary for k in s})
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(summary)
        atomic_write_text(os.path.join(run_dir, "summary.csv"), buf.getvalue())
    from kvjax.eval.report import write_report

    write_report(run_dir, summary)  # quality_vs_bytes.png and report.md
    return summary

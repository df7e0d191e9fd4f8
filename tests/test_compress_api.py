"""Generic properties of every registered eviction method (kvjax.compress), on synthetic caches and a tiny model.

* registry and hyper-parameter errors;
* property tests (hypothesis): after prefill and a few decode steps the state stays valid (positions unique per head,
  ``fill`` equal to the valid slots of compacted layers, positions among the original ones, stored keys/values those
  of the original tokens) and no head holds more than the method's budget;
* a budget covering the whole context is the identity: bit-exact logits against the full cache while decoding.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvjax
from kvjax.attention import Observe
from kvjax.compress import Context, available_methods, chain, get_method
from kvjax.compress.duo_attention import DuoGates, DuoKV
from kvjax.compress.locret import RetainingHeads, init_heads
from kvjax.config import ModelConfig
from kvjax.generate import _apply_prefill, decode_hook, prefill_compressed, stack_for_loop, unstack_after_loop
from kvjax.state import DenseKV, KVState, as_dense_layer, bound_layers

B, HQ, HKV, D, L = 2, 4, 2, 8, 2
W = 3  # observation window of every window-based factory (one compiled prefill forward for all)
T, ROOM = 12, 3  # prompt length and decoded tokens: every test uses these shapes so that compilations are shared
BUDGETS = (4, 7, T + ROOM)  # the last one covers prompt + decoded tokens (identity)
CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=L,
                  num_heads=HQ, num_kv_heads=HKV, head_dim=D, max_position_embeddings=256)


# ---------------------------------------------------------------------------------------------------------------------
# Method factories: small hyper-parameters so that tiny caches exercise every branch. ``budget`` is per layer and head.
# ---------------------------------------------------------------------------------------------------------------------
def _snap(name, **kw):
    return lambda b: get_method(name, budget=b, window=W, kernel=3, **kw)


FACTORIES = {
    "snapkv": _snap("snapkv"),
    "pyramidkv": _snap("pyramidkv", beta=2.0),
    "adakv": _snap("adakv", floor_alpha=0.34),
    "streaming_llm": lambda b: get_method("streaming_llm", n_sink=1, window=b - 1),
    "h2o": lambda b: get_method("h2o", budget=b),
    "scissorhands": lambda b: get_method("scissorhands", budget=b, history_window=W),
    "keyformer": lambda b: get_method("keyformer", budget=b),
    "lazy_eviction": lambda b: get_method("lazy_eviction", budget=b, window=W),
    "cake": lambda b: get_method("cake", budget=b, window=W, kernel=3),
    "d2o": lambda b: get_method("d2o", budget=b, n_sink=1),
    "kvcrush": lambda b: get_method("kvcrush", budget=b, base=get_method("snapkv", window=W, kernel=3),
                                    anchor="alternate"),
    # sinks 1 + buffer (b - 2) + compensation token = b slots in the non-retrieval heads; (layer 0, head 1) and
    # (layer 1, head 0) are retrieval heads (whole context)
    "razor": lambda b: get_method("razor", n_sink=1, min_buffer=b - 2, ratio=1e9, heads=((0, 1), (1, 0))),
    # a 2-layer ladder: blocks of 2 slots, layer 0 keeps the first, layer 1 the second; 1 sink
    "lacache": lambda b: get_method("lacache", cache_size=b, span=1, n_sink=1),
    "locret": lambda b: get_method("locret", budget=b, chunk_size=T, stabilizers=1, local_len=1, heads=LOCRET_HEADS),
    # (layer 0, head 0) and (layer 1, head 1) are retrieval heads (whole context), the others 1 sink + (b - 1) recent
    "duo_attention": lambda b: get_method("duo_attention", gates=DuoGates(np.array([[1.0, 0.0], [0.2, 0.9]])),
                                          n_sink=1, recent=b - 1),
}
LOCRET_HEADS = RetainingHeads(init_heads(CFG, jax.random.PRNGKey(0), 16))  # random retaining heads (Locret)
LAYER_ADAPTIVE = {"pyramidkv", "cake", "d2o"}  # per-layer budgets: the average over layers is the budget
SPLIT_HEADS = {"duo_attention"}  # retrieval and streaming heads attend as two groups (not one batched attention)
MERGING = {"d2o", "razor"}  # stored values may be merges of several tokens (Razor: the compensation token)
CTX = Context(cfg=CFG, decode_room=ROOM, prompt_len=T)


def budgets_of(name):
    """Budgets the property tests draw from (KVCrush needs base budget > window after its representatives)."""
    return (5, 7, T + ROOM) if name == "kvcrush" else BUDGETS


def registered_dense() -> list[str]:
    out = []
    for name in available_methods():
        try:
            m = get_method(name)
        except Exception:  # noqa: BLE001 (a method that needs arguments is not an eviction method of ours)
            continue
        if m.kind == "dense" and name != "full":
            out.append(name)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic caches and observations
# ---------------------------------------------------------------------------------------------------------------------
def _softmax(x, mask):
    x = np.where(mask, x, -np.inf)
    m = np.max(np.where(mask, x, -1e30), axis=-1, keepdims=True)
    e = np.where(mask, np.exp(x - m), 0.0)
    return e / np.maximum(e.sum(-1, keepdims=True), 1e-30)


def synthetic_state(rng, pads=(0, 0), observe=None, temperature=2.0):
    """A prefilled 2-layer state of ``T`` slots per row (``pads[b]`` left-padding slots) and the observations
    ``observe`` asks for (the keys and shapes the model returns, so jitted transforms are shared with model runs).

    Returns ``(state, obs, full)`` where ``full[l] = (k, v, pos)`` are the layer's original keys/values by position.
    """
    observe = Observe(colsum=True, window=W) if observe is None else observe
    b, t = len(pads), T
    pos = np.stack([np.concatenate([np.full(p, -1), np.arange(t - p)]) for p in pads]).astype(np.int32)  # (B, T)
    layers, obs, full = [], [], []
    for _ in range(L):
        k = rng.normal(size=(b, HKV, t, D)).astype(np.float32)
        v = rng.normal(size=(b, HKV, t, D)).astype(np.float32)
        qp = pos[:, None, :, None]
        kp = pos[:, None, None, :]
        vis = (kp >= 0) & (qp >= 0) & (kp <= qp)
        p = _softmax(rng.normal(size=(b, HQ, t, t)) * temperature, np.broadcast_to(vis, (b, HQ, t, t)))
        o = {}
        if observe.colsum:
            o["colsum"] = jnp.asarray(p.sum(axis=2), jnp.float32)
        if observe.window:
            w = min(observe.window, t)
            o["window"] = jnp.asarray(p[:, :, t - w:], jnp.float32)
            o["window_q"] = jnp.asarray(rng.normal(size=(b, HQ, w, D)), jnp.float32)
        if observe.inputs:  # pre-RoPE q, k, v of the prompt's tokens (Locret's retaining heads read them)
            o["qkv"] = jnp.asarray(rng.normal(size=(b, t, (HQ + 2 * HKV) * D)), jnp.float32)
        if observe.queries:
            o["queries"] = jnp.asarray(rng.normal(size=(b, HQ, t, D)) * temperature, jnp.float32)
            o["queries_pos"] = jnp.asarray(pos)
        layers.append(DenseKV(k=jnp.asarray(k), v=jnp.asarray(v),
                              pos=jnp.asarray(np.broadcast_to(pos[:, None], (b, HKV, t)).copy()),
                              fill=jnp.full((b, HKV), t, jnp.int32)))
        obs.append(o)
        full.append((k, v, pos))
    state = KVState(layers=tuple(layers), next_pos=jnp.asarray((pos >= 0).sum(1), jnp.int32),
                    rope_shift=jnp.zeros((b,), jnp.int32))
    return state, tuple(obs), full


def view(layer):
    """``layer`` as one DenseKV for the checks: a ragged layer's exact padded view; a DuoAttention layer's heads each
    from their part (retrieval heads from the plain buffer, streaming heads from the ring), padded with empty slots."""
    if not isinstance(layer, DuoKV):
        return as_dense_layer(layer, strict=False)
    parts = [(heads, part) for heads, part in ((layer.retrieval, layer.full), (layer.streaming, layer.stream)) if heads]
    b, d, cap = parts[0][1].k.shape[0], parts[0][1].k.shape[-1], max(part.capacity for _, part in parts)
    k, v = np.zeros((b, HKV, cap, d), np.float32), np.zeros((b, HKV, cap, d), np.float32)
    pos = np.full((b, HKV, cap), -1, np.int32)
    for heads, part in parts:
        c = part.capacity
        for j, h in enumerate(heads):
            k[:, h, :c], v[:, h, :c], pos[:, h, :c] = part.k[:, j], part.v[:, j], part.pos[:, j]
    ring = layer.stream.ring_start if layer.streaming else -1  # (a wrapped ring's slots are not in position order)
    return DenseKV(k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos),
                   fill=jnp.asarray((pos >= 0).sum(-1), jnp.int32), ring_start=ring)


def decode_step(rng, state, method, ctx, full, seen=None):
    """Appends one random token to every layer, then runs the method's decode hook with random attention.

    ``seen``: a list that receives ``(state before the hook, step observations)``.
    """
    layers, step_obs = [], []
    for i, layer in enumerate(state.layers):
        k = rng.normal(size=(B, HKV, 1, D)).astype(np.float32)
        v = rng.normal(size=(B, HKV, 1, D)).astype(np.float32)
        layer = layer.append(jnp.asarray(k), jnp.asarray(v), state.next_pos[:, None])
        fk, fv, fpos = full[i]
        full[i] = (np.concatenate([fk, k], 2), np.concatenate([fv, v], 2),
                   np.concatenate([fpos, np.asarray(state.next_pos)[:, None]], 1))
        valid = np.asarray(view(layer).valid)  # ragged layers: observations in padded-view order
        p = _softmax(rng.normal(size=(B, HQ, valid.shape[-1])) * 2, np.repeat(valid, HQ // HKV, axis=1))
        layers.append(layer)
        step_obs.append({"colsum": jnp.asarray(p, jnp.float32)})
    state = state.replace(layers=tuple(layers), next_pos=state.next_pos + 1)
    if seen is not None:
        seen.append((state, tuple(step_obs)))
    if method.has_decode():
        state = _jit_decode(method, ctx, state, tuple(step_obs))
    return state


_jit_decode = jax.jit(lambda method, ctx, state, obs: method.decode(state, obs, ctx), static_argnums=(0, 1))


def run_prefill(method, state, obs, ctx):
    """The method's prefill transform as ``generate`` runs it: jitted unless the method says otherwise."""
    if getattr(method, "jittable", True):
        return _apply_prefill(method, ctx, state, obs)  # generate's own jitted transform: compilations are shared
    return method.prefill(state, obs, ctx)[0]


def check_valid(state, full, *, check_values=True):
    """Positions unique among valid slots, fill consistent, positions/keys/values those of original tokens."""
    for i, layer in enumerate(state.layers):
        layer = view(layer)  # a ragged or DuoAttention layer is checked through its exact padded view
        pos = np.asarray(layer.pos)
        fill = np.asarray(layer.fill)
        fk, fv, fpos = full[i]
        for b in range(pos.shape[0]):
            for h in range(pos.shape[1]):
                p = pos[b, h]
                live = p[p >= 0]
                assert len(set(live.tolist())) == live.size, f"layer {i} row {b} head {h}: duplicate positions {p}"
                assert set(live.tolist()) <= set(fpos[b][fpos[b] >= 0].tolist()), f"unknown positions {p}"
                if layer.ring_start < 0:
                    assert fill[b, h] == live.size, f"layer {i}: fill {fill[b, h]} != {live.size} valid"
                    assert (p[:fill[b, h]] >= 0).all(), f"layer {i}: not compacted {p}"
                if check_values:
                    for s in np.nonzero(p >= 0)[0]:
                        src = int(np.nonzero(fpos[b] == p[s])[0][0])
                        np.testing.assert_array_equal(np.asarray(layer.v[b, h, s]), fv[b, h, src])
                        if layer.ring_start < 0:
                            np.testing.assert_array_equal(np.asarray(layer.k[b, h, s]), fk[b, h, src])


def held(layer) -> np.ndarray:
    return np.asarray(jnp.sum(view(layer).valid, axis=-1))


def check_budget(name, method, state, steps):
    """No head holds more than the method's budget (per-layer budgets for layer-adaptive methods)."""
    budget = getattr(method, "budget", 0)
    grow = 0 if method.has_decode() else steps  # one-shot methods let decoded tokens accumulate
    if name == "lazy_eviction":  # lagged: evicts every `window` steps
        grow = steps % method.window
    for i, layer in enumerate(state.layers):
        h = held(layer)
        if name == "duo_attention":  # retrieval heads keep every token, streaming heads sinks + recent (a ring)
            seen = np.asarray(state.next_pos)[:, None]  # tokens of each row so far (positions count from 0)
            assert (h[:, list(layer.streaming)] == np.minimum(seen, method.n_sink + method.recent)).all(), (name, i, h)
            assert (h[:, list(layer.retrieval)] == seen).all(), (name, i, h)
            continue
        if name == "razor":  # retrieval heads keep everything; the others sinks + buffer + compensation token
            local = [hd for hd in range(HKV) if (i, hd) not in method.heads]
            assert (h[:, local] <= method.n_sink + method.min_buffer + 1 + grow).all(), (name, i, h)
            continue
        if name == "adakv" and method.head_budgets == "adaptive":
            assert (h.sum(axis=1) <= HKV * (budget + grow)).all(), (name, h)
            continue
        if name in LAYER_ADAPTIVE:
            ex = layer.extras
            lb = ex["cake_budget"] if "cake_budget" in ex else ex.get("d2o_budget")
            if lb is not None:  # decode-time methods keep each layer at its own budget
                assert (h <= np.asarray(lb) + grow).all(), (name, i, h, np.asarray(lb))
            continue
        assert (h <= budget + grow).all(), (name, i, h, budget)
    if name in LAYER_ADAPTIVE and steps == 0:
        total = sum(held(layer) for layer in state.layers)
        assert (total <= L * budget).all(), (name, total)


def factory(name):
    if name not in FACTORIES:
        pytest.skip(f"{name!r} is registered as a dense method but has no entry in this eviction test table")
    return FACTORIES[name]


ALL = sorted(set(FACTORIES) | set(registered_dense()))  # every registered dense method (table-less ones skip)


@pytest.mark.parametrize("name", ALL)
def test_property_state_valid_and_within_budget(name):
    make = factory(name)

    # Host-allocating methods get data-dependent cache sizes (a compilation per new size): fewer examples.
    @settings(max_examples=16 if getattr(make(7), "jittable", True) else 6, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(seed=st.integers(0, 2 ** 16), pad0=st.integers(0, 4), pad1=st.integers(0, 4),
           budget=st.sampled_from(budgets_of(name)), steps=st.integers(0, ROOM))
    def prop(seed, pad0, pad1, budget, steps):
        rng = np.random.default_rng(seed)
        method = make(budget)
        state, obs, full = synthetic_state(rng, (pad0, pad1), method.observe())
        state = run_prefill(method, state, obs, CTX)
        check_valid(state, full, check_values=name not in MERGING)
        check_budget(name, method, state, 0)
        for s in range(steps):
            state = decode_step(rng, state, method, CTX, full)
            check_valid(state, full, check_values=name not in MERGING)
            check_budget(name, method, state, s + 1)

    prop()


def test_factories_cover_registered_eviction_methods():
    """Every dense method of this package's eviction family is in the property table (others are skipped)."""
    ours = {"snapkv", "pyramidkv", "adakv", "streaming_llm", "h2o", "scissorhands", "keyformer", "lazy_eviction",
            "cake", "d2o", "kvcrush"}
    assert ours <= set(available_methods())
    assert ours <= set(FACTORIES)


# ---------------------------------------------------------------------------------------------------------------------
# Identity: a budget covering prompt + decoded tokens leaves logits bit-exact
# ---------------------------------------------------------------------------------------------------------------------
def tiny_params(cfg: ModelConfig, seed: int = 0):
    """Random kvjax params for ``cfg`` (Llama layout, ``(in, out)`` weights)."""
    rng = np.random.default_rng(seed)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    w = lambda *s: jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)  # noqa: E731
    layers = tuple({"attn_norm": 1 + w(d) * 0.1, "q": w(d, cfg.num_heads * hd), "k": w(d, cfg.num_kv_heads * hd),
                    "v": w(d, cfg.num_kv_heads * hd), "o": w(cfg.num_heads * hd, d), "mlp_norm": 1 + w(d) * 0.1,
                    "gate": w(d, f), "up": w(d, f), "down": w(f, d)} for _ in range(cfg.num_layers))
    return {"embed": w(cfg.vocab_size, d) * 3, "norm": 1 + w(d) * 0.1, "lm_head": w(d, cfg.vocab_size),
            "layers": layers}


@pytest.fixture(scope="module")
def tiny():
    return kvjax.Model(CFG), tiny_params(CFG)


def pad_room(state, room):
    """The full cache with ``room`` free slots per layer (same prefill numerics as a compressed run)."""
    layers = []
    for layer in state.layers:
        pad = lambda x, v: jnp.pad(x, [(0, 0), (0, 0), (0, room)] + [(0, 0)] * (x.ndim - 3), constant_values=v)  # noqa
        layers.append(layer.replace(k=pad(layer.k, 0), v=pad(layer.v, 0), pos=pad(layer.pos, -1)))
    return state.replace(layers=tuple(layers))


def decode_logits(model, params, state, tokens, method=None, ctx=None):
    """Eager decode of ``tokens`` ``(B, n)`` one at a time; the method's decode hook after every step."""
    out = []
    for j in range(tokens.shape[1]):
        observe = method.decode_observe() if method is not None and method.has_decode() else kvjax.attention.Observe()
        lg, state, o = model.forward_impl(model.cfg, params, tokens[:, j:j + 1], state, None, observe=observe,
                                          logits="last")
        if method is not None and method.has_decode():
            state = _jit_decode(method, ctx, state, o)
        out.append(np.asarray(lg))
    return np.stack(out, 1), state


def model_prefill(model, params, prompt, observe):
    """The model's prefill into a cache of exactly the prompt's length, with the observations ``observe`` asks for."""
    _, state, obs = model.jit_forward(params, prompt, model.init_state(prompt.shape[0], prompt.shape[1]), None,
                                      observe=observe, logits="last")
    return state, obs


@pytest.fixture(scope="module")
def identity_case(tiny):
    """The prompt, the decoded tokens, and the full cache's decode logits per observation kind (bit-exactness needs the
    reference prefilled by the same compiled program as the method's prefill; methods asking for the same
    observations share it)."""
    model, params = tiny
    rng = np.random.default_rng(1)
    prompt = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, ROOM)), jnp.int32)
    wants = {}

    def want(observe, state):
        if observe not in wants:
            wants[observe] = decode_logits(model, params, pad_room(state, ROOM), tokens)[0]
        return wants[observe]

    return prompt, tokens, want


@pytest.mark.parametrize("name", ALL)
def test_budget_covering_context_is_identity(tiny, identity_case, name):
    factory(name)
    model, params = tiny
    prompt, tokens, reference = identity_case
    method = FACTORIES[name](T + ROOM)
    state, obs = model_prefill(model, params, prompt, method.observe())
    compressed = run_prefill(method, state, obs, CTX)
    assert all(layer.capacity == T + ROOM for layer in compressed.layers)
    want = reference(method.observe(), state)
    got, _ = decode_logits(model, params, compressed, tokens, method, CTX)
    if name in SPLIT_HEADS:  # its heads attend in two separately computed groups: equal up to f32 summation order
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------------------------------
# Registry and hyper-parameter errors
# ---------------------------------------------------------------------------------------------------------------------
def test_unknown_method_and_hyperparameter():
    with pytest.raises(ValueError, match="unknown compression method 'nope'"):
        get_method("nope")
    with pytest.raises(ValueError, match="no hyper-parameter"):
        get_method("h2o", budgett=3)


@pytest.mark.parametrize("name,hp,match", [
    ("snapkv", dict(window=-1), "window must be > 0"),
    ("snapkv", dict(kernel=4), "odd"),
    ("snapkv", dict(budget=8, window=8), "must exceed the observation window"),
    ("pyramidkv", dict(beta=0.5), "beta must be >= 1"),
    ("pyramidkv", dict(budget=4, window=8), "must exceed the observation window"),
    ("adakv", dict(head_budgets="ragged"), "head_budgets"),
    ("adakv", dict(floor_alpha=1.5), "floor_alpha"),
    ("streaming_llm", dict(window=-3), "window must be > 0"),
    ("streaming_llm", dict(n_sink=-1), "n_sink must be >= 0"),
    ("h2o", dict(budget=0), "budget must be > 0"),
    ("h2o", dict(heavy_ratio=1.5), "heavy_ratio"),
    ("scissorhands", dict(budget=8, recent_window=6), "recent_window"),
    ("scissorhands", dict(drop_fraction=0.0), "drop_fraction"),
    ("scissorhands", dict(history_window=-2), "history_window must be > 0"),
    ("keyformer", dict(tau_init=0.0), "tau_init must be > 0"),
    ("keyformer", dict(recent_ratio=2.0), "recent_ratio"),
    ("lazy_eviction", dict(budget=8, window=16), "at least the observation window"),
    ("lazy_eviction", dict(window=0), "window must be > 0"),
    ("cake", dict(kernel=2), "odd"),
    ("cake", dict(budget=16, window=16), "must exceed the observation window"),
    ("cake", dict(tau1=-1.0), "tau1 must be > 0"),
    ("d2o", dict(budget=6, n_sink=4), "sink"),
    ("d2o", dict(ema_beta=0.0), "ema_beta"),
    ("kvcrush", dict(budget=40), "rejects it"),  # 30 tokens left to SnapKV's 32-token window
    ("kvcrush", dict(base="h2o"), "decode phase"),
    ("kvcrush", dict(base="kvcrush"), "itself"),
    ("kvcrush", dict(base="nope"), "unknown compression method"),
    ("kvcrush", dict(anchor="median"), "anchor"),
    ("kvcrush", dict(budget_fraction_for_representatives=1.0), "budget_fraction_for_representatives"),
])
def test_bad_hyperparameters(name, hp, match):
    with pytest.raises(ValueError, match=match):
        get_method(name, **hp)


def test_registered_methods_construct_and_describe():
    for name in registered_dense():
        m = get_method(name)
        assert m.describe().startswith(name)
        hash(m)  # static jit argument


def test_kvcrush_wraps_a_method_instance_and_chains():
    base = get_method("snapkv", window=4)
    m = get_method("kvcrush", base=base, budget=16, budget_fraction_for_representatives=0.25)
    assert m.base_method.budget == 12 and m.base_method.window == 4 and m.n_rep == 4
    c = chain(m, get_method("h2o", budget=32))
    assert c.observe().window == 4 and c.observe().colsum


# ---------------------------------------------------------------------------------------------------------------------
# Batch independence: every registered method gives each row of a batch the result it gives that row alone
# ---------------------------------------------------------------------------------------------------------------------
SHORT = 8  # the short prompt's length; the long one has T tokens (the short one is left-padded by T - SHORT)


def _duo():
    from kvjax.compress.duo_attention import DuoGates  # noqa: PLC0415

    return get_method("duo_attention", gates=DuoGates(np.array([[1.0, 0.0], [0.2, 0.9]])), n_sink=1, recent=3)


# Small hyper-parameters so that the short prompt is compressed too (defaults would keep a 12-token prompt whole).
# A method without an entry runs with its defaults: a newly registered method is checked automatically.
BATCH_METHODS = {
    **{name: (lambda f=f: f(5)) for name, f in FACTORIES.items()},
    "kvcrush": lambda: FACTORIES["kvcrush"](6),
    # Between the two prompt lengths: the short row is kept whole, the long one gets pyramidal layer budgets.
    "pyramidkv": lambda: FACTORIES["pyramidkv"](9),
    "kivi": lambda: get_method("kivi", bits=2, group=4, residual=4),
    "gear": lambda: get_method("gear", buffer=4),
    "mikv": lambda: get_method("mikv", window=W, group=4),
    "duo_attention": _duo,
    "minicache": lambda: get_method("minicache", start_layer=0),  # the tiny model's 2 layers are one pair
    "xkv": lambda: get_method("xkv", group_size=2, rank_k=3, rank_v=5),
}


def batch_method(name):
    make = BATCH_METHODS.get(name)
    return make() if make is not None else get_method(name)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _forced_decode(model, method, ctx, params, state, tokens):
    """``generate``'s decode loop, teacher-forced with ``tokens`` ``(B, n)``: logits of every step and the state."""
    streaming = method is not None and method.has_decode()
    step_observe = method.decode_observe() if streaming else kvjax.attention.Observe()
    params, state, layout = stack_for_loop(model, params, state)
    hook = decode_hook(method, ctx, layout is not None) if streaming else None

    def body(st, tok):
        lg, st, o = model.forward_impl(model.cfg, params, tok[:, None], st, None, observe=step_observe,
                                       impl=model.impl, logits="last")
        return (hook(st, o) if streaming else st), lg

    st, logits = jax.lax.scan(body, state, tokens.T)
    return jnp.swapaxes(logits, 0, 1), unstack_after_loop(st, layout)


def cache_contents(state) -> list:
    """Per layer: per row and head, ``{position: (key, value)}`` of what the cache holds (dequantized for packed
    layers; None for a layer class without ``dense()``)."""
    def views(layer):  # (pos, k, v) of the layer, or of its parts when it has no single dense view (DuoAttention)
        if hasattr(layer, "offsets"):  # ragged (flat) storage: head h owns flat slots [offsets[h], offsets[h + 1])
            off, pos, k, v = (np.asarray(x) for x in (layer.offsets, layer.pos, layer.k, layer.v))
            b, h = off.shape[0], off.shape[1] - 1
            seg = [[range(off[i, j], off[i, j + 1]) for j in range(h)] for i in range(b)]
            width = max(len(r) for row in seg for r in row)
            idx = np.asarray([[list(r) + [r.start] * (width - len(r)) for r in row] for row in seg])  # (B, H, W)
            ok = np.asarray([[[s < len(r) for s in range(width)] for r in row] for row in seg])
            take = lambda x: np.take_along_axis(x, idx.reshape((b, -1) + (1,) * (x.ndim - 2)), axis=1).reshape(  # noqa
                b, h, width, *x.shape[2:])
            return [(np.where(ok, take(pos), -1), take(k), take(v))]
        try:
            return [(layer.pos, *layer.dense())]
        except NotImplementedError:
            parts = [getattr(layer, f.name) for f in dataclasses.fields(layer)]
            return [v for p in parts if hasattr(p, "dense") and hasattr(p, "pos") for v in views(p)]

    out = []
    for layer in bound_layers(state):  # cross-layer caches (xKV) with their group's shared factors attached
        if not (hasattr(layer, "dense") and hasattr(layer, "pos")):
            out.append(None)
            continue
        rows = None
        for pos, k, v in views(layer):
            pos, k, v = np.asarray(pos), np.asarray(k, np.float32), np.asarray(v, np.float32)
            part = [[{int(p): (k[b, h, s], v[b, h, s]) for s, p in enumerate(pos[b, h]) if p >= 0}
                     for h in range(pos.shape[1])] for b in range(pos.shape[0])]
            rows = part if rows is None else [r + q for r, q in zip(rows, part)]
        out.append(rows)
    return out


def run_rows(model, params, method, prompt, mask, tokens):
    """Prefill + compression as ``generate`` runs them; a method with a decode phase then has ``tokens`` teacher-forced
    through the decode loop. Returns (logits ``(B, 1 + steps, V)``, cache contents after prefill, at the end)."""
    ctx = Context(cfg=model.cfg, decode_room=tokens.shape[1], prompt_len=prompt.shape[1])
    logits, state = prefill_compressed(model, params, prompt, method=method, prompt_mask=mask,
                                       decode_room=tokens.shape[1])
    logits = np.asarray(logits)[:, None]
    after_prefill = cache_contents(state)
    if not method.has_decode():  # the compressed cache determines everything that follows: compare it directly
        return logits, after_prefill, after_prefill
    steps, state = _forced_decode(model, method, ctx, params, state, tokens)
    return np.concatenate([logits, np.asarray(steps)], 1), after_prefill, cache_contents(state)


def same_contents(got, ref) -> bool:
    """One row's cache contents (per head ``{position: (k, v)}``) equal up to float noise."""
    if [sorted(h) for h in got] != [sorted(h) for h in ref]:
        return False
    return all(np.allclose(g[p][i], r[p][i], rtol=1e-4, atol=1e-4) for g, r in zip(got, ref) for p in g
               for i in (0, 1))


# Methods that still fail the check, with who fixes them: strict, so the entry must go once the method passes.
BATCH_DEPENDENT_PENDING: dict[str, str] = {}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=BATCH_DEPENDENT_PENDING[n], strict=True))
                                  if n in BATCH_DEPENDENT_PENDING else n for n in available_methods()])
def test_rows_are_batch_independent(tiny, name):
    """Batch 2 (a short prompt left-padded beside a long one) against each prompt alone (a batch of two copies of
    it, no padding): the same cache after compression (positions, keys and values per layer and head; dequantized for
    packed caches), and for methods with a decode phase the same logits at every decoding step and the same cache
    afterwards. Budgets must come from each row's own length, random noise from per-row (layout-free) keys."""
    model, params = tiny
    method = batch_method(name)
    rng = np.random.default_rng(7)
    short, long_ = rng.integers(0, CFG.vocab_size, SHORT), rng.integers(0, CFG.vocab_size, T)
    tokens = rng.integers(0, CFG.vocab_size, (2, ROOM))
    mixed = np.stack([np.concatenate([np.zeros(T - SHORT, np.int64), short]), long_])
    mask = np.ones((2, T), bool)
    mask[0, :T - SHORT] = False
    asarr = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    got = run_rows(model, params, method, asarr(mixed), jnp.asarray(mask), asarr(tokens))
    alone = [run_rows(model, params, method, asarr(np.stack([short, short])), None, asarr(tokens[[0, 0]])),
             run_rows(model, params, method, asarr(np.stack([long_, long_])), jnp.ones((2, T), bool),
                      asarr(tokens[[1, 1]]))]
    for row, ref in enumerate(alone):
        np.testing.assert_allclose(got[0][row], ref[0][0], rtol=1e-4, atol=1e-4,
                                   err_msg=f"{name}: row {row}'s logits depend on the other row of the batch")
        for when, g, r in (("after prefill", got[1], ref[1]), ("after decoding", got[2], ref[2])):
            for i, (gl, rl) in enumerate(zip(g, r)):
                if gl is not None:
                    assert same_contents(gl[row], rl[0]), \
                        f"{name}: row {row}'s cache differs in layer {i} {when} in a batch ({sorted(gl[row][0])} " \
                        f"vs alone {sorted(rl[0][0])} in head 0)"

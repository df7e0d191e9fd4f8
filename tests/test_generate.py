"""Sampling, stop tokens and the jitted decode loop."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.checkpoints.safetensors import load_safetensors
from kvjax.generate import SamplingConfig, generate, sample_token

from conftest import make_hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _, path = make_hf_model("llama", tmp_path_factory)
    cfg, params = load_safetensors(path, progress=False)
    return kvjax.Model(cfg), params


def test_top_k_only_samples_top_tokens():
    logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]] * 512))
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    toks = np.concatenate([np.asarray(sample_token(logits, k, SamplingConfig(temperature=1.0, top_k=2))) for k in keys])
    assert set(toks) == {2, 3}
    frac3 = np.mean(toks == 3)
    assert abs(frac3 - 0.4 / 0.7) < 0.05


def test_top_p_keeps_smallest_nucleus():
    logits = jnp.log(jnp.array([[0.05, 0.15, 0.3, 0.5]] * 1024))
    toks = np.asarray(sample_token(logits, jax.random.PRNGKey(1), SamplingConfig(temperature=1.0, top_p=0.75)))
    assert set(toks) == {2, 3}  # 0.5 < 0.75 <= 0.5 + 0.3


def test_temperature_sampling_matches_softmax():
    p = np.array([0.1, 0.6, 0.3])
    logits = jnp.log(jnp.asarray([p] * 4000))
    toks = np.asarray(sample_token(logits, jax.random.PRNGKey(2), SamplingConfig(temperature=1.0)))
    np.testing.assert_allclose(np.bincount(toks, minlength=3) / len(toks), p, atol=0.03)


def test_greedy_is_argmax():
    logits = jnp.asarray([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    np.testing.assert_array_equal(np.asarray(sample_token(logits, jax.random.PRNGKey(0), SamplingConfig())), [1, 0])


def test_sampling_is_reproducible_and_key_dependent(tiny):
    model, params = tiny
    prompt = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
    cfg = SamplingConfig(temperature=1.0, top_k=50)
    a = generate(model, params, prompt, max_new_tokens=12, sampling=cfg, key=jax.random.PRNGKey(7))
    b = generate(model, params, prompt, max_new_tokens=12, sampling=cfg, key=jax.random.PRNGKey(7))
    c = generate(model, params, prompt, max_new_tokens=12, sampling=cfg, key=jax.random.PRNGKey(8))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_stop_tokens_end_rows_independently(tiny):
    model, params = tiny
    prompt = jnp.asarray([[5, 6, 7], [9, 10, 11]], jnp.int32)
    free = generate(model, params, prompt, max_new_tokens=10)
    stop = int(free.tokens[0, 2])  # row 0 emits this at step 3
    out = generate(model, params, prompt, max_new_tokens=10, stop_tokens=(stop,))
    toks = np.asarray(out.tokens)
    assert int(out.lengths[0]) <= 3 and toks[0, int(out.lengths[0]) - 1] == stop
    assert np.all(toks[0, int(out.lengths[0]):] == stop)
    row1 = np.asarray(free.tokens[1])
    first = np.argmax(row1 == stop) + 1 if np.any(row1 == stop) else 10
    assert int(out.lengths[1]) == first
    np.testing.assert_array_equal(toks[1, :first], row1[:first])


def test_batched_generation_with_left_padding_matches_single(tiny):
    model, params = tiny
    a = np.array([[0, 0, 3, 4, 5]], np.int32)
    b = np.array([[8, 9, 10, 11, 12]], np.int32)
    batch = jnp.asarray(np.concatenate([a, b]))
    mask = jnp.asarray([[False, False, True, True, True], [True] * 5])
    out = generate(model, params, batch, prompt_mask=mask, max_new_tokens=8)
    single = generate(model, params, jnp.asarray(a[:, 2:]), max_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), np.asarray(single.tokens[0]))


def test_layers_differing_in_capacity_scan_padded_like_unrolled(tiny, monkeypatch):
    """Per-layer budgets leave layers of different capacities: the forward pass and the decode loop pad them to one
    stack (one scan over layers) and must give exactly what running the layers one by one gives."""
    import kvjax.generate as gen
    import kvjax.models.llama as llama
    from kvjax.attention import Observe
    from kvjax.state import resize_slots

    model, params = tiny
    prompt = jnp.asarray([[5, 9, 2, 7, 11, 3, 8, 1]], jnp.int32)
    _, state, _ = model.jit_forward(params, prompt, model.init_state(1, 20), logits="last")
    caps = [14 + 2 * i for i in range(len(state.layers))]
    state = state.replace(layers=tuple(resize_slots(l, c) for l, c in zip(state.layers, caps)))
    nxt = jnp.asarray([[4, 6]], jnp.int32)

    def run():
        lg, st, obs = model.forward(params, nxt, state, observe=Observe(colsum=True), logits="all")
        out = generate(model, params, prompt[:, -1:], state=st, max_new_tokens=3, method=None)
        return lg, st, obs, out

    lg, st, obs, out = run()
    assert [l.capacity for l in st.layers] == caps
    assert [o["colsum"].shape[-1] for o in obs] == caps
    monkeypatch.setattr(llama, "pad_stack", lambda layers: None)  # reference: layers unrolled one by one
    monkeypatch.setattr(gen, "stack_for_loop", lambda m, p, s: (p, s, None))
    lg0, st0, obs0, out0 = run()
    np.testing.assert_allclose(np.asarray(lg), np.asarray(lg0), atol=1e-5)
    for a, b, oa, ob in zip(st.layers, st0.layers, obs, obs0):
        np.testing.assert_array_equal(np.asarray(a.pos), np.asarray(b.pos))
        np.testing.assert_allclose(np.asarray(a.k), np.asarray(b.k), atol=1e-6)
        np.testing.assert_allclose(np.asarray(oa["colsum"]), np.asarray(ob["colsum"]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(out0.tokens))
    assert [l.capacity for l in out.state.layers] == caps


def test_loop_params_take_the_weight_copy_out_of_the_decode_loop(tiny, monkeypatch):
    """Weights stacked once outside the loop (how the harness times decode) decode exactly as the loop's own copy, for
    a cache the loop scans over and for one it must unroll (the stacked weights are split again for it)."""
    import kvjax.state as kstate
    from kvjax.generate import decode_loop, loop_params
    from kvjax.state import StackedLayers, resize_slots

    model, params = tiny
    prompt = jnp.asarray([[5, 9, 2, 7, 11, 3, 8, 1]], jnp.int32)
    logits, state, _ = model.jit_forward(params, prompt, model.init_state(1, 16), logits="last")
    rest = (jax.random.PRNGKey(0), 5, SamplingConfig(), ())
    stacked = loop_params(model, params, state)
    assert isinstance(stacked["layers"], StackedLayers) and not isinstance(params["layers"], StackedLayers)
    assert loop_params(model, stacked, state) is stacked
    for st in (state, state.replace(layers=tuple(resize_slots(l, 14 + 2 * i) for i, l in enumerate(state.layers)))):
        if st is not state:  # layers of different capacities that the loop may not pad: it runs them unrolled
            monkeypatch.setattr(kstate, "pad_stack", lambda layers: None)
            assert loop_params(model, params, st) is params
        want, got = decode_loop(model, params, logits, st, *rest), decode_loop(model, stacked, logits, st, *rest)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        for a, b in zip(got[2].layers, want[2].layers):
            assert a.capacity == b.capacity
            np.testing.assert_array_equal(np.asarray(a.k), np.asarray(b.k))
            np.testing.assert_array_equal(np.asarray(a.pos), np.asarray(b.pos))

"""DuoAttention (arXiv 2410.10819): the gated training forward equals the model; deployment with every gate at 1 is
the full cache, at 0 StreamingLLM (sinks + recent, original positions), and streaming heads really hold fewer
bytes; gate training on the tiny random model through launch's run_training."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.compress import Context, get_method
from kvjax.compress.duo_attention import DuoGates, DuoKV, deployment_pattern
from kvjax.generate import prefill_compressed
from kvjax.models.llama import lm_logits
from kvjax.train.duo import gated_hidden
from tests.test_locret import CFG, tiny_params

T, STEPS = 20, 4


@pytest.fixture(scope="module")
def tiny():
    model, params = kvjax.Model(CFG), tiny_params(CFG)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, T)), jnp.int32)
    follow = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, STEPS)), jnp.int32)
    return model, params, prompt, follow


def decode(model, params, state, tokens, method=None):
    out = []
    for j in range(tokens.shape[1]):
        lg, state = model.jit_decode_step(params, tokens[:, j], state)
        if method is not None and method.has_decode():
            state = method.decode(state, (), Context(cfg=CFG))
        out.append(np.asarray(lg))
    return np.stack(out, 1), state


def test_gated_forward_with_all_gates_one_is_the_model(tiny):
    model, params, prompt, _ = tiny
    mask = jnp.ones(prompt.shape, bool)
    h = gated_hidden(CFG, params, jnp.ones((2, 2)), prompt, mask, 2, 4)
    got = lm_logits(CFG, params, h, mask, "all", final_norm=lambda x: x)
    want, _ = model.jit_prefill(params, prompt, model.init_state(2, T))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)


def test_all_gates_one_is_full_and_all_gates_zero_is_streaming_llm(tiny):
    model, params, prompt, follow = tiny
    full_logits, full_state = prefill_compressed(model, params, prompt, decode_room=STEPS)
    want, _ = decode(model, params, full_state, follow)

    ones = get_method("duo_attention", gates=DuoGates(np.ones((2, 2))), n_sink=2, recent=5)
    lg, st = prefill_compressed(model, params, prompt, method=ones, decode_room=STEPS)
    assert all(isinstance(layer, DuoKV) and not layer.streaming for layer in st.layers)
    got, _ = decode(model, params, st, follow, ones)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lg), np.asarray(full_logits), rtol=1e-6)

    zeros = get_method("duo_attention", gates=DuoGates(np.zeros((2, 2))), n_sink=2, recent=5)
    sllm = get_method("streaming_llm", n_sink=2, window=5, reposition=False)
    _, st0 = prefill_compressed(model, params, prompt, method=zeros, decode_room=STEPS)
    _, sts = prefill_compressed(model, params, prompt, method=sllm, decode_room=STEPS)
    got0, end0 = decode(model, params, st0, follow, zeros)
    want0, _ = decode(model, params, sts, follow)
    np.testing.assert_allclose(got0, want0, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got0, want, atol=1e-3)  # streaming really differs from the full cache here
    # Streaming heads hold only sinks + window: the bytes really shrink (no masked full copy).
    assert kvjax.kv_nbytes(end0) <= kvjax.kv_nbytes(sts) + 64 * len(end0.layers)
    half = get_method("duo_attention", gates=DuoGates(np.array([[1.0, 0.0], [0.2, 0.9]])), n_sink=2, recent=5)
    _, sth = prefill_compressed(model, params, prompt, method=half, decode_room=STEPS)
    assert kvjax.kv_nbytes(st0) < kvjax.kv_nbytes(sth) < kvjax.kv_nbytes(st)
    assert [l.retrieval for l in sth.layers] == [(0,), (1,)]


def test_deployment_pattern_sparsity_and_errors():
    g = np.array([[0.9, 0.1, 0.5], [0.3, 0.8, 0.0]])
    assert deployment_pattern(g, threshold=0.5).tolist() == [[True, False, True], [False, True, False]]
    p = deployment_pattern(g, sparsity=0.5)
    assert p.sum() == 3 and p[0, 0] and p[1, 1] and p[0, 2]
    assert deployment_pattern(g, sparsity=1.0).sum() == 0 and deployment_pattern(g, sparsity=0.0).all()
    with pytest.raises(ValueError, match="sparsity must be in"):
        get_method("duo_attention", sparsity=1.5)
    with pytest.raises(ValueError, match="needs trained gates"):
        get_method("duo_attention").gate_values()
    with pytest.raises(ValueError, match="trained for another"):
        get_method("duo_attention", gates=DuoGates(np.ones((3, 2)))).pattern(CFG)


@pytest.mark.slow  # notebooks/training.ipynb (executed in CI by tests/test_notebooks.py) runs the same path
def test_train_gates_on_tiny_model_and_deploy(tmp_path):
    from configs.duo_train import get_config
    from kvjax.pretrained import load_pretrained
    from kvjax.train.run import run_training

    lm = load_pretrained("tiny-random", progress=False)
    c = get_config()
    c.run_dir = str(tmp_path / "duo")
    c.model.name = "tiny-random"
    c.train.steps = 5
    c.train.eval_every = 5
    c.train.eval_batches = 1
    c.train.optim.warmup_steps = 1
    c.train.method.n_sink = 4
    c.train.method.recent = 8
    c.train.method.reg_weight = 0.5
    c.train.data.seq_len = 96
    c.train.data.task_kwargs = {"filler": "repeat"}
    c.train.checkpoint.every = 5
    summary = run_training(c, progress=False, lm=lm)
    g = np.asarray(summary["gates"])
    assert g.shape == (2, 2) and (g >= 0).all() and (g <= 1).all() and g.mean() < 1.0  # L1 pulled them down
    assert os.path.getsize(os.path.join(c.run_dir, "gates.png")) > 1000
    m = get_method("duo_attention", gates=os.path.join(c.run_dir, "ckpt"), sparsity=0.5, n_sink=4, recent=8)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (1, 64)), jnp.int32)
    _, st = prefill_compressed(lm.model, lm.params, prompt, method=m, decode_room=2)
    assert sum(len(layer.streaming) for layer in st.layers) == 2
    _, full = prefill_compressed(lm.model, lm.params, prompt, decode_room=2)
    assert kvjax.kv_nbytes(st) < kvjax.kv_nbytes(full)


def test_gated_layer_attention_equals_plain_mix():
    """GatedDuoKV (the training view) against a numpy computation: per KV head, gate x softmax over every visible key
    + (1 - gate) x softmax over the sinks and the recent window, the query heads of a group sharing their head's gate."""
    from kvjax.compress.duo_attention import GatedDuoKV
    from kvjax.state import DenseKV

    rng = np.random.default_rng(3)
    b, hkv, g, t, d, n_sink, recent = 1, 2, 2, 9, 4, 2, 3
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((b, hkv * g, t, d), (b, hkv, t, d), (b, hkv, t, d)))
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, hkv, t))
    cache = DenseKV(k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos), fill=jnp.full((b, hkv), t, jnp.int32))
    gates = np.array([0.25, 0.9], np.float32)
    out, _ = GatedDuoKV(cache, jnp.asarray(gates), n_sink, recent).attend(jnp.asarray(q), jnp.asarray(pos[:, 0]))
    want = np.zeros((b, hkv * g, t, d), np.float32)
    for h in range(hkv * g):
        kv = h // g
        for i in range(t):
            s = k[0, kv, : i + 1] @ q[0, h, i] / np.sqrt(d)
            full = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            keep = np.array([j < n_sink or i - j < recent for j in range(i + 1)])
            e = np.where(keep, np.exp(s - s[keep].max()), 0.0)
            mix = gates[kv] * full + (1 - gates[kv]) * e / e.sum()
            want[0, h, i] = mix @ v[0, kv, : i + 1]
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_once_perplexity_setting_grows_streaming_heads_like_streaming_llm(tiny):
    """The harness's "once" perplexity setting (room grown, then the continuation in one chunk): with every gate at 0
    DuoAttention equals StreamingLLM there too. (Before, its streaming rings were not grown, and a chunk longer than
    the window, written into the ring at once, overwrote the window its first queries needed.)"""
    from kvjax.eval.harness import grow_room

    model, params, prompt, _ = tiny
    m = 9  # longer than the 5-token window
    cont = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, m)), jnp.int32)
    zeros = get_method("duo_attention", gates=DuoGates(np.zeros((2, 2))), n_sink=2, recent=5)
    sllm = get_method("streaming_llm", n_sink=2, window=5, reposition=False)
    got, want = [], []
    for method, out in ((zeros, got), (sllm, want)):
        _, st = prefill_compressed(model, params, prompt, method=method, decode_room=m)
        grown = grow_room(st, m)
        assert all(not isinstance(layer, DuoKV) or layer.stream.capacity >= 2 + 5 + m for layer in grown.layers)
        out.append(np.asarray(model.jit_forward(params, cont, grown, logits="all")[0]))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)

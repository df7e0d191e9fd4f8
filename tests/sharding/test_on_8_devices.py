"""Sharded model, KV state, compression and kernels on 8 fake CPU devices equal the unsharded computation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kvjax import nbytes, sharding
from kvjax.compress import get_method
from kvjax.config import ModelConfig
from kvjax.generate import generate
from kvjax.model import Model

CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8, rms_norm_eps=1e-5,
                  max_position_embeddings=4096).validate()


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)

    def w(*s):
        return jnp.asarray(rng.normal(0, 0.1, s), jnp.float32)

    d, f, q, kv = 64, 128, 64, 32
    layers = tuple(dict(attn_norm=1 + w(d), q=w(d, q), k=w(d, kv), v=w(d, kv), o=w(q, d), mlp_norm=1 + w(d),
                        gate=w(d, f), up=w(d, f), down=w(f, d)) for _ in range(2))
    return {"embed": w(128, d), "norm": 1 + w(d), "lm_head": w(d, 128), "layers": layers}


@pytest.fixture(scope="module")
def prompt():
    return jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 64)), jnp.int32)


def _same_sharding(x, mesh, spec):
    return x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)


def test_eight_devices():
    assert jax.device_count() == 8


def test_params_follow_rules(params):
    mesh = sharding.make_mesh("data:2,model:4")
    sp = sharding.shard_params(params, mesh, CFG)
    layer = sp["layers"][0]
    for name, spec in [("q", P(None, "model")), ("k", P(None, "model")), ("v", P(None, "model")),
                       ("gate", P(None, "model")), ("up", P(None, "model")), ("o", P("model", None)),
                       ("down", P("model", None)), ("attn_norm", P())]:
        assert _same_sharding(layer[name], mesh, spec), (name, layer[name].sharding)
    assert _same_sharding(sp["embed"], mesh, P("model", None))
    assert _same_sharding(sp["lm_head"], mesh, P(None, "model"))
    # params bytes per device: every 2-D weight split 4 ways, norms replicated
    per = sharding.per_device_nbytes(sp)
    assert len(per) == 8 and max(per.values()) < nbytes(params) / 3


@pytest.mark.parametrize("method, spec", [
    (None, "data:2,model:2,sequence:2"),                       # full cache
    ("snapkv", "data:2,model:2,sequence:2"),                   # one-shot eviction
    # (slow: CI's time budget; the slow suite runs them, tests/test_sharding.py::test_eight_device_suite_slow)
    pytest.param("h2o", "data:2,model:2,sequence:2", marks=pytest.mark.slow),  # decode-time eviction
    pytest.param("kivi", "data:2,model:4", marks=pytest.mark.slow),            # quantization (packed storage)
    pytest.param("adakv", "data:2,model:4", marks=pytest.mark.slow),           # budgets across heads and layers
])
def test_sharded_generate_equals_unsharded(params, prompt, method, spec):
    hp = {"snapkv": dict(budget=40, window=8), "h2o": dict(budget=40), "adakv": dict(budget=40, window=8),
          "kivi": dict(group=8, residual=16)}
    m = None if method is None else get_method(method, **hp.get(method, {}))
    ref = generate(Model(CFG), params, prompt, max_new_tokens=4, method=m)
    mesh = sharding.make_mesh(spec)
    model = Model(CFG, mesh=mesh)
    out = generate(model, model.shard_params(params), sharding.shard_batch(prompt, mesh), max_new_tokens=4, method=m)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.prefill_logits), np.asarray(ref.prefill_logits), atol=2e-5, rtol=1e-5)
    assert nbytes(out.state) == nbytes(ref.state)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out.state), jax.tree_util.tree_leaves(ref.state)):
        a, b = np.asarray(a), np.asarray(b)
        if "codes" in jax.tree_util.keystr(path):  # quantization levels: a value on a rounding edge may flip
            assert np.mean(a != b) <= 0.01, path
        elif a.dtype == np.float16:  # fp16 scales: one ulp (sharded reductions sum in another order)
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-3, atol=1e-6)
        else:
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
    # the final state is sharded as the rules say
    specs = sharding.state_specs(out.state, mesh)
    spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for x, s in zip(jax.tree_util.tree_leaves(out.state), spec_leaves):
        assert _same_sharding(x, mesh, s), (x.shape, x.sharding, s)
    k = out.state.layers[0].k if method != "kivi" else out.state.layers[0].k_codes
    if k.ndim == 4:  # head-major caches (a ragged layer's flat buffer is sharded over data only)
        seq = "sequence" if "sequence" in spec and k.shape[2] % 2 == 0 else None
        assert _same_sharding(k, mesh, P("data", "model", seq, None))
    else:
        assert _same_sharding(k, mesh, P("data", None, None))


def test_long_context_sequence_sharded(params):
    """A 1,024-slot cache over sequence:8: each device holds 1/8 of the keys and values (exact, from the arrays'
    shards), and prefill + decode equal the unsharded model."""
    mesh = sharding.make_mesh("sequence:8")
    model = Model(CFG, mesh=mesh)
    sp = model.shard_params(params)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 128, (1, 1000)), jnp.int32)
    st = model.init_state(1, 1024)
    lg, st = model.jit_prefill(sp, tokens, st, logits="last")
    lg2, st = model.jit_decode_step(sp, jnp.argmax(lg, -1), st)
    ref = Model(CFG)
    rs = ref.init_state(1, 1024)
    rl, rs = ref.jit_prefill(params, tokens, rs, logits="last")
    rl2, rs = ref.jit_decode_step(params, jnp.argmax(rl, -1), rs)
    np.testing.assert_allclose(np.asarray(lg2), np.asarray(rl2), atol=2e-5, rtol=1e-5)
    per = sharding.per_device_nbytes(st)
    kv = sum(int(l.k.nbytes + l.v.nbytes + l.pos.nbytes) for l in st.layers)
    small = nbytes(st) - kv  # fill, next_pos, rope_shift: replicated
    assert len(per) == 8 and set(per.values()) == {kv // 8 + small}
    assert _same_sharding(st.layers[1].k, mesh, P(None, None, "sequence", None))


@pytest.mark.parametrize("n_seq", [2, 4])
def test_sharded_decode_kernel_matches_reference(n_seq):
    from pallas_kernels.reference import decode_attention_reference
    from pallas_kernels.sharded import jit_sharded_decode_attention

    rng = np.random.default_rng(n_seq)
    b, hq, hkv, c, d = 2, 4, 2, 64, 16
    q = jnp.asarray(rng.normal(size=(b, hq, 2, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, hkv, c, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, hkv, c, d)), jnp.float32)
    pos = jnp.asarray(rng.permutation(c)[None, None].repeat(b, 0).repeat(hkv, 1), jnp.int32)  # slots out of order
    lengths = jnp.asarray([[64, 37], [20, 64]], jnp.int32)  # ragged heads: one sequence shard may see none
    q_pos = jnp.asarray([[70, 71], [50, 51]], jnp.int32)
    mesh = sharding.make_mesh(f"data:2,sequence:{n_seq}")
    window = 24 if n_seq == 4 else 0  # (each window is another compilation)
    out = jit_sharded_decode_attention(q, k, v, pos, q_pos, mesh=mesh, lengths=lengths, window=window,
                                       interpret=True, block_k=8)
    ref = decode_attention_reference(q, k, v, pos, q_pos, lengths=lengths, window=window)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=1e-5)


@pytest.mark.slow
def test_pallas_model_decode_sharded(params, prompt):
    """Model(impl="pallas", mesh=...) routes decode attention through the per-shard kernel (split-K over sequence)."""
    mesh = sharding.make_mesh("model:2,sequence:4")
    model = Model(CFG, impl="pallas", mesh=mesh)
    st = model.init_state(2, 128)
    sp = model.shard_params(params)
    lg, st = model.jit_prefill(sp, prompt, st, logits="last")
    lg2, _ = model.jit_decode_step(sp, jnp.argmax(lg, -1), st)
    ref = Model(CFG)
    rs = ref.init_state(2, 128)
    rl, rs = ref.jit_prefill(params, prompt, rs, logits="last")
    rl2, _ = ref.jit_decode_step(params, jnp.argmax(rl, -1), rs)
    np.testing.assert_allclose(np.asarray(lg2), np.asarray(rl2), atol=2e-5, rtol=1e-5)
    text = jax.jit(lambda p, t, s: model.forward_impl(CFG, p, t[:, None], s, None, impl="pallas")[0]).lower(
        sp, jnp.argmax(lg, -1), st).as_text()
    assert "shard_map" in text or "sdy.manual_computation" in text or "custom_call" in text


@pytest.mark.slow
def test_experiment_data_parallel_equals_single_device(tmp_path):
    """``--mesh=data:2,model:2``: the generation cells are dealt to 2 data-parallel groups (threads, each on its own
    ``model:2`` sub-mesh) and the perplexity batch is split over ``data``; every cell's result equals the unsharded
    run (same predictions, log-probs and bytes)."""
    import json
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "configs"))
    import tiny  # noqa: PLC0415

    from kvjax.eval.experiment import run_experiment

    out = {}
    for mesh in (None, "data:2,model:2"):
        c = tiny.get_config()
        c.run_dir = str(tmp_path / str(mesh))
        c.tasks.passkey.seeds = (0, 1, 2)  # 3 prompts: the groups get 2 and 1
        if mesh:
            c.mesh = mesh
        run_experiment(c, progress=False)
        with open(os.path.join(c.run_dir, "results.jsonl")) as f:
            out[mesh] = {r["cell_id"]: r for r in map(json.loads, f)}
    ref, dp = out[None], out["data:2,model:2"]
    assert set(ref) == set(dp) and len(ref) == 15
    for k, r in ref.items():
        assert dp[k].get("prediction") == r.get("prediction")
        for field in ("answer_logprob", "perplexity", "kv_bytes_prefill", "kv_valid_bytes_prefill"):
            if field in r:
                np.testing.assert_allclose(dp[k][field], r[field], rtol=1e-4, atol=1e-4, err_msg=field)

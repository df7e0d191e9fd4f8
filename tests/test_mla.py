"""MLA upcycling (kvjax.upcycle, kvjax.models.mla, kvjax.state.LatentKV, kvjax.train.mla): TransMLA's exact rewrite,
absorbed == expanded attention, X-EcoMLA's SVD at full rank, SnapKV on the latent cache, save/load, distillation."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kvjax
from kvjax import upcycle
from kvjax.state import LatentKV, kv_nbytes, nbytes

from conftest import make_hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(cfg, params, prompt (2, 20), covs) of the tiny random Llama checkpoint (llama3 RoPE scaling: the rewrite
    must keep it)."""
    from kvjax.checkpoints.safetensors import load_safetensors

    _, path = make_hf_model("llama3_scaling", tmp_path_factory)
    cfg, params = load_safetensors(path, progress=False)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20)), jnp.int32)
    covs = upcycle.kv_covariance(kvjax.Model(cfg), params, [(prompt, np.ones(prompt.shape, bool))])
    return cfg, params, prompt, covs


def _logits(cfg, params, prompt, impl="reference", extra=0):
    m = kvjax.Model(cfg, impl=impl)
    out, state = m.jit_prefill(params, prompt, m.init_state(prompt.shape[0], prompt.shape[1] + extra))
    return out, state, m


@pytest.mark.parametrize("init", ["pca", "svd"])
def test_transmla_exact_rewrite_keeps_logits_and_kv_bytes(tiny, init):
    cfg, params, prompt, covs = tiny
    ref, ref_state, _ = _logits(cfg, params, prompt)
    mcfg, mp = upcycle.upcycle(cfg, params, rope_heads=cfg.num_kv_heads, init=init, covs=covs)
    assert mcfg.attention_type == "mla" and mcfg.mla_nope_dim == 0
    out, state, _ = _logits(mcfg, mp, prompt)
    assert isinstance(state.layers[0], LatentKV)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
    assert kv_nbytes(state) == kv_nbytes(ref_state)  # same KV payload (positions are stored once, not per head)


def test_rank_reduction_changes_logits_and_is_refused_beyond_full_rank(tiny):
    cfg, params, prompt, covs = tiny
    ref, _, _ = _logits(cfg, params, prompt)
    full = upcycle.full_rank(cfg, 1)
    errs = []
    for r in (full, 8):
        mcfg, mp = upcycle.upcycle(cfg, params, rope_heads=1, kv_rank=r, init="pca", covs=covs)
        out, state, _ = _logits(mcfg, mp, prompt)
        errs.append(float(jnp.max(jnp.abs(out - ref))))
        assert state.layers[0].c.shape == (2, 1, 20, r) and state.layers[0].kr.shape == (2, 1, 20, cfg.head_dim)
        assert nbytes(state.layers[0]) == 2 * 20 * (r + cfg.head_dim) * 4 + 2 * 20 * 4 + 2 * 4
    assert errs[0] < errs[1]  # lower latent rank, larger deviation
    with pytest.raises(ValueError, match=rf"kv_rank \(latent rank\) must be an int in \[1, {full}\]"):
        upcycle.mla_config(cfg, 1, full + 1)
    with pytest.raises(ValueError, match="rope_heads must be an int in"):
        upcycle.mla_config(cfg, 0, 8)
    with pytest.raises(ValueError, match="init must be one of"):
        upcycle.mla_config(cfg, 1, 8, init="random")
    with pytest.raises(ValueError, match="needs calibration statistics"):
        upcycle.upcycle(cfg, params, rope_heads=1, kv_rank=8, init="pca")


def test_svd_init_exact_at_full_rank(tiny):
    """X-EcoMLA's SVD at full rank reproduces the un-reduced (partial-RoPE) layer exactly: the same function as
    TransMLA's PCA at full rank, and the weight product down @ up equals the stacked projection; lower ranks do not."""
    cfg, params, prompt, covs = tiny
    full = upcycle.full_rank(cfg, 1)
    outs = {}
    for init in ("pca", "svd"):
        mcfg, mp = upcycle.upcycle(cfg, params, rope_heads=1, init=init, covs=covs)
        outs[init] = _logits(mcfg, mp, prompt)[0]
        p = mp["layers"][0]
        prod = np.asarray(p["kv_down"], np.float64) @ np.concatenate([p["k_up"], p["v_up"]], 1)
        rot = upcycle.rorope_rotation(np.asarray(covs[0])[:32, :32], cfg.num_kv_heads, cfg.head_dim)
        _, _, _, wl, mk, mv, _ = upcycle._layer_maps(cfg, params["layers"][0], rot, 1)
        want = np.concatenate([wl[:, :mk.shape[0]] @ mk, wl[:, mk.shape[0]:] @ mv], 1)
        np.testing.assert_allclose(prod, want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(outs["svd"]), np.asarray(outs["pca"]), atol=2e-5)
    _, low = upcycle.upcycle(cfg, params, rope_heads=1, kv_rank=full // 2, init="svd")
    p = low["layers"][0]
    prod = np.asarray(p["kv_down"]) @ np.concatenate([p["k_up"], p["v_up"]], 1)
    assert np.abs(prod - want).max() > 1e-2


def test_absorbed_decode_equals_expanded_decode(tiny):
    cfg, params, prompt, covs = tiny
    mcfg, mp = upcycle.upcycle(cfg, params, rope_heads=1, kv_rank=12, init="pca", covs=covs)
    outs = {}
    for impl in ("reference", "expanded"):
        logits, state, m = _logits(mcfg, mp, prompt, impl=impl, extra=3)
        steps = [logits[:, -1]]
        tok = jnp.argmax(logits[:, -1], -1)
        for _ in range(3):
            lg, state = m.jit_decode_step(mp, tok, state)
            steps.append(lg)
            tok = jnp.argmax(lg, -1)
        outs[impl] = np.stack([np.asarray(s) for s in steps])
    np.testing.assert_allclose(outs["reference"], outs["expanded"], atol=2e-5)
    assert np.abs(outs["reference"][1:] - outs["reference"][:1]).max() > 1e-3  # the decode steps differ


def test_mla_state_refused_by_gqa_model_and_bad_impl(tiny):
    cfg, params, prompt, _ = tiny
    mcfg = upcycle.mla_config(cfg, 1, 8, init="svd")
    with pytest.raises(ValueError, match="a state made for another model"):
        kvjax.Model(cfg).prefill(params, prompt, kvjax.Model(mcfg).init_state(2, 20))
    with pytest.raises(ValueError, match="unknown attention impl 'expanded'"):
        kvjax.Model(cfg, impl="expanded")
    from kvjax.compress import get_method
    from kvjax.generate import prefill_compressed

    with pytest.raises(ValueError, match="h2o cannot run on an MLA model's latent cache"):
        prefill_compressed(kvjax.Model(mcfg), None, prompt, method=get_method("h2o", budget=8), decode_room=2)


def test_snapkv_on_latent_cache(tiny):
    """SnapKV scores come from the absorbed latent attention: the kept slots are the top tokens of the window votes
    summed over all query heads (one shared latent "head"), recomputed here from the expanded attention."""
    from kvjax.attention import Observe
    from kvjax.compress import get_method
    from kvjax.generate import prefill_compressed

    cfg, params, prompt, covs = tiny
    mcfg, mp = upcycle.upcycle(cfg, params, rope_heads=1, kv_rank=16, init="pca", covs=covs)
    budget, window = 10, 4
    snap = get_method("snapkv", budget=budget, window=window, kernel=3)
    _, state = prefill_compressed(kvjax.Model(mcfg), mp, prompt, method=snap, decode_room=2)
    # the expanded path's window probabilities, per query head
    me = kvjax.Model(mcfg, impl="expanded")
    _, _, obs = me.jit_forward(mp, prompt, me.init_state(2, 20), observe=Observe(window=window))
    for i, layer in enumerate(state.layers):
        assert isinstance(layer, LatentKV) and layer.capacity == budget + 2
        votes = np.asarray(obs[i]["window"]).sum(2).mean(1)  # (B, S): summed over the window, mean over heads
        votes[:, 20 - window:] = 0.0  # the window itself is always kept (its votes are not pooled)
        pooled = np.stack([np.convolve(np.pad(v, 1), np.ones(3) / 3, "valid") for v in votes])
        for b in range(2):
            pos = np.asarray(layer.pos[b, 0])
            kept = set(pos[pos >= 0].tolist())
            recent = set(range(20 - window, 20))
            top = np.argsort(-pooled[b, :20 - window], kind="stable")[:budget - window]
            assert kept == recent | set(top.tolist())


def test_save_load_roundtrip(tiny, tmp_path):
    from kvjax.pretrained import load_pretrained

    cfg, params, _, _ = tiny
    mcfg, mp = upcycle.upcycle(cfg, params, rope_heads=1, kv_rank=20, init="svd")
    path = str(tmp_path / "mla_tiny")
    upcycle.save_model(path, mcfg, mp, tokenizer=None)
    back = load_pretrained(path)
    assert back.cfg == mcfg and back.cfg.attention_type == "mla"
    prompt = jnp.asarray([[5, 6, 7, 8, 9, 10]], jnp.int32)
    a = _logits(mcfg, mp, prompt)[0]
    b = _logits(back.cfg, back.params, prompt)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    import json
    import os
    meta = os.path.join(path, upcycle.MODEL_FILE)
    with open(meta) as f:
        d = json.load(f)
    d["num_params"] += 1
    with open(meta, "w") as f:
        json.dump(d, f)
    with pytest.raises(ValueError, match="is corrupt"):
        load_pretrained(path)


def test_distillation_step_lowers_loss(tiny):
    """X-EcoMLA's KL distillation on the tiny model: a few optax steps on one fixed batch lower the loss."""
    from kvjax.pretrained import Pretrained
    from kvjax.train import TrainState, make_optimizer, make_train_step
    from kvjax.train.mla import MLATrainer

    cfg, params, _, _ = tiny
    lm = Pretrained("tiny", cfg, params, None, "plain")
    tr = MLATrainer({"rope_heads": 1, "kv_rank": 8, "init": "svd", "calib_seqs": 0})
    loss_fn = tr.loss_fn(lm.model)
    opt = make_optimizer({"optimizer": "adamw", "lr": 3e-3}, 10)
    state = TrainState.create(tr.init(lm, jax.random.PRNGKey(0)), opt, jax.random.PRNGKey(1))
    toks = np.random.default_rng(0).integers(0, lm.cfg.vocab_size, (2, 32)).astype(np.int32)
    batch = {"tokens": toks, "mask": np.ones_like(toks, bool)}
    step = make_train_step(loss_fn, opt)
    evaluate = jax.jit(loss_fn)
    first = float(evaluate(state.params, lm.params, batch, None)[0])
    assert first > 0
    for _ in range(3):
        state, m = step(state, lm.params, batch)
    last = float(evaluate(state.params, lm.params, batch, None)[0])
    assert last < 0.9 * first


@pytest.mark.slow
def test_transmla_exact_rewrite_smollm2():
    """TransMLA's exact rewrite of SmolLM2-135M (RoRoPE rotation calibrated on the prompt, every rotated head kept as
    the RoPE key) reproduces its logits within float tolerance and keeps its KV bytes; absorbed == expanded."""
    from kvjax.pretrained import load_pretrained

    lm = load_pretrained("smollm2-135m", progress=False)
    ids = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)[:48]
    prompt = jnp.asarray([ids], jnp.int32)
    ref, ref_state, _ = _logits(lm.cfg, lm.params, prompt)
    covs = upcycle.kv_covariance(lm.model, lm.params, [(prompt, np.ones(prompt.shape, bool))])
    mcfg, mp = upcycle.upcycle(lm.cfg, lm.params, rope_heads=lm.cfg.num_kv_heads, init="pca", covs=covs)
    out, state, _ = _logits(mcfg, mp, prompt)
    scale = float(jnp.max(jnp.abs(ref)))
    assert float(jnp.max(jnp.abs(out - ref))) < 1e-4 * scale
    assert (np.asarray(jnp.argmax(out, -1)) == np.asarray(jnp.argmax(ref, -1))).all()
    assert kv_nbytes(state) == kv_nbytes(ref_state)
    exp, _, _ = _logits(mcfg, mp, prompt, impl="expanded")
    assert float(jnp.max(jnp.abs(out - exp))) < 1e-4 * scale

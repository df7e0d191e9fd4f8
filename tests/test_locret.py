"""Locret (arXiv 2410.01805): oracle-scored chunked eviction equals eviction by true attention, bounded prefill
memory, and the whole train -> artefact -> get_method(heads=path) path on the tiny random model."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.attention import Observe
from kvjax.compress import get_method
from kvjax.compress.locret import RetainingHeads, causal_importance, init_heads, oracle_scores
from kvjax.config import ModelConfig
from kvjax.generate import prefill_chunked
from kvjax.models.llama import rope_frequencies

CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)


def tiny_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    w = lambda *s: jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)  # noqa: E731
    layers = tuple({"attn_norm": 1 + w(d) * 0.1, "q": w(d, cfg.num_heads * hd), "k": w(d, cfg.num_kv_heads * hd),
                    "v": w(d, cfg.num_kv_heads * hd), "o": w(cfg.num_heads * hd, d), "mlp_norm": 1 + w(d) * 0.1,
                    "gate": w(d, f), "up": w(d, f), "down": w(f, d)} for _ in range(cfg.num_layers))
    return {"embed": w(cfg.vocab_size, d) * 3, "norm": 1 + w(d) * 0.1, "lm_head": w(d, cfg.vocab_size),
            "layers": layers}


def reference_eviction(scores, bounds, budget, stabilizers, local_len):
    """Kept positions per head after chunked eviction by ``scores`` (B, H, T), in plain Python."""
    b_, h_, _ = scores.shape
    out = {}
    for b in range(b_):
        for h in range(h_):
            kept: list[int] = []
            for j in range(len(bounds) - 1):
                lo, hi = bounds[j], bounds[j + 1]
                kept += list(range(lo, hi))
                protect = local_len if j == len(bounds) - 2 else stabilizers
                forced = [p for p in kept if p >= hi - protect]
                rest = sorted((p for p in kept if p < hi - protect), key=lambda p: (-scores[b, h, p], p))
                kept = sorted((forced + rest)[:budget]) if len(kept) > budget else kept
            out[b, h] = kept
    return out


def test_oracle_scored_eviction_equals_eviction_by_true_attention():
    model, params = kvjax.Model(CFG), tiny_params(CFG)
    t, chunk = 40, 12
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, t)), jnp.int32)
    _, state, obs = model.jit_forward(params, prompt, model.init_state(2, t), observe=Observe(inputs=True))
    pos = jnp.broadcast_to(jnp.arange(t), (2, t))
    inv = rope_frequencies(CFG, pos)
    # True future attention: every token's largest attention probability from any query at or after it.
    oracle = np.stack([np.asarray(oracle_scores(CFG, o["qkv"], pos, jnp.ones((2, t), bool), inv)) for o in obs])
    # ... which is what the model's own attention gives (column max of the probabilities): the training targets.
    from kvjax.train.locret import layer_targets

    layers, _, targets = layer_targets(model, params, prompt, jnp.ones((2, t), bool), jnp.ones((2, t), bool))
    assert np.asarray(layers).tolist() == [0, 1]
    np.testing.assert_allclose(np.asarray(targets), oracle, rtol=1e-4, atol=1e-6)
    k0 = np.asarray(state.layers[0].k)
    assert oracle.shape == (2, 2, 2, t) and np.isfinite(oracle).all() and k0.shape[2] == t
    method = get_method("locret", budget=10, chunk_size=chunk, stabilizers=4, local_len=3)
    bounds = [0, 12, 24, 36, 40]
    res = prefill_chunked(model, params, prompt, method, chunk_size=chunk,
                          scores_fn=lambda j, o: oracle[:, :, :, bounds[j]:bounds[j + 1]])
    for i, layer in enumerate(res.state.layers):
        want = reference_eviction(oracle[i], bounds, 10, 4, 3)
        p = np.asarray(layer.pos)
        for (b, h), kept in want.items():
            assert sorted(p[b, h][p[b, h] >= 0].tolist()) == kept, (i, b, h)
    # Peak memory: never more than budget + one chunk of slots per head (the full prompt would be 40).
    assert max(layer.capacity for layer in res.state.layers) <= 10
    full = prefill_chunked(model, params, prompt, None, chunk_size=t)
    assert res.peak_bytes < full.peak_bytes
    assert res.peak_bytes <= kvjax.nbytes(model.init_state(2, 10 + chunk)) + 2 * 2 * (10 + chunk) * 4 * 2


def test_causal_importance_is_column_max_of_attention():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 4, 6, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 2, 6, 8)), jnp.float32)
    pos = jnp.arange(6)[None]
    qm = jnp.asarray([[False, False, False, True, True, True]])
    got = np.asarray(causal_importance(q, k, pos, pos, qm, 2))
    s = np.einsum("bhqd,bhkd->bhqk", np.asarray(q), np.repeat(np.asarray(k), 2, axis=1)) / np.sqrt(8)
    s = np.where(np.tril(np.ones((6, 6), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = p[:, :, 3:, :].max(axis=2).reshape(1, 2, 2, 6).max(axis=2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_locret_errors():
    with pytest.raises(ValueError, match="needs trained retaining heads"):
        get_method("locret").retaining_heads()
    with pytest.raises(ValueError, match="smaller than the budget"):
        get_method("locret", budget=10, stabilizers=10)
    heads = RetainingHeads(init_heads(CFG, jax.random.PRNGKey(0), 8))
    other = CFG.__class__(**{**CFG.__dict__, "num_layers": 3})
    with pytest.raises(ValueError, match="trained for another"):
        heads.check(other)
    with pytest.raises(FileNotFoundError, match="no trained locret artefact"):
        get_method("locret", heads="/nonexistent/ckpt").retaining_heads()


@pytest.mark.slow  # CI budget: notebooks/training.ipynb runs train -> artefact -> chunked prefill in CI
def test_train_locret_on_tiny_model_then_evict_with_the_artefact(tmp_path):
    """configs/locret_train.py on the tiny random model for a few steps: metrics, loss curve, held-out eval and an
    artefact that get_method("locret", heads=path) uses for chunked prefill."""
    from configs.locret_train import get_config
    from kvjax.pretrained import load_pretrained
    from kvjax.train.run import run_training

    lm = load_pretrained("tiny-random", progress=False)
    c = get_config()
    c.run_dir = str(tmp_path / "locret")
    c.model.name = "tiny-random"
    c.train.steps = 4
    c.train.eval_every = 2
    c.train.eval_batches = 1
    c.train.method.hidden = 16
    c.train.optim.warmup_steps = 1
    c.train.data.seq_len = 96
    c.train.data.query_tokens = 8
    c.train.data.max_chars = 20_000
    c.train.data.task_kwargs = {"filler": "repeat"}
    c.train.checkpoint.every = 2
    summary = run_training(c, progress=False, lm=lm)
    assert summary["steps"] == 4 and np.isfinite(summary["last_loss"])
    rows = [json.loads(x) for x in open(os.path.join(c.run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    assert any(r["split"] == "heldout" for r in rows) and "tokens_per_s" in rows[0]
    assert os.path.getsize(os.path.join(c.run_dir, "loss_curve.png")) > 1000
    # A second launch into the same directory resumes from the last checkpoint and has nothing left to do.
    again = run_training(c, progress=False, lm=lm)
    assert again["resumed_from"] == 4
    assert [json.loads(x) for x in open(os.path.join(c.run_dir, "metrics.jsonl"))] == rows  # no row twice
    # ... and a different config refuses to resume there.
    c.train.method.hidden = 8
    with pytest.raises(ValueError, match="different model or training config"):
        run_training(c, progress=False, lm=lm)

    path = os.path.join(tmp_path, "locret", "ckpt")
    m = get_method("locret", heads=path, budget=24, chunk_size=32, stabilizers=8, local_len=4)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (1, 100)), jnp.int32)
    res = prefill_chunked(lm.model, lm.params, prompt, m, chunk_size=32, decode_room=4)
    held = [np.asarray(jnp.sum(layer.valid, -1)) for layer in res.state.layers]
    assert all((h == 24).all() for h in held)
    full = prefill_chunked(lm.model, lm.params, prompt, None, chunk_size=100)
    assert res.peak_bytes < 0.7 * full.peak_bytes
    # The final logits come from the compressed cache: close to, not equal to, the full cache's.
    assert res.logits.shape == full.logits.shape


def test_top_overlap_counts_units_only():
    """The held-out metric: top-10% overlap among units; masked slots never count as matches (hand-worked)."""
    from kvjax.train.locret import _top_overlap

    t = 20  # k = 2
    target = jnp.arange(t, dtype=jnp.float32)[None, None, :]  # top 2: slots 19, 18
    all_units = jnp.ones((1, t), bool)
    assert float(_top_overlap(target, target, all_units)) == 1.0
    assert float(_top_overlap(-target, target, all_units)) == 0.0
    half = target.at[..., 18].set(-5.0)  # prediction's top 2: 19, 17 -> one of two
    assert float(_top_overlap(half, target, all_units)) == 0.5
    one_unit = jnp.zeros((1, t), bool).at[0, 3].set(True)  # fewer units than k: only the unit counts
    assert float(_top_overlap(-target, target, one_unit)) == 1.0

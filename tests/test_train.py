"""kvjax.train: optimizer step, frozen backbone, orbax checkpoints (exact resume, mismatched/corrupt), deterministic
data with a held-out split, data parallelism over 8 fake CPU devices (subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.train import (Batches, CheckpointError, Checkpointer, DataConfig, TrainState, make_optimizer,
                         make_train_step)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_problem():
    """A frozen random 'backbone' and a trainable linear head; the loss uses the PRNG key (noise), so a resumed
    run only matches if the key was restored."""
    rng = np.random.default_rng(0)
    frozen = {"w": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)}
    trainable = {"head": jnp.zeros((16, 2), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}

    def loss_fn(p, fz, batch, key):
        h = jnp.tanh(batch["x"] @ fz["w"])
        noise = 0.01 * jax.random.normal(key, batch["y"].shape)
        err = h @ p["head"] + p["b"] - batch["y"] + noise
        return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err))}

    def batch(step, n=8):
        r = np.random.default_rng([1, step])
        x = r.normal(size=(n, 8)).astype(np.float32)
        return {"x": x, "y": np.stack([np.sin(x[:, 0]), x[:, 1] * 0.5], 1).astype(np.float32)}

    return frozen, trainable, loss_fn, batch


OPT = {"optimizer": "adamw", "lr": 0.05, "schedule": "cosine", "warmup_steps": 2, "clip_norm": 1.0}


def test_step_decreases_loss_and_backbone_is_frozen():
    frozen, trainable, loss_fn, batch = toy_problem()
    opt = make_optimizer(OPT, 30)
    state = TrainState.create(trainable, opt, jax.random.PRNGKey(0))
    # The optimizer state holds moments of the trainable leaves only (never the backbone's).
    sizes = {x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim}
    assert sizes <= {16 * 2, 2}, sizes
    step = make_train_step(loss_fn, opt)
    fixed = batch(0)
    losses = []
    for _ in range(30):
        state, m = step(state, frozen, fixed)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(state.step) == 30
    np.testing.assert_array_equal(np.asarray(frozen["w"]), np.asarray(toy_problem()[0]["w"]))


def test_schedule_and_optimizer_errors():
    with pytest.raises(ValueError, match="schedule='bogus'"):
        make_optimizer({"schedule": "bogus"}, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        make_optimizer({"warmup_steps": 20}, 10)
    with pytest.raises(ValueError, match="optimizer='lion2'"):
        make_optimizer({"optimizer": "lion2"}, 10)


def _run(ckpt: Checkpointer | None, state, step_fn, frozen, batch, start, stop):
    losses = []
    for s in range(start, stop):
        state, m = step_fn(state, frozen, batch(s))
        losses.append(float(m["loss"]))
        if ckpt is not None:
            ckpt.save(state)
    return state, losses


def test_checkpoint_resume_is_exact_and_mismatch_or_corruption_fails(tmp_path):
    frozen, trainable, loss_fn, batch = toy_problem()
    opt = make_optimizer(OPT, 8)
    step = make_train_step(loss_fn, opt)
    init = TrainState.create(trainable, opt, jax.random.PRNGKey(3))
    ref, ref_losses = _run(None, init, step, frozen, batch, 0, 8)

    ck = Checkpointer(str(tmp_path / "ck"), "fp-a", every=2, keep=2)
    _, first = _run(ck, init, step, frozen, batch, 0, 5)  # interrupted after step 5; last checkpoint at 4
    assert ck.all_steps() == [2, 4]  # keep the last 2
    ck2 = Checkpointer(str(tmp_path / "ck"), "fp-a", every=2, keep=2)
    resumed = ck2.restore(init)
    assert int(resumed.step) == 4
    state, rest = _run(ck2, resumed, step, frozen, batch, int(resumed.step), 8)
    assert first[:4] + rest == ref_losses  # the same loss curve, bit for bit
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    with pytest.raises(CheckpointError, match="different model or training config"):
        Checkpointer(str(tmp_path / "ck"), "fp-b").restore(init)
    bigger = TrainState.create({"head": jnp.zeros((16, 3)), "b": jnp.zeros((3,))}, opt, jax.random.PRNGKey(0))
    with pytest.raises(CheckpointError, match="does not match"):
        Checkpointer(str(tmp_path / "ck"), "fp-a").restore(bigger)
    # Damage every data file of the latest checkpoint.
    latest = tmp_path / "ck" / str(ck2.latest_step())
    for root, _, files in os.walk(latest):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "r+b") as fh:
                fh.write(b"\x00garbage\xff" * 8)
    with pytest.raises(CheckpointError, match="corrupt"):
        Checkpointer(str(tmp_path / "ck"), "fp-a").restore(init)


@pytest.fixture(scope="module")
def tokenizer():
    from kvjax.pretrained import load_pretrained

    return load_pretrained("tiny-random", progress=False).tokenizer


def test_task_examples_never_reuse_evaluation_seeds(tokenizer, monkeypatch):
    """Regression: training took task seeds 0, 1, ... , the seeds every evaluation uses, so the benchmark's needles
    and pass keys had been seen in training. Train, held-out and evaluation seeds are now disjoint."""
    from kvjax.train import data as data_mod

    seen = []
    real = data_mod.Batches._task
    monkeypatch.setattr(data_mod.Batches, "_task", lambda self, name, seed, rng: seen.append(seed) or real(
        self, name, seed, rng))
    cfg = DataConfig(sources=("task:passkey",), seq_len=96, batch_size=2, task_kwargs=(("filler", "repeat"),))
    a = Batches(cfg, tokenizer)
    for i in range(3):
        a.train(i), a.heldout(i)
    train, held = seen[0::4] + seen[1::4], seen[2::4] + seen[3::4]
    assert min(train) >= data_mod.TRAIN_SEED_OFFSET and max(train) < data_mod.HELDOUT_SEED_OFFSET <= min(held)
    n = len(seen)
    Batches(DataConfig(sources=("task:passkey",), seq_len=96, seed=1, task_kwargs=(("filler", "repeat"),)),
            tokenizer).train(0)
    assert seen[n] == data_mod.TRAIN_SEED_OFFSET + 10_000_000  # another data seed, other examples
    with pytest.raises(ValueError, match=r"data.seed must be in \[0, 50\) with task sources, got 50"):
        DataConfig(sources=("task:passkey",), seed=50)
    DataConfig(sources=("text:wikipedia",), seed=12345)  # text windows: any seed (MLA's calibration uses one)
    # The pass keys of the first training examples are not those of evaluation seeds 0..7.
    from kvjax.eval.tasks import get_task

    eval_keys = {get_task("passkey")(s, 64, 0.5, tokenizer.count, filler="repeat").answers[0] for s in range(8)}
    train_keys = {get_task("passkey")(s, 64, 0.5, tokenizer.count, filler="repeat").answers[0] for s in train}
    assert not eval_keys & train_keys


def test_batches_deterministic_with_disjoint_heldout(tokenizer):
    cfg = DataConfig(sources=("text:hamlet", "task:passkey"), seq_len=96, batch_size=3, query_tokens=12,
                     max_chars=60_000, task_kwargs=(("filler", "repeat"),))
    a, b = Batches(cfg, tokenizer), Batches(cfg, tokenizer)
    for s in (0, 5):
        x, y = a.train(s), b.train(s)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
        assert x["tokens"].shape == (3, 96) and x["query_mask"].sum() > 0 and x["label_mask"].sum() > 0
        assert not (x["query_mask"] & ~x["mask"]).any()
    assert not np.array_equal(a.train(0)["tokens"], a.train(1)["tokens"])
    # Held-out text windows come from the last 10% of the corpus' tokens, train windows never reach it.
    ids = a._corpus_tokens("hamlet")
    cut = int(len(ids) * 0.9)
    rng = np.random.default_rng(0)
    for i in range(20):
        w, _, _ = a._text("hamlet", np.random.default_rng([0, i, 0]), False)
        assert len(w) == 96
        h, _, _ = a._text("hamlet", np.random.default_rng([0, i, 1]), True)
        starts_train = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(ids, 96) == w, axis=1))
        starts_held = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(ids, 96) == h, axis=1))
        assert starts_train.min() + 96 <= cut and starts_held.max() >= cut
    del rng
    with pytest.raises(ValueError, match="data source 'bogus'"):
        DataConfig(sources=("bogus",))
    with pytest.raises(ValueError, match="unknown task"):
        Batches(DataConfig(sources=("task:nope",)), tokenizer)


def test_batches_start_with_bos_for_models_that_expect_it(tokenizer):
    """Gemma 3 expects BOS at the start of a sequence: text windows and task examples start with it (the rest of a
    text window is the same window), and nothing changes for a tokenizer without that policy (SmolLM2)."""
    import copy

    assert not tokenizer.add_bos_token and tokenizer.bos_id is not None
    gemma_like = copy.copy(tokenizer)
    gemma_like.add_bos_token = True
    cfg = DataConfig(sources=("text:hamlet", "task:passkey"), seq_len=96, batch_size=4, query_tokens=12,
                     max_chars=60_000, task_kwargs=(("filler", "repeat"),))
    plain, bos = Batches(cfg, tokenizer), Batches(cfg, gemma_like)
    w0, _, _ = plain._text("hamlet", np.random.default_rng([0, 3, 0]), False)
    w1, _, _ = bos._text("hamlet", np.random.default_rng([0, 3, 0]), False)
    assert w1[0] == tokenizer.bos_id and w0[0] != tokenizer.bos_id
    np.testing.assert_array_equal(w0[1:], w1[1:])
    x = bos.train(0)
    first = x["tokens"][np.arange(4), np.argmax(x["mask"], axis=1)]
    assert (first == tokenizer.bos_id).all()


DP_SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp, numpy as np
    from tests.test_train import toy_problem, OPT
    from kvjax.train import TrainState, data_mesh, make_optimizer, make_train_step
    assert len(jax.devices()) == 8, jax.devices()
    frozen, trainable, loss_fn, batch = toy_problem()
    out = {}
    for n in (1, 8):
        opt = make_optimizer(OPT, 10)
        step = make_train_step(loss_fn, opt, mesh=data_mesh(n) if n > 1 else None)
        state = TrainState.create(trainable, opt, jax.random.PRNGKey(0))
        losses = []
        for s in range(10):
            state, m = step(state, frozen, batch(s, 16))
            losses.append(float(m["loss"]))
        out[n] = losses
        if n == 8:
            sh = state.params["head"].sharding
            out["replicated"] = bool(sh.is_fully_replicated)
    print(json.dumps(out))
""")


def test_data_parallel_8_fake_devices_matches_one_device():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-c", DP_SCRIPT, ROOT], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["8"], out["1"], rtol=1e-5, atol=1e-6)
    assert out["replicated"]
    assert out["1"][-1] < out["1"][0]

"""ScorerMethod (a new eviction method from a scoring function), method families and the registry's re-definition rule."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.compress import ScorerMethod, chain, get_method, method_family, register
from kvjax.compress.base import _REGISTRY, Context, available_methods
from kvjax.config import ModelConfig
from kvjax.state import DenseKV, KVState

CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=4, max_position_embeddings=256)


@dataclasses.dataclass(frozen=True)
class KeyNorm(ScorerMethod):
    """Keeps the keys of smallest L2 norm (as KnormPress)."""

    name: ClassVar[str] = "test_key_norm"

    def score(self, ctx, layer, obs):
        return -jnp.linalg.norm(layer.k, axis=-1)


@dataclasses.dataclass(frozen=True)
class LastQueryVotes(ScorerMethod):
    """Per query head scores (B, Hq, S) from the observation window: reduced over GQA groups by the base."""

    name: ClassVar[str] = "test_last_query"
    observe_window: ClassVar[int] = 2

    def score(self, ctx, layer, obs):
        return obs["window"].sum(axis=2)


def hand_state(norms, pads=(0, 0)):
    """1 layer... 2 layers of 8 slots whose key norms per slot are ``norms`` (same for every head); row b has
    ``pads[b]`` left-padding slots."""
    t = len(norms)
    k = np.zeros((2, 2, t, 4), np.float32)
    k[..., 0] = np.asarray(norms, np.float32)
    pos = np.stack([np.concatenate([np.full(p, -1), np.arange(t - p)]) for p in pads]).astype(np.int32)
    pos = np.broadcast_to(pos[:, None], (2, 2, t)).copy()
    layer = DenseKV(k=jnp.asarray(k), v=jnp.asarray(k + 1), pos=jnp.asarray(pos), fill=jnp.full((2, 2), t, jnp.int32))
    next_pos = jnp.asarray((pos[:, 0] >= 0).sum(-1), jnp.int32)
    return KVState(layers=(layer, layer), next_pos=next_pos, rope_shift=jnp.zeros((2,), jnp.int32))


def kept_positions(state, layer=0, b=0, h=0):
    p = np.asarray(state.layers[layer].pos[b, h])
    return sorted(p[p >= 0].tolist())


def test_hand_case_budget_sinks_window_and_room():
    norms = [5.0, 9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0]  # positions 0..7; smallest norms at 2, 4, 6
    state = hand_state(norms)
    ctx = Context(cfg=CFG, decode_room=3, prompt_len=8)
    out, _ = KeyNorm(budget=3).prefill(state, None, ctx)
    assert kept_positions(out) == [2, 4, 6]
    assert out.layers[0].capacity == 3 + 3 and np.asarray(out.layers[0].fill).tolist() == [[3, 3], [3, 3]]
    # the kept slots carry their own keys, in temporal order
    np.testing.assert_allclose(np.asarray(out.layers[1].k[0, 1, :3, 0]), [1.0, 2.0, 3.0])
    # sinks and the recent window are kept whatever their score
    out, _ = KeyNorm(budget=4, n_sink=1, window=1).prefill(state, None, ctx)
    assert kept_positions(out) == [0, 2, 4, 7]


def test_padding_never_kept():
    state = hand_state([0.1, 0.2, 5.0, 4.0, 3.0, 2.0, 1.0, 6.0], pads=(2, 0))  # row 0: slots 0, 1 are padding
    out, _ = KeyNorm(budget=3).prefill(state, None, Context(cfg=CFG, prompt_len=8))
    assert kept_positions(out, b=0) == [2, 3, 4]  # row 0's positions start after its padding: norms 3, 2, 1
    assert kept_positions(out, b=1) == [0, 1, 6]


def test_query_head_scores_are_reduced_per_kv_head():
    state = hand_state([1.0] * 8)
    w = np.zeros((2, 4, 2, 8), np.float32)
    w[:, 0:2, :, 5] = 1.0  # query heads 0, 1 (KV head 0) vote for position 5
    w[:, 2:4, :, 1] = 1.0  # query heads 2, 3 (KV head 1) vote for position 1
    obs = ({"window": jnp.asarray(w)},) * 2
    m = LastQueryVotes(budget=2, window=1)
    assert m.observe().window == 2
    out, out_obs = m.prefill(state, obs, Context(cfg=CFG, prompt_len=8))
    assert kept_positions(out, h=0) == [5, 7] and kept_positions(out, h=1) == [1, 7]
    assert out_obs[0]["window"].shape == (2, 4, 2, 2)  # observations follow the kept slots (for a chain)


def test_bad_score_shape_and_hyperparameters_fail_clearly():
    @dataclasses.dataclass(frozen=True)
    class Bad(ScorerMethod):
        name: ClassVar[str] = "test_bad"

        def score(self, ctx, layer, obs):
            return layer.pos[:, 0]

    with pytest.raises(ValueError, match=r"test_bad.score must return \(batch, kv heads or query heads, slots\) = \(2, 2 or a multiple, 8\)"):
        Bad(budget=2).prefill(hand_state([1.0] * 8), None, Context(cfg=CFG))
    with pytest.raises(ValueError, match=r"budget \(4\) must exceed window \+ n_sink \(2 \+ 2\)"):
        KeyNorm(budget=4, window=2, n_sink=2)
    with pytest.raises(NotImplementedError, match="must implement score"):
        ScorerMethod(budget=2).score(None, None, None)


def test_register_get_method_chain_and_redefinition():
    try:
        register(KeyNorm)
        assert "test_key_norm" in available_methods()
        m = get_method("test_key_norm", budget=3)
        assert m == KeyNorm(budget=3) and method_family(m) == "eviction"
        assert method_family(chain(m, get_method("kivi"))) == "composed"
        with pytest.raises(ValueError, match="no hyper-parameter"):
            get_method("test_key_norm", bugdet=3)
        # the same definition run again (a notebook cell) replaces it; another class under the name is refused
        redefined = type("KeyNorm", (KeyNorm,), {"__module__": KeyNorm.__module__, "__qualname__": "KeyNorm"})
        assert register(redefined) is redefined

        class Other(KeyNorm):
            pass

        with pytest.raises(ValueError, match="'test_key_norm' is already registered"):
            register(Other)
    finally:
        _REGISTRY.pop("test_key_norm", None)


def test_families_of_registered_methods():
    fam = {n: method_family(_REGISTRY[n]) for n in available_methods()}
    assert fam["snapkv"] == "eviction" and fam["h2o"] == "decode-time eviction" and fam["d2o"] == "merging"
    assert fam["kivi"] == "quantization" and fam["full"] == "full"

"""LaCache (ladder-shaped streaming cache): the ladder against a hand-worked case, the decode hook against the host
replay, and hyper-parameter errors."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.compress import Context, get_method
from kvjax.compress.lacache import CURSOR, ladder_geometry, ladder_positions
from kvjax.config import ModelConfig
from kvjax.state import DenseKV, KVState


def test_geometry_is_the_authors():
    assert ladder_geometry(32, 16, 0) == (2, 1)  # Llama-3-8B, span 16: blocks of 2, each layer keeps 1
    assert ladder_geometry(32, 8, 0) == (4, 1)
    assert ladder_geometry(32, 16, 8) == (3, 2)


def test_hand_worked_ladder():
    """2 layers, span 1: blocks of 2 slots, layer 0 keeps a block's first slot, layer 1 its second; cache of 6 with
    1 sink; 10 tokens streamed. Worked by hand:
    t6: cursor 1 -> block [1, 2]: L0 [0 1 3 4 5 6], L1 [0 2 3 4 5 6]; cursor 2
    t7: block at slot 2 ([3, 4]): L0 [0 1 3 5 6 7], L1 [0 2 4 5 6 7]; cursor 3
    t8: block at slot 3 ([5, 6]): L0 [0 1 3 5 7 8], L1 [0 2 4 6 7 8]; cursor 4
    t9: 6 - 4 - 2 layers = 0 slots left before the ladder's end: start over at slot 1 ([1, 3] / [2, 4]):
        L0 [0 1 5 7 8 9], L1 [0 4 6 7 8 9]; cursor 2."""
    kw = dict(before=2, after=1, n_sink=1, cache_size=6)
    l0, c0 = ladder_positions(np.arange(10), 2, 0, **kw)
    l1, c1 = ladder_positions(np.arange(10), 2, 1, **kw)
    assert l0.tolist() == [0, 1, 5, 7, 8, 9] and l1.tolist() == [0, 4, 6, 7, 8, 9] and c0 == c1 == 2
    assert len(set(l0) | set(l1)) == 8 > 6  # the ladder: the layers together cover more than one layer's cache
    assert ladder_positions(np.arange(6), 2, 0, **kw)[0].tolist() == list(range(6))  # fits: untouched


CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2,
                  num_heads=2, num_kv_heads=1, head_dim=4, max_position_embeddings=64)


def test_decode_hook_continues_the_prefill_ladder():
    """Prefill of 8 tokens then 6 decode steps through the jitted hook: every layer holds what the host replay of the
    14 tokens keeps, in temporal order, with the replay's cursor."""
    m = get_method("lacache", cache_size=6, span=1, n_sink=1)
    t, b = 8, 1
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, 1, t))
    kv = lambda p: jnp.broadcast_to(p[..., None].astype(jnp.float32), p.shape + (4,))  # noqa: E731 (key = position)
    layer = DenseKV(k=kv(pos), v=kv(pos), pos=pos, fill=jnp.full((b, 1), t, jnp.int32))
    st = KVState(layers=(layer, layer), next_pos=jnp.full((b,), t, jnp.int32), rope_shift=jnp.zeros((b,), jnp.int32))
    ctx = Context(cfg=CFG, decode_room=6, prompt_len=t)
    st, _ = m.prefill(st, None, ctx)
    assert all(x.capacity == 7 for x in st.layers)  # cache size + the slot a decode step writes before compacting
    hook = jax_jit_decode(m, ctx)
    for step in range(6):
        p = jnp.full((b, 1), t + step, jnp.int32)
        st = st.replace(layers=tuple(x.append(kv(p)[:, None], kv(p)[:, None], p) for x in st.layers))
        st = hook(st)
    for i, x in enumerate(st.layers):
        want, cur = ladder_positions(np.arange(t + 6), 2, i, before=2, after=1, n_sink=1, cache_size=6)
        got = np.asarray(x.pos[0, 0])
        assert got[got >= 0].tolist() == want.tolist() and int(x.fill[0, 0]) == want.size
        assert int(x.extras[CURSOR][0, 0]) == cur
        np.testing.assert_array_equal(np.asarray(x.k[0, 0, :want.size, 0]), want)  # the keys moved with the slots


def jax_jit_decode(m, ctx):
    import jax  # noqa: PLC0415

    return jax.jit(lambda s: m.decode(s, None, ctx))


@pytest.mark.parametrize("hp, match", [({"cache_size": 0}, "cache_size"), ({"span": 0}, "span"),
                                       ({"overlap": 16}, "overlap"), ({"n_sink": -1}, "n_sink")])
def test_bad_hyperparameters(hp, match):
    with pytest.raises(ValueError, match=match):
        get_method("lacache", **hp)


def test_model_dependent_errors_before_compilation():
    with pytest.raises(ValueError, match="covers all 2 layers"):
        get_method("lacache", span=2).validate(Context(cfg=CFG))
    with pytest.raises(ValueError, match="too small"):
        get_method("lacache", cache_size=3, span=1, n_sink=1).validate(Context(cfg=CFG))


def test_chain_after_eviction_ladders_the_kept_tokens():
    """SnapKV then LaCache (synthetic 2-layer caches): each head's ladder is the replay over the tokens SnapKV kept,
    and the bytes are those of the ``cache_size + 1`` slots."""
    from kvjax.compress import chain  # noqa: PLC0415
    from kvjax.state import nbytes  # noqa: PLC0415
    from tests.test_compress_api import CTX, synthetic_state  # noqa: PLC0415

    state, obs, _ = synthetic_state(np.random.default_rng(0))
    snap = get_method("snapkv", budget=10, window=3, kernel=3)
    lac = get_method("lacache", cache_size=6, span=1, n_sink=1)
    ev, ev_obs = snap.prefill(state, obs, CTX)
    out, _ = chain(snap, lac).prefill(state, obs, CTX)
    for i, (e, x) in enumerate(zip(ev.layers, out.layers)):
        assert x.capacity == 7
        for b in range(e.pos.shape[0]):
            for h in range(e.pos.shape[1]):
                kept = np.sort(np.asarray(e.pos[b, h])[np.asarray(e.pos[b, h]) >= 0])
                want, _ = ladder_positions(kept, 2, i, before=2, after=1, n_sink=1, cache_size=6)
                got = np.asarray(x.pos[b, h])
                assert got[got >= 0].tolist() == want.tolist()
        b_, h_, _, d = x.k.shape
        assert nbytes(x) == 4 * b_ * h_ * (7 * (2 * d + 1) + 2)  # k, v, pos per slot; fill and cursor per head

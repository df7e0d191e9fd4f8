"""kvjax.persist: bit-exact save/load of (compressed) KV states with tensorstore, metadata checks, bytes on disk."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import persist
from kvjax.compress import chain, get_method
from kvjax.compress.base import Context
from kvjax.generate import generate, prefill_compressed

from conftest import tiny_llama_with_prompt

T = 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_with_prompt(tmp_path_factory, T)


def _bits_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _assert_same_state(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)  # classes and static fields (QuantSpec ...) included
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert _bits_equal(x, y), jax.tree_util.keystr(path)


METHODS = {
    "full-bf16": None,
    "kivi2": ("kivi", dict(bits=2, group=8, residual=16)),
    "gear": ("gear", dict(buffer=8)),
    "mikv-int8-hi": ("mikv", dict(residual=8, hi_bits=8)),
    "rotatekv": ("rotatekv", {}),
}


@pytest.mark.parametrize("which", list(METHODS))
def test_roundtrip_is_bit_exact(tiny, tmp_path, which):
    model, params, prompt = tiny
    m = METHODS[which]
    method = None if m is None else get_method(m[0], **m[1])
    dtype = jnp.bfloat16 if m is None else jnp.float32
    state = model.init_state(2, T + 4, dtype) if m is None else None
    _, state = prefill_compressed(model, params, prompt, method=method, decode_room=4, state=state)
    info = persist.save_state(str(tmp_path), state, {"run": which}, cfg=model.cfg, method=method)
    assert info["layer_classes"] and info["config_fingerprint"] == persist.config_fingerprint(model.cfg)
    loaded = persist.load_state(str(tmp_path), like=state, cfg=model.cfg)
    _assert_same_state(state, loaded)
    again = persist.load_state(str(tmp_path))  # without `like`: rebuilt from the saved skeleton alone
    _assert_same_state(state, again)
    meta = persist.read_meta(str(tmp_path))
    assert meta["meta"] == {"run": which} and meta["kvjax_version"] == kvjax.__version__
    assert meta["method"] == (None if method is None else method.describe())
    assert meta["state_bytes"] == kvjax.nbytes(state)
    assert meta["disk_bytes"] == persist.disk_bytes(str(tmp_path))


def test_xor_token_delta_roundtrip_is_bit_exact(tiny, tmp_path):
    model, params, prompt = tiny
    _, state = model.jit_prefill(params, prompt, model.init_state(2, T, jnp.bfloat16), logits="none")
    persist.save_state(str(tmp_path), state, cfg=model.cfg, token_delta=True)
    assert any(a["xor_delta"] for a in persist.read_meta(str(tmp_path))["arrays"])
    _assert_same_state(state, persist.load_state(str(tmp_path), like=state))


def test_generation_after_load_equals_generation_without_save(tiny, tmp_path):
    model, params, prompt = tiny
    method = chain(get_method("snapkv", budget=24, window=8), get_method("kivi", bits=2, group=8, residual=16))
    follow = jnp.asarray(np.random.default_rng(5).integers(0, model.cfg.vocab_size, (2, 8)), jnp.int32)
    new = 6
    _, state = prefill_compressed(model, params, prompt, method=method, decode_room=follow.shape[1] + new)
    persist.save_state(str(tmp_path), state, cfg=model.cfg, method=method)
    loaded = persist.load_state(str(tmp_path), like=state, cfg=model.cfg)
    a = generate(model, params, follow, state=state, max_new_tokens=new)  # next turn: a prompt chunk, then decode
    b = generate(model, params, follow, state=loaded, max_new_tokens=new)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    _assert_same_state(a.state, b.state)


def test_loading_into_another_model_or_layout_fails_clearly(tiny, tmp_path):
    model, params, prompt = tiny
    _, state = prefill_compressed(model, params, prompt, method=get_method("kivi", group=8, residual=16),
                                  decode_room=4)
    path = str(tmp_path / "kv")
    persist.save_state(path, state, cfg=model.cfg)
    other_cfg = dataclasses.replace(model.cfg, num_layers=3)
    with pytest.raises(persist.StateFileError, match="different model config.*num_layers: saved 2 vs 3"):
        persist.load_state(path, cfg=other_cfg)
    with pytest.raises(ValueError, match="different model config"):
        persist.load_state(path, cfg=dataclasses.replace(model.cfg, rope_theta=500000.0))
    other = kvjax.Model(dataclasses.replace(model.cfg, num_kv_heads=1))  # same layer classes, other shapes
    kivi = get_method("kivi", group=8, residual=16)
    ctx = Context(cfg=other.cfg, decode_room=4, prompt_len=T)
    other_state = jax.jit(lambda st: kivi.prefill(st, None, ctx)[0])(other.init_state(2, T))
    with pytest.raises(persist.StateFileError, match="has shape .* expected .*different model config"):
        persist.load_state(path, like=other_state)
    with pytest.raises(persist.StateFileError, match="does not match the expected state structure"):
        persist.load_state(path, like=model.init_state(2, T))  # dense layers expected, quantized saved
    with pytest.raises(persist.StateFileError, match="no saved KV state"):
        persist.load_state(str(tmp_path / "missing"))
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    meta["skeleton"]["cls"] = "os.system"
    bad = str(tmp_path / "bad")
    os.makedirs(bad)
    with open(os.path.join(bad, "meta.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(persist.StateFileError, match="only kvjax classes"):
        persist.load_state(bad)
    with pytest.raises(TypeError, match="JSON"):
        persist.save_state(str(tmp_path / "x"), state, {"f": object()})


def test_bytes_on_disk_vs_raw_bf16(tiny, tmp_path, capsys):
    """Lossless zstd storage of a bf16 cache and of 2/4-bit KIVI caches, against the same KV as raw bf16."""
    model, params, _ = tiny
    n = 512
    prompt = jnp.asarray(np.random.default_rng(2).integers(0, model.cfg.vocab_size, (1, n)), jnp.int32)
    cfg = model.cfg
    raw = cfg.num_layers * cfg.num_kv_heads * n * 2 * cfg.head_dim * 2
    rows = {}
    _, dense = model.jit_prefill(params, prompt, model.init_state(1, n, jnp.bfloat16), logits="none")
    for name, method in (("bf16", None), ("kivi4", get_method("kivi", bits=4, group=16, residual=32)),
                         ("kivi2", get_method("kivi", bits=2, group=16, residual=32))):
        st = dense if method is None else prefill_compressed(model, params, prompt, method=method,
                                                             state=model.init_state(1, n, jnp.bfloat16))[1]
        info = persist.save_state(str(tmp_path / name), st, cfg=cfg, method=method)
        assert info["raw_bf16_bytes"] == raw
        rows[name] = (info["state_bytes"], info["disk_bytes"])
    with capsys.disabled():
        print(f"\n[persist] raw bf16 KV {raw} B; " + "; ".join(f"{k}: in memory {s} B, on disk {d} B "
                                                             f"({raw / d:.2f}x vs raw bf16)"
                                                             for k, (s, d) in rows.items()))
    assert rows["bf16"][1] < rows["bf16"][0]  # zstd + shuffle shrinks even the float cache a bit
    assert rows["kivi2"][1] < rows["kivi4"][1] < raw
    assert rows["kivi2"][1] < raw / 3

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
    "gear": ("gear", dict(buffer=8, group=8)),
    "mikv-int8-hi": ("mikv", dict(group=8, hi_bits=8)),
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
        meta_bytes = os.path.getsize(tmp_path / name / "meta.json")  # ~10 KB of config, skeleton, checksums
        rows[name] = (info["state_bytes"], info["disk_bytes"], info["disk_bytes"] - meta_bytes)
    with capsys.disabled():
        print(f"\n[persist] raw bf16 KV {raw} B; " + "; ".join(f"{k}: in memory {s} B, on disk {d} B "
                                                             f"({raw / d:.2f}x vs raw bf16)"
                                                             for k, (s, d, _) in rows.items()))
    assert rows["bf16"][1] < rows["bf16"][0]  # zstd + shuffle shrinks even the float cache a bit
    assert rows["kivi2"][1] < rows["kivi4"][1] < raw
    assert rows["kivi2"][2] < raw / 2.5  # the arrays (the fixed-size metadata dominates at this toy size);
    # the last R=32 values stay bf16 (KIVI's sliding value window)


# ------------------------------------------------------------------------------------------------- integrity


def _saved_dense(tiny, path):
    model, params, prompt = tiny
    _, state = model.jit_prefill(params, prompt, model.init_state(2, T, jnp.bfloat16), logits="none")
    info = persist.save_state(str(path), state, cfg=model.cfg, chunk_tokens=16)
    return state, info


def _array_dir(path, info, name):
    i = next(j for j, a in enumerate(info["arrays"]) if a["name"] == name)
    return os.path.join(str(path), info["arrays_dir"], str(i))


def test_flipped_bytes_and_bits_are_detected_naming_the_array(tiny, tmp_path):
    """Regression: 28 of 39 single-byte flips in a key chunk (and one flipped bit of ``pos``) loaded silently."""
    state, info = _saved_dense(tiny, tmp_path)
    names = [a["name"] for a in info["arrays"]]
    assert ".layers[0].k" in names and ".layers[0].pos" in names and all(a["sha256"] for a in info["arrays"])
    chunk = os.path.join(_array_dir(tmp_path, info, ".layers[0].k"), "c", "0", "0", "1", "0")
    good = open(chunk, "rb").read()
    for at in np.linspace(0, len(good) - 1, 39).astype(int):
        bad = bytearray(good)
        bad[at] ^= 0xFF
        open(chunk, "wb").write(bytes(bad))
        with pytest.raises(persist.StateFileError, match=r"array \d+ \(\.layers\[0\]\.k\)"):
            persist.load_state(str(tmp_path))
    open(chunk, "wb").write(good)
    _assert_same_state(state, persist.load_state(str(tmp_path)))
    pos = os.path.join(_array_dir(tmp_path, info, ".layers[1].pos"), "c", "0", "0", "0")
    raw = bytearray(open(pos, "rb").read())
    raw[-1] ^= 0x01  # one bit
    open(pos, "wb").write(bytes(raw))
    with pytest.raises(persist.StateFileError, match=r"\(\.layers\[1\]\.pos\)"):
        persist.load_state(str(tmp_path))


def test_missing_chunk_file_is_an_error_naming_the_array(tiny, tmp_path):
    """Regression: a deleted chunk file loaded as zeros."""
    _, info = _saved_dense(tiny, tmp_path)
    where = _array_dir(tmp_path, info, ".layers[1].v")
    os.remove(os.path.join(where, "c", "0", "0", "2", "0"))
    with pytest.raises(persist.StateFileError, match=r"\(\.layers\[1\]\.v\).*1 of \d+ chunk files missing"):
        persist.load_state(str(tmp_path))


def test_save_interrupted_before_its_commit_keeps_the_old_state(tiny, tmp_path, monkeypatch):
    """A save that dies before ``meta.json`` is replaced leaves the previous state loadable; the next save cleans up."""
    model, params, prompt = tiny
    old, _ = _saved_dense(tiny, tmp_path)
    _, new = prefill_compressed(model, params, prompt, method=get_method("kivi", group=8, residual=16))

    def die(*a, **k):
        raise KeyboardInterrupt  # as if killed just before the commit

    monkeypatch.setattr(persist, "_write_meta", die)
    with pytest.raises(KeyboardInterrupt):
        persist.save_state(str(tmp_path), new, cfg=model.cfg)
    monkeypatch.undo()
    assert len([n for n in os.listdir(tmp_path) if n.startswith("arrays-")]) == 2  # the old one and the torn new one
    _assert_same_state(old, persist.load_state(str(tmp_path)))
    persist.save_state(str(tmp_path), new, cfg=model.cfg)
    assert len([n for n in os.listdir(tmp_path) if n.startswith("arrays-")]) == 1
    _assert_same_state(new, persist.load_state(str(tmp_path)))


_KILL_CHILD = """
import sys, numpy as np
from kvjax import persist
path = sys.argv[1]
rng = np.random.default_rng(0)
states = [{"k": rng.normal(size=(4, 8, 256, 64)).astype(np.float32) + i, "pos": (np.arange(256 * 4) + i).astype(np.int32)} for i in (0, 1)]
persist.save_state(path, states[0], chunk_tokens=32)
print("saved", flush=True)
i = 1
while True:
    persist.save_state(path, states[i % 2], chunk_tokens=32)
    i += 1
"""


def test_kill_9_during_save_over_an_existing_state_leaves_a_loadable_state(tmp_path):
    """Regression: kill -9 during ``save_state`` over an existing state lost both states at most kill points."""
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rng = np.random.default_rng(0)
    expected = [rng.normal(size=(4, 8, 256, 64)).astype(np.float32) + i for i in (0, 1)]
    for delay in (0.1, 0.45):
        path = str(tmp_path / f"kv{delay}")
        p = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, path], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu"))
        try:
            assert p.stdout.readline().strip() == "saved"
            time.sleep(delay)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
        loaded = persist.load_state(path)
        k = np.asarray(loaded["k"])
        assert any(np.array_equal(k, e) for e in expected)


# ------------------------------------------------------------------------------------------------- CacheGen codec


def _cachegen_bound(x: np.ndarray, valid: np.ndarray, bins: int, group: int = 10) -> np.ndarray:
    """Per entry of ``x`` (B, H, T, D): the largest error CacheGen's quantization may make, from the original values
    only: anchors (first token of each group of ``group`` valid tokens) ``max|x_t| / 127 / 2``; other tokens
    ``max|x_t - anchor| + anchor error`` over ``bins // 2 - 1``, halved (over all heads' channels of a token)."""
    b, h, t, d = x.shape
    xf = np.where(valid[..., None], x, 0).transpose(0, 2, 1, 3).reshape(b, t, h * d).astype(np.float64)
    bound = np.zeros((b, t))
    for i in range(b):
        idx = np.nonzero(valid[i].any(0))[0]
        for j, s in enumerate(idx):
            a = idx[j - j % group]
            ea = np.abs(xf[i, a]).max() / 127 / 2
            bound[i, s] = ea if s == a else (np.abs(xf[i, s] - xf[i, a]).max() + ea) / (bins // 2 - 1) / 2
    return np.broadcast_to(bound[:, None, :, None], x.shape)


def test_cachegen_codec_roundtrip_within_quantization_error_and_padding_decodes_to_zero():
    from kvjax.codec import cachegen

    rng = np.random.default_rng(0)
    b, h, t, d = 2, 3, 47, 8
    x = (rng.normal(size=(b, h, 1, d)) + 0.2 * np.cumsum(rng.normal(size=(b, h, t, d)), axis=2)).astype(np.float32)
    valid = np.ones((b, h, t), bool)
    valid[0, :, :6] = False  # a left-padded row
    for bins in (32, 16, 8):
        y = cachegen.decode(cachegen.encode(x, valid, bins))
        err = np.abs(y - x)[valid]
        bound = _cachegen_bound(x, valid, bins)[valid]
        assert np.all(err <= bound * (1 + 1e-5) + 1e-7), (bins, float((err - bound).max()))
        assert err.max() > 0.05 * bound.max()  # lossy, and the bound is not vacuous
        assert np.all(y[~valid] == 0)
    with pytest.raises(ValueError, match="bins must be an integer in"):
        cachegen.encode(x, valid, 300)


def test_save_state_cachegen_roundtrips_within_quantization_error(tiny, tmp_path):
    from kvjax.codec import cachegen

    model, params, prompt = tiny
    _, state = model.jit_prefill(params, prompt, model.init_state(2, T, jnp.bfloat16), logits="none")
    cfg = cachegen.CacheGenConfig()
    info = persist.save_state(str(tmp_path), state, cfg=model.cfg, codec="cachegen")
    assert info["format_version"] == 3 and info["codec"]["name"] == "cachegen" and info["codec"]["group"] == 10
    coded = [a for a in info["arrays"] if a.get("codec") == "cachegen"]
    assert len(coded) == 2 * model.cfg.num_layers
    n = model.cfg.num_layers
    assert [a["bins"] for a in coded if a["name"].endswith(".k")] == [cfg.bins("k", i, n) for i in range(n)]
    assert cfg.bins("k", 0, 32) == 32 and cfg.bins("k", 31, 32) == 16 and cfg.bins("v", 1, 32) == 32 \
        and cfg.bins("v", 2, 32) == 16  # the authors' quantization_7b.json
    loaded = persist.load_state(str(tmp_path), like=state, cfg=model.cfg)
    for layer, got, a_k, a_v in zip(state.layers, loaded.layers, coded[0::2], coded[1::2]):
        assert _bits_equal(layer.pos, got.pos)
        valid = np.asarray(layer.pos) >= 0
        for x, y, a in ((layer.k, got.k, a_k), (layer.v, got.v, a_v)):
            assert y.dtype == x.dtype
            x32, y32 = np.asarray(x, np.float32), np.asarray(y, np.float32)
            bound = _cachegen_bound(x32, valid, a["bins"]) + np.abs(x32) * 2.0 ** -8  # + bf16 rounding of the output
            assert np.all(np.abs(y32 - x32) <= bound + 1e-6), a["name"]
            assert not np.array_equal(x32, y32)
    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        persist.save_state(str(tmp_path), state, codec="zip")


def test_cachegen_corrupt_or_truncated_stream_fails_with_one_line_error(tiny, tmp_path):
    from kvjax.codec import cachegen

    model, params, prompt = tiny
    _, state = model.jit_prefill(params, prompt, model.init_state(2, T, jnp.bfloat16), logits="none")
    x, valid = np.asarray(state.layers[0].k), np.asarray(state.layers[0].pos) >= 0
    stream = cachegen.encode(x, valid, 16)
    flipped = bytearray(stream)
    flipped[len(stream) // 2] ^= 0x10
    for bad, msg in ((stream[:-7], "truncated"), (stream[:30], "truncated"), (bytes(flipped), "CRC32"),
                     (b"not a stream at all", "not a cachegen stream")):
        with pytest.raises(cachegen.CacheGenError, match=msg) as e:
            cachegen.decode(bad)
        assert "\n" not in str(e.value)
    info = persist.save_state(str(tmp_path), state, cfg=model.cfg, codec="cachegen")
    i = next(j for j, a in enumerate(info["arrays"]) if a.get("codec") == "cachegen")
    chunk = os.path.join(str(tmp_path), info["arrays_dir"], str(i), "c", "0")
    good = open(chunk, "rb").read()
    for bad, msg in ((good[:len(good) // 2], f"array {i} "), (good[:-40] + bytes([good[-40] ^ 1]) + good[-39:],
                                                              "SHA-256 checksum mismatch of its cachegen stream")):
        with open(chunk, "wb") as f:
            f.write(bad)
        with pytest.raises(persist.StateFileError, match=msg) as e:
            persist.load_state(str(tmp_path))
        assert "\n" not in str(e.value), str(e.value)

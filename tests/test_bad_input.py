"""Bad input fails with clear errors, never a silent wrong answer or a crash deep in XLA."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.checkpoints.safetensors import CheckpointError, load_safetensors
from kvjax.config import UnsupportedConfigError, config_from_hf
from kvjax.generate import SamplingConfig, generate

from conftest import make_hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _, path = make_hf_model("llama", tmp_path_factory)
    cfg, params = load_safetensors(path, progress=False)
    return path, kvjax.Model(cfg), params


def _raw_config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def test_float_tokens_rejected(tiny):
    _, model, params = tiny
    with pytest.raises(TypeError, match="integer dtype"):
        model.prefill(params, jnp.zeros((1, 4), jnp.float32), model.init_state(1, 8))


def test_wrong_rank_tokens_rejected(tiny):
    _, model, params = tiny
    with pytest.raises(ValueError, match="2-D"):
        model.prefill(params, jnp.zeros((4,), jnp.int32), model.init_state(1, 8))


def test_batch_mismatch_rejected(tiny):
    _, model, params = tiny
    with pytest.raises(ValueError, match="batch 2 but the KV state was made for batch 1"):
        model.prefill(params, jnp.zeros((2, 4), jnp.int32), model.init_state(1, 8))


def test_token_out_of_vocab_rejected(tiny):
    _, model, params = tiny
    with pytest.raises(ValueError, match="token ids must be in"):
        model.prefill(params, jnp.full((1, 4), 10_000, jnp.int32), model.init_state(1, 8))


def test_positions_past_capacity(tiny):
    _, model, params = tiny
    _, state = model.prefill(params, jnp.zeros((1, 6), jnp.int32), model.init_state(1, 8))
    with pytest.raises(ValueError, match="positions past capacity"):
        model.prefill(params, jnp.zeros((1, 3), jnp.int32), state)
    with pytest.raises(ValueError, match="positions past capacity"):
        generate(model, params, jnp.zeros((1, 6), jnp.int32), model.init_state(1, 8), max_new_tokens=4)


def test_mask_shape_rejected(tiny):
    _, model, params = tiny
    with pytest.raises(ValueError, match="token_mask shape"):
        model.prefill(params, jnp.zeros((1, 4), jnp.int32), model.init_state(1, 8), jnp.ones((1, 5), bool))


def test_unknown_architecture(tiny):
    raw = _raw_config(tiny[0])
    raw["architectures"] = ["FalconForCausalLM"]
    with pytest.raises(UnsupportedConfigError, match="unsupported architecture 'FalconForCausalLM'"):
        config_from_hf(raw)


def test_unsupported_config_fields_fail(tiny):
    raw = _raw_config(tiny[0])
    with pytest.raises(UnsupportedConfigError, match="does not implement: frobnicate"):
        config_from_hf({**raw, "frobnicate": 3})
    with pytest.raises(UnsupportedConfigError, match="rope_scaling type 'yarn'"):
        config_from_hf({**raw, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedConfigError, match="hidden_act"):
        config_from_hf({**raw, "hidden_act": "relu"})
    with pytest.raises(UnsupportedConfigError, match="mlp_bias"):
        config_from_hf({**raw, "mlp_bias": True})


def test_corrupt_safetensors(tiny, tmp_path):
    path = tiny[0]
    for name in os.listdir(path):
        data = open(os.path.join(path, name), "rb").read()
        if name == "model.safetensors":
            data = data[: len(data) // 2]  # truncated download
        open(tmp_path / name, "wb").write(data)
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        load_safetensors(tmp_path, progress=False)


def test_missing_and_misshaped_tensors(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = tiny[0]
    tensors = load_file(os.path.join(path, "model.safetensors"))
    open(tmp_path / "config.json", "w").write(open(os.path.join(path, "config.json")).read())
    t2 = dict(tensors)
    del t2["model.layers.1.mlp.up_proj.weight"]
    save_file(t2, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 tensors, e.g. model.layers.1.mlp.up_proj.weight"):
        load_safetensors(tmp_path, progress=False)
    t3 = dict(tensors)
    t3["model.norm.weight"] = np.zeros((3,), np.float32)
    save_file(t3, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.norm.weight .* has shape \\(3,\\)"):
        load_safetensors(tmp_path, progress=False)
    t4 = dict(tensors, **{"model.layers.0.self_attn.rotary_extra": np.zeros((2,), np.float32)})
    save_file(t4, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not know"):
        load_safetensors(tmp_path, progress=False)


def test_pickle_only_checkpoint_refused(tiny, tmp_path):
    open(tmp_path / "config.json", "w").write(open(os.path.join(tiny[0], "config.json")).read())
    open(tmp_path / "pytorch_model.bin", "wb").write(b"\x80\x04")
    with pytest.raises(CheckpointError, match="never pickle"):
        load_safetensors(tmp_path, progress=False)


def test_missing_checkpoint_dir():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_safetensors("/nonexistent/ckpt", progress=False)


def test_bad_sampling_config():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)

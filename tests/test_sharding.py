"""Sharding: bad meshes fail before compilation (here, one device), and the 8-device suite (``tests/sharding``) run in
a subprocess with ``--xla_force_host_platform_device_count=8`` (the flag must be set before jax is imported, and this
process already imported it)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvjax import sharding
from kvjax.config import ModelConfig
from kvjax.sharding import MeshSpec, ShardingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128, hidden_size=64, intermediate_size=96,
                  num_layers=2, num_heads=6, num_kv_heads=3, head_dim=8).validate()


def test_parse_mesh():
    assert sharding.parse_mesh("data:2,model:4") == MeshSpec(2, 4, 1)
    assert sharding.parse_mesh(" sequence:8 ") == MeshSpec(1, 1, 8)
    assert sharding.parse_mesh("") is None
    for bad, msg in [("data=2;model=4", "expected comma-separated"), ("tensor:2", "axis 'tensor' is unknown"),
                     ("data:0", "must be a positive size"), ("data:2,data:2", "given twice")]:
        with pytest.raises(ShardingError, match=msg):
            sharding.parse_mesh(bad)


def test_bad_meshes_fail_before_compiling():
    import jax

    with pytest.raises(ShardingError, match=r"mesh axis model:2 does not divide the model's 3 KV heads .*"
                                            r"model must be one of \[1, 3\]"):
        sharding.validate_mesh(MeshSpec(model=2), CFG)
    with pytest.raises(ShardingError, match="data:2 does not divide the batch of 3 sequences"):
        sharding.validate_mesh(MeshSpec(data=2), CFG, batch=3)
    n = jax.local_device_count()
    with pytest.raises(ShardingError, match=f"needs {2 * n} devices but only {n} cpu device"):
        sharding.make_mesh(f"data:{2 * n}")
    from kvjax.compress import get_method

    with pytest.raises(ShardingError, match="method 'kivi' leaves a quantized cache, which cannot be sharded along "
                                            "the sequence axis"):
        sharding.validate_mesh(MeshSpec(sequence=2), CFG, method=get_method("kivi"))
    sharding.validate_mesh(MeshSpec(sequence=2), CFG, method=get_method("snapkv"))  # dense: fine
    from kvjax.model import Model

    with pytest.raises(ShardingError, match="model:2 does not divide"):
        Model(CFG, mesh=MeshSpec(model=2))


def test_experiment_mesh_config_errors(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import tiny  # noqa: PLC0415

    from kvjax.eval.experiment import ConfigError, validate

    for mesh, msg in [("sequence:2", "mesh='sequence:2': method 'kivi' leaves a quantized cache"),
                      ("data:3", "data:3 does not divide the batch of 2 sequences"),
                      ("sequence:64", "needs 64 devices but only"), ("modle:2", "axis 'modle' is unknown")]:
        c = tiny.get_config()
        c.run_dir = str(tmp_path / "out")
        c.mesh = mesh
        if mesh == "sequence:2":
            c.methods.kivi = {"bits": 2}
        with pytest.raises(ConfigError, match=msg):
            validate(c)
    assert not (tmp_path / "out").exists()


def _run_eight_device_suite(marker: str):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                        "-m", marker, os.path.join(ROOT, "tests", "sharding")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


def test_eight_device_suite():
    """tests/sharding/ on 8 fake CPU devices: sharded generate equals unsharded (full cache, SnapKV), the rules'
    shardings of params and state, a sequence:8 long context with 1/8 of the KV bytes per device, and the
    sequence-split Pallas decode kernel vs the reference over 2 and 4 devices."""
    _run_eight_device_suite("not slow")


@pytest.mark.slow
def test_eight_device_suite_slow():
    """The slow part of tests/sharding/: H2O (decode-time eviction), KIVI (quantization) and AdaKV (budgets across
    heads) sharded equal unsharded; Model(impl="pallas") decode through the per-shard kernel."""
    _run_eight_device_suite("slow")

"""One-line errors: the launch CLI exits with code 2 and one line naming the bad value and what is allowed (before
anything is compiled), and the API raises a clear exception, for every bad input of issue 17's list."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import launch
from kvjax.compress import chain, get_method
from kvjax.eval import checks
from kvjax.eval.experiment import ConfigError, validate
from kvjax.generate import SamplingConfig, generate

from conftest import make_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(run_dir):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import tiny  # noqa: PLC0415

    c = tiny.get_config()
    c.run_dir = str(run_dir)
    return c


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and err.startswith("kvjax.launch: error: "), err
    return err


# ---------------------------------------------------------------------------------------------------------------------
# Launch: config files (checked before ml_collections executes them)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    ("def get_config(:\n    pass\n", r"syntax error at line 1"),
    ("x = 1\n", r"does not define get_config\(\)"),
    (None, r"does not exist"),
    ("DIR", r"is a directory"),
])
def test_bad_config_files(tmp_path, capsys, content, message):
    path = tmp_path / "cfg.py"
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        checks.check_config_file(str(path))
    with pytest.raises(SystemExit) as e:
        launch.parse_flags(["kvjax.launch", f"--config={path}"])
    assert e.value.code == 2
    assert str(path) in one_line(capsys)


@pytest.mark.parametrize("override, message", [
    ("--config.methods.snapkv.nosuch=3", "methods.snapkv has no field 'nosuch' in {cfg} (it has: budget, window)"),
    ("--config.perplexity.bogus.x=1", "perplexity has no field 'bogus'"),
    ("--config.run_dir.x=3", "run_dir has no field 'x' in {cfg} (it has: a str value)"),
])
def test_override_of_a_missing_field_is_one_line(override, message):
    """Regression: ml_collections raised AttributeError / TypeError with a traceback for a misspelt override (through
    the real command line: absl registers the override flags while it parses ``--config``)."""
    cfg = f"{ROOT}/configs/tiny.py"
    r = subprocess.run([sys.executable, "-m", "kvjax.launch", "--dry_run", f"--config={cfg}", override],
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=ROOT)
    lines = [l for l in r.stderr.splitlines() if l.startswith("kvjax.launch")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message.format(cfg=cfg) in lines[0] and override.split("=")[0] in lines[0]


def test_cli_end_to_end_exit_code_and_one_line(tmp_path):
    """Through the real command line (two cases; the others go through the same functions in-process)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    for args, needle in (([f"--config={bad}"], "syntax error at line 1"),
                         ([f"--config={ROOT}/configs/tiny.py", "--config.methods.snapkv.budget=abc",
                           f"--config.run_dir={tmp_path}/out"], "budget='abc' is not a valid int")):
        r = subprocess.run([sys.executable, "-m", "kvjax.launch", "--noprogress", *args], capture_output=True,
                           text=True, env=env, cwd=ROOT)
        assert r.returncode == 2, r.stderr
        lines = [l for l in r.stderr.splitlines() if l.startswith("kvjax.launch")]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Launch: overrides of the wrong type or range (ml_collections parses "abc" in a tuple field as ("abc",))
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.methods.snapkv.update({"budget": ("abc",)}), r"snapkv.*budget='abc' is not a valid int"),
    (lambda c: c.methods.snapkv.update({"budget": (40.5,)}), r"budget=40.5 is not a valid int"),
    (lambda c: c.methods.snapkv.update({"budget": ()}), r"methods.snapkv.budget=\(\): an empty sweep"),
    (lambda c: c.tasks.passkey.update({"context_tokens": (-96,)}), r"tasks.passkey.context_tokens=-96: expected an "
                                                                    r"integer > 0"),
    (lambda c: c.tasks.passkey.update({"context_tokens": ()}), r"context_tokens=\(\): an empty tuple"),
    (lambda c: c.tasks.passkey.update({"depths": (1.5,)}), r"tasks.passkey.depths has 1.5: depths are numbers in "
                                                          r"\[0, 1\]"),
    (lambda c: c.tasks.passkey.update({"depths": (-0.1,)}), r"depths are numbers in \[0, 1\]"),
    (lambda c: c.tasks.passkey.update({"seeds": ("a",)}), r"seeds are integers"),
    (lambda c: c.perplexity.update({"n_segments": 0}), r"perplexity.n_segments=0: expected an integer > 0"),
    (lambda c: c.perplexity.update({"eval_tokens": 0}), r"perplexity.eval_tokens=0"),
    (lambda c: c.perplexity.update({"context_tokens": -1}), r"perplexity.context_tokens=-1"),
    (lambda c: c.update({"max_new_tokens": 0}), r"max_new_tokens=0: expected an integer > 0"),
    (lambda c: c.update({"max_new_tokens": -3}), r"max_new_tokens=-3"),
    (lambda c: c.tasks.passkey.update({"max_new_tokens": 0}), r"tasks.passkey.max_new_tokens=0"),
])
def test_bad_overrides_fail_before_anything_runs(tmp_path, capsys, mutate, message):
    c = tiny_config(tmp_path / "out")
    mutate(c)
    with pytest.raises(ConfigError, match=message):
        validate(c)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Launch: checkpoints (the run fails with one line while loading, before any compilation)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    _, path = make_hf_model("llama", tmp_path_factory)
    return path


def _ckpt_with_config(tmp_path, hf_dir, edit):
    d = tmp_path / "ckpt"
    d.mkdir()
    for name in os.listdir(hf_dir):
        if name != "config.json":
            os.symlink(os.path.join(hf_dir, name), d / name)
    raw = json.load(open(os.path.join(hf_dir, "config.json")))
    text = edit(raw)
    (d / "config.json").write_text(text if isinstance(text, str) else json.dumps(raw))
    return d


def _set(**kw):
    return lambda raw: raw.update(kw)


def _drop(key):
    return lambda raw: raw.pop(key)


@pytest.mark.parametrize("edit, message", [
    (_set(architectures=["FalconForCausalLM"]), r"config.json: unsupported architecture 'FalconForCausalLM'; kvjax "
                                                r"supports"),
    (lambda raw: "{not json", r"config.json is not valid JSON"),
    (_drop("num_hidden_layers"), r"config.json: required field 'num_hidden_layers' is missing"),
    (_set(num_attention_heads=0), r"config.json: field num_attention_heads=0 must be a positive integer"),
    (_set(hidden_size="64"), r"config.json: field hidden_size='64' must be a positive integer"),
    (_set(num_key_value_heads=0), r"num_key_value_heads=0 must be a positive integer"),
])
def test_bad_checkpoint_configs(tmp_path, capsys, hf_dir, edit, message):
    d = _ckpt_with_config(tmp_path, hf_dir, edit)
    c = tiny_config(tmp_path / "out")
    c.model.name = str(d)
    assert launch.execute(c, progress=False) == 2
    line = one_line(capsys)
    assert __import__("re").search(message, line), line


def test_truncated_gguf(tmp_path, capsys):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little"))  # header cut short
    c = tiny_config(tmp_path / "out")
    c.model.name = str(bad)
    assert launch.execute(c, progress=False) == 2
    line = one_line(capsys)
    assert "cut.gguf" in line and ("truncated" in line or "not a valid GGUF" in line), line


def test_checkpoint_dir_without_tokenizer(tmp_path, capsys, hf_dir):
    c = tiny_config(tmp_path / "out")
    c.model.name = hf_dir
    assert launch.execute(c, progress=False) == 2
    assert "has no tokenizer" in one_line(capsys)


# ---------------------------------------------------------------------------------------------------------------------
# Launch: run directories that cannot be written
# ---------------------------------------------------------------------------------------------------------------------
def test_run_dir_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        checks.check_run_dir(str(f))
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        checks.check_run_dir(str(f / "sub"))


def test_run_dir_not_writable(tmp_path):
    with pytest.raises(ConfigError, match="is not writable"):  # /sys refuses new entries even to root
        checks.check_run_dir("/sys/kvjax-run-test")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits
            return
        with pytest.raises(ConfigError, match="is not writable"):
            checks.check_run_dir(str(ro / "run"))
    finally:
        os.chmod(ro, 0o755)


def test_run_dir_on_a_full_disk(tmp_path, monkeypatch, capsys):
    def full(_directory):  # what a write on a full file system raises
        with open("/dev/full", "wb") as f:
            f.write(b"x")
            f.flush()

    monkeypatch.setattr(checks, "probe_write", full)
    with pytest.raises(ConfigError, match="the disk is full"):
        checks.check_run_dir(str(tmp_path / "run"))

    def run_fills_disk(config, progress):  # the disk fills up during a run
        with open("/dev/full", "wb") as f:
            f.write(b"{}\n")
            f.flush()

    monkeypatch.setattr("kvjax.eval.experiment.run_experiment", run_fills_disk)
    assert launch.execute(tiny_config(tmp_path / "run"), progress=False) == 2
    assert "no space left on device" in one_line(capsys)


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    """Only user errors become one line; a bug stays a traceback."""
    def bug(config, progress):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr("kvjax.eval.experiment.run_experiment", bug)
    with pytest.raises(ZeroDivisionError):
        launch.execute(tiny_config(tmp_path / "run"), progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(hf_dir):
    from kvjax.checkpoints.safetensors import load_safetensors

    cfg, params = load_safetensors(hf_dir, progress=False)
    return kvjax.Model(cfg), params


@pytest.mark.parametrize("tokens, mask, exc, message", [
    (np.zeros((1, 0), np.int32), None, ValueError, "no time steps"),
    ([[1, 2, 3]], None, TypeError, "got a list"),
    (np.zeros((1, 3), np.float32), None, TypeError, "integer dtype"),
    (np.ones((2, 3), np.int32), np.array([[True, True, True], [False, False, False]]), ValueError,
     r"row\(s\) \[1\] of token_mask are all padding"),
    (np.ones((1, 3), np.int32), np.ones((1, 3), np.int32), TypeError, "token_mask must be a bool array"),
])
def test_bad_prompts(tiny, tokens, mask, exc, message):
    model, params = tiny
    tokens = tokens if isinstance(tokens, list) else jnp.asarray(tokens)
    mask = None if mask is None else jnp.asarray(mask)
    with pytest.raises(exc, match=message):
        generate(model, params, tokens, prompt_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int, got 2.5"),
    (dict(max_new_tokens="3"), TypeError, "max_new_tokens must be an int"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be positive"),
    (dict(sampling=SamplingConfig), TypeError, "sampling must be a SamplingConfig"),
])
def test_bad_counts(tiny, kwargs, exc, message):
    model, params = tiny
    with pytest.raises(exc, match=message):
        generate(model, params, jnp.ones((1, 3), jnp.int32), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "temperature must be a finite number, got nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(top_p=float("nan")), "top_p must be a finite number"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
])
def test_bad_sampling(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)
    with pytest.raises(TypeError, match="top_k must be an int"):
        SamplingConfig(top_k=2.5)


@pytest.mark.parametrize("name, hp, message", [
    ("snapkv", dict(budget="abc"), r"snapkv': budget='abc' is not a valid int"),
    ("snapkv", dict(budget=64.0), r"budget=64.0 is not a valid int"),
    ("h2o", dict(budget=True), r"budget=True is not a valid int"),
    ("h2o", dict(heavy_ratio=float("nan")), r"heavy_ratio=nan is not a valid float \(NaN\)"),
    ("kivi", dict(bits="2"), r"bits='2' is not a valid int"),
    ("snapkv", dict(pooling=3), r"pooling=3 is not a valid str"),
])
def test_hyperparameters_are_typed(name, hp, message):
    with pytest.raises(ValueError, match=message):
        get_method(name, **hp)


def test_chains_that_cannot_work_are_refused_when_built():
    with pytest.raises(ValueError, match="snapkv needs a dense .* cache but runs after a method that leaves a "
                                         "quantized cache"):
        chain(get_method("kivi", group=8, residual=16), get_method("snapkv", budget=64))
    chain(get_method("snapkv", budget=64), get_method("kivi", group=8, residual=16))  # the working order


@pytest.mark.parametrize("change", [dict(num_kv_heads=1), dict(head_dim=8, num_heads=4, num_kv_heads=2)])
def test_state_of_another_model_is_refused(tiny, change):
    import dataclasses

    model, params = tiny
    other = kvjax.Model(dataclasses.replace(model.cfg, **change))
    state = other.init_state(1, 8)
    with pytest.raises(ValueError, match="a state made for another model"):
        model.prefill(params, jnp.ones((1, 3), jnp.int32), state)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("arrays"), r"field 'arrays' is missing"),
    (lambda m: m.update(format_version="2"), r"field 'format_version' is '2', expected int"),
    (lambda m: m["arrays"][0].pop("dtype"), r"field arrays\[0\].'dtype' is missing"),
    (lambda m: m["arrays"][0].update(shape="1x2"), r"arrays\[0\].'shape' is '1x2', expected list"),
    (lambda m: m["arrays"][0].update(dtype="float99"), r"arrays\[0\].dtype='float99' is not a dtype"),
])
def test_stored_state_metadata_with_missing_or_mistyped_fields(tmp_path, tiny, edit, message):
    from kvjax.persist import META_FILE, StateFileError, load_state, save_state

    model, _ = tiny
    save_state(str(tmp_path / "s"), model.init_state(1, 4))
    fn = tmp_path / "s" / META_FILE
    meta = json.loads(fn.read_text())
    edit(meta)
    fn.write_text(json.dumps(meta))
    with pytest.raises(StateFileError, match=message):
        load_state(str(tmp_path / "s"))


def test_dtypes_that_would_change_on_a_round_trip_are_refused(tmp_path, tiny):
    from kvjax.persist import save_state

    model, _ = tiny
    state = model.init_state(1, 4)
    layer = state.layers[0]
    bad = state.replace(layers=(layer.replace(k=np.zeros(layer.k.shape, np.float64)),) + state.layers[1:])
    with pytest.raises(TypeError, match=r"dtype float64: it would load as float32"):
        save_state(str(tmp_path / "s"), bad)
    assert not (tmp_path / "s").exists()

"""End-to-end launch runs on the tiny random model: outputs, resume, and bad configs."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np

import pytest

from kvjax.eval.experiment import ConfigError, run_experiment, validate

# One xdist worker runs this module, so the module-scoped finished run is computed once (scripts/test.sh uses
# --dist loadgroup), not once per worker.
pytestmark = pytest.mark.xdist_group("launch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(run_dir):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import tiny  # noqa: PLC0415

    c = tiny.get_config()
    c.run_dir = str(run_dir)
    return c


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    summary = run_experiment(_config(run_dir), progress=False)
    return run_dir, summary


def test_outputs_written(finished_run):
    run_dir, summary = finished_run
    for name in ("config.json", "results.jsonl", "summary.csv", "summary.json", "quality_vs_bytes.png", "report.md"):
        assert (run_dir / name).exists(), name
    report = open(run_dir / "report.md").read()
    assert "![quality vs KV bytes](quality_vs_bytes.png)" in report and "| passkey | 96 | snapkv[budget=48] |" in report
    rows = [json.loads(l) for l in open(run_dir / "results.jsonl")]
    # 3 variants x (2 passkey examples + 2 perplexity settings)
    assert len(rows) == 12
    labels = {r["label"] for r in rows}
    assert labels == {"full", "snapkv[budget=48]", "streaming_llm"}
    by = {(r["label"], r["task"]): r for r in rows}
    for setting in ("once", "stream"):
        full = by[("full", f"perplexity_{setting}")]
        assert full["kl_vs_full"] == 0.0 and full["compression_ratio"] == 1.0 and full["setting"] == setting
    snap = by[("snapkv[budget=48]", "passkey")]
    assert snap["kv_bytes_prefill"] < by[("full", "passkey")]["kv_bytes_prefill"]
    assert snap["compression_ratio"] > 1.5
    for r in rows:
        assert r["warm"] and r["kv_bytes_prefill"] > 0
        assert 0 < r["kv_valid_bytes_prefill"] <= r["kv_bytes_prefill"]
    tasks = {s["task"] for s in summary}
    assert tasks == {"passkey", "perplexity_once", "perplexity_stream"}
    assert all(s["speed_vs_full"] for s in summary)
    assert all("kv_valid_bytes" in s and "valid_ratio" in s for s in summary)


def test_perplexity_settings_like_for_like(finished_run):
    """Every method is scored in both settings: "once" (compressed once, the cache grows over the continuation,
    decode-time eviction off) and "stream" (token by token with each method's decode phase)."""
    run_dir, summary = finished_run
    rows = [json.loads(l) for l in open(run_dir / "results.jsonl")]
    by = {(r["label"], r["task"]): r for r in rows}
    m = by[("full", "perplexity_once")]["eval_tokens"]
    # the full cache is the same in both settings (one chunk vs token by token: same numbers up to float error)
    assert by[("full", "perplexity_once")]["perplexity"] == pytest.approx(
        by[("full", "perplexity_stream")]["perplexity"], rel=1e-3)
    # StreamingLLM (a decode-time method): fixed size when streaming, grown by the continuation when compressed once
    once, stream = by[("streaming_llm", "perplexity_once")], by[("streaming_llm", "perplexity_stream")]
    assert once["cache_grows"] and not stream["cache_grows"]
    assert stream["kv_valid_bytes_end"] == stream["kv_valid_bytes_prefill"]  # 4 + 28 tokens, before and after
    assert once["kv_valid_bytes_end"] > once["kv_valid_bytes_prefill"]
    # SnapKV (one-shot, no decode phase) grows in both settings and scores alike in both
    s_once, s_stream = by[("snapkv[budget=48]", "perplexity_once")], by[("snapkv[budget=48]", "perplexity_stream")]
    assert s_once["cache_grows"] and s_stream["cache_grows"]
    assert s_once["perplexity"] == pytest.approx(s_stream["perplexity"], rel=1e-3)
    # valid bytes: the full cache is charged for its prompt tokens only after prefill (the continuation's room is
    # allocated but empty), and grows by exactly m tokens' worth
    f = by[("full", "perplexity_once")]
    assert f["kv_valid_bytes_prefill"] < f["kv_bytes_prefill"] and f["kv_valid_bytes_end"] > f["kv_valid_bytes_prefill"]
    assert m == 32


def test_resume_skips_finished_cells(finished_run, tmp_path):
    run_dir = _copy_run(finished_run, tmp_path / "run")
    before = open(run_dir / "results.jsonl").read()
    with open(run_dir / "results.jsonl", "a") as f:
        f.write('{"torn": ')  # a crash in the middle of a write
    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):
        run_experiment(_config(run_dir), progress=False)
    after = open(run_dir / "results.jsonl").read()
    assert after.startswith(before) and after[len(before):].strip() == '{"torn":'


def _copy_run(finished_run, dest):
    shutil.copytree(finished_run[0], dest)
    return dest


def test_torn_last_line_then_resume_with_cells_left(finished_run, tmp_path):
    """A crash mid-row, then a resume that still has cells to run: the fragment stays one skippable line, the new
    row starts on its own line, and every cell is there exactly once (regression: the new row was glued on)."""
    run_dir = _copy_run(finished_run, tmp_path / "run")
    lines = open(run_dir / "results.jsonl").read().splitlines(keepends=True)
    lost = json.loads(lines[-1])
    with open(run_dir / "results.jsonl", "w") as f:
        f.write("".join(lines[:-1]) + lines[-1][:40])  # the last row torn: its cell is not done
    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):
        summary = run_experiment(_config(run_dir), progress=False)
    out = open(run_dir / "results.jsonl").read().splitlines()
    assert out[len(lines) - 1] == lines[-1][:40]  # the fragment, alone on its line
    rows = [json.loads(l) for l in out[len(lines):]]
    assert [r["cell_id"] for r in rows] == [lost["cell_id"]]  # exactly the torn cell re-ran, on a fresh line
    assert sum(s["n"] for s in summary) == len(lines)


def test_doubled_results_file_summarises_each_cell_once(finished_run, tmp_path):
    """Regression: two launches wrote every cell twice and the summary doubled the counts."""
    run_dir, summary = finished_run
    twice = tmp_path / "twice"
    twice.mkdir()
    text = open(run_dir / "results.jsonl").read()
    (twice / "results.jsonl").write_text(text + text)
    with pytest.warns(UserWarning, match="repeated row"):
        again = run_experiment(_config(twice), progress=False)
    assert [(s["label"], s["task"], s["n"]) for s in again] == [(s["label"], s["task"], s["n"]) for s in summary]
    assert (twice / "results.jsonl").read_text() == text + text  # nothing re-ran


def test_second_launch_into_owned_run_dir_is_refused(tmp_path):
    from kvjax.eval.rundir import RunDirLock

    with RunDirLock(str(tmp_path / "run")):
        with pytest.raises(ConfigError, match=f"is in use by pid {os.getpid()} on host {socket.gethostname()}"):
            run_experiment(_config(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_lock_names_live_owner_and_takes_over_from_killed_one(tmp_path):
    from kvjax.eval.rundir import RunDirError, RunDirLock

    code = ("import sys, time; from kvjax.eval.rundir import RunDirLock; RunDirLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"in use by pid {p.pid} on host"):
            RunDirLock(str(tmp_path)).acquire()
    finally:
        p.kill()  # SIGKILL: the owner never releases its lock
        p.wait()
    lock = RunDirLock(str(tmp_path)).acquire()
    try:
        assert f"pid {p.pid} " in lock.previous_owner
        assert json.load(open(tmp_path / ".lock"))["pid"] == os.getpid()
    finally:
        lock.release()
    with RunDirLock(str(tmp_path)) as again:  # a clean release leaves no previous owner behind
        assert again.previous_owner is None


def test_changed_config_runs_new_cells_beside_old_ones(finished_run, tmp_path):
    """Regression: a changed hyper-parameter reported "all done", kept the old results and overwrote config.json."""
    run_dir = _copy_run(finished_run, tmp_path / "run")
    old_config = json.load(open(run_dir / "config.json"))
    c = _config(run_dir)
    c.perplexity.enabled = False  # (keeps the test short: only the passkey cells of the new window run)
    c.methods.streaming_llm.window = 20  # same label "streaming_llm", another method
    summary = run_experiment(c, progress=False)
    rows = [json.loads(l) for l in open(run_dir / "results.jsonl")]
    new = rows[12:]
    assert len(new) == 2 and all("window=20" in r["method_desc"] for r in new)
    stream = [s for s in summary if s["label"] == "streaming_llm"]
    assert len(stream) == 1 and stream[0]["n"] == 2
    assert {s["task"] for s in summary} == {"passkey"} and all(s["n"] == 2 for s in summary)
    assert json.load(open(run_dir / "config.json"))["methods"]["streaming_llm"]["window"] == 20
    kept = [json.load(open(p)) for p in sorted((run_dir / "configs").iterdir())]
    assert old_config in kept and len(kept) == 2
    c.methods.streaming_llm.window = 28  # back to the first config: nothing to run, the old rows count again
    c.perplexity.enabled = True
    run_experiment(c, progress=False)
    assert len(open(run_dir / "results.jsonl").readlines()) == 14


def test_cell_identity_covers_model_dtype_and_every_hyper_parameter():
    from types import SimpleNamespace

    from kvjax.eval import experiment, rundir
    from kvjax.eval.harness import expand_methods

    ppl = {"corpus": "hamlet", "context_tokens": 8, "eval_tokens": 4, "n_segments": 1}
    seg = np.arange(12)[None]

    def cid(model="tiny-random", dtype="float32", fp="abc", window=8, seg=seg, mode="once", **ppl_over):
        v = expand_methods({"snapkv": {"budget": 32, "window": window}})[0]
        m = {"name": model, "dtype": dtype, "config_sha256": fp}
        return rundir.cell_id(experiment._identity(m, ("ppl", None, mode), v, ppl | ppl_over, seg))

    base = cid()
    others = [cid(model="x"), cid(dtype="bfloat16"), cid(fp="def"), cid(window=16), cid(seg=seg + 1),
              cid(mode="stream"), cid(eval_tokens=5)]
    assert base == cid() and base not in others and len(set(others)) == len(others)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.methods.update({"snapkvv": {}}), "unknown compression method 'snapkvv'; available: "),
    (lambda c: c.methods.snapkv.update({"bugdet": 3}), "no hyper-parameter\\(s\\) bugdet; valid: budget"),
    (lambda c: c.methods.snapkv.update({"budget": (500,)}), "budget 500 is larger than the context"),
    (lambda c: c.methods.snapkv.update({"kernel": 4}), "kernel must be odd"),
    (lambda c: c.tasks.update({"passkee": {"context_tokens": (64,)}}), "passkee"),
    (lambda c: c.model.update({"name": "/no/such/ckpt"}), "neither an embedded model"),
])
def test_bad_configs_fail_clearly(tmp_path, mutate, message):
    c = _config(tmp_path / "out")
    mutate(c)
    with pytest.raises(ConfigError, match=message):
        validate(c)
    assert not (tmp_path / "out").exists()


def test_cli_bad_key_and_bad_method_exit_nonzero(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    base = [sys.executable, "-m", "kvjax.launch", f"--config={ROOT}/configs/tiny.py",
            f"--config.run_dir={tmp_path}/out", "--noprogress"]
    r = subprocess.run(base + ["--config.no_such_key=1"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode != 0 and "no_such_key" in r.stderr
    r = subprocess.run(base + ["--config.methods.snapkv.window=0"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2 and "window must be > 0" in r.stderr
    assert not (tmp_path / "out").exists()


def test_report_renders_markdown(finished_run):
    from kvjax.eval.report import main, markdown_table

    run_dir, summary = finished_run
    table = markdown_table(summary)
    assert table.count("\n") == len(summary) + 1 and "| perplexity_once |" in table and "snapkv[budget=48]" in table
    assert "(cache grows)" in table  # the "once" setting and one-shot methods streaming let the cache grow
    from kvjax.eval.report import summary_from_markdown

    back = {(r["label"], r["task"]): r for r in summary_from_markdown(table)}
    for s in summary:  # allocated and valid bytes survive the markdown round trip (README figures re-plot from it)
        r = back[(s["label"], s["task"])]
        assert abs(r["kv_valid_bytes"] - s["kv_valid_bytes"]) < 0.01 * 2**20 and r["valid_ratio"] > 0
        assert r.get("cache_grows", False) == bool(s.get("cache_grows"))
    assert main([str(run_dir)]) == 0
    assert main([str(run_dir / "missing")]) == 2


def _launch_in_process(argv, capsys):
    """``python -m kvjax.launch ARGV`` in this process (absl flags parsed, then reset): (exit code, stdout, stderr)."""
    from absl import flags

    from kvjax import launch

    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["kvjax.launch", *argv])
        capsys.readouterr()
        rc = launch.main([])
    finally:
        flags.FLAGS.unparse_flags()
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_list_methods_tasks_and_dry_run(tmp_path, capsys):
    from kvjax.compress import available_methods

    rc, out, _ = _launch_in_process(["--list_methods"], capsys)
    assert rc == 0
    listed = [l.split()[0] for l in out.splitlines() if l and not l.startswith(" ")]
    assert listed == available_methods()
    assert '"SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469' in out
    assert "budget=1024, window=32, kernel=5, pooling='avgpool'" in out
    rc, out, _ = _launch_in_process(["--list_tasks"], capsys)
    assert rc == 0 and "niah_multikey" in out and "key_digits=5" in out
    bad = tmp_path / "bad.py"
    bad.write_text(f"import sys\nsys.path.insert(0, {ROOT + '/configs'!r})\nimport tiny\n\n\ndef get_config():\n"
                   "    c = tiny.get_config()\n    c.methods.snapkv.budget = (500,)\n    return c\n")
    rc, out, err = _launch_in_process(["--dry_run", f"--config={bad}"], capsys)
    assert rc == 2 and "budget 500 is larger than the context" in err
    # the real command line, once
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "kvjax.launch", "--dry_run", f"--config={ROOT}/configs/tiny.py",
                        f"--config.run_dir={tmp_path}/out", "--config.methods.snapkv.budget=(40,48)"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    # 4 variants x (2 passkey examples + 2 perplexity settings)
    assert "16 cells (0 already in results.jsonl, 16 to run) in 2 prompt shape(s)" in r.stdout
    assert "snapkv[budget=40]" in r.stdout and "estimated time: ~" in r.stdout
    assert not (tmp_path / "out").exists()


def test_plan_counts_finished_cells(finished_run):
    from kvjax.eval.plan import plan_experiment

    run_dir, _ = finished_run
    p = plan_experiment(_config(run_dir))
    assert (p.n_cells, p.n_done, p.shape_groups) == (12, 12, 2)
    assert ("streaming_llm", "passkey", 96, 2) in p.rows


def test_valid_nbytes_counts_only_valid_slots():
    import jax.numpy as jnp
    import numpy as np

    from kvjax.state import DenseKV, KVState, nbytes, valid_nbytes

    # one layer, B=1, 2 heads, 4 slots, head_dim 2, f32: head 0 holds 3 tokens, head 1 holds 1 (ragged, padded to 4)
    pos = jnp.asarray([[[0, 1, 2, -1], [5, -1, -1, -1]]], jnp.int32)
    layer = DenseKV(k=jnp.zeros((1, 2, 4, 2)), v=jnp.zeros((1, 2, 4, 2)), pos=pos, fill=jnp.asarray([[3, 1]], jnp.int32),
                    extras={"score": jnp.zeros((1, 2, 4)), "per_head": jnp.zeros((1, 2))})
    state = KVState(layers=(layer,), next_pos=jnp.zeros((1,), jnp.int32), rope_shift=jnp.zeros((1,), jnp.int32))
    slot_bytes = 4 * (2 + 2 + 1 + 1)  # k, v, pos, score per slot
    other = 4 * 2 + 4 * 2 + 4 + 4  # fill, per_head, next_pos, rope_shift
    assert nbytes(state) == 8 * slot_bytes + other
    assert valid_nbytes(state) == 4 * slot_bytes + other
    assert valid_nbytes(layer) == 4 * slot_bytes + 4 * 2 + 4 * 2
    assert np.all(np.asarray(layer.pos) == np.asarray(pos))  # untouched


def test_valid_nbytes_of_ragged_layer_excludes_decode_room():
    import jax.numpy as jnp

    from kvjax.state import RaggedKV, nbytes, valid_nbytes

    # B=1, 2 heads in one flat buffer of 6 slots: head 0 holds 2 tokens + 1 free, head 1 holds 1 token + 2 free
    pos = jnp.asarray([[0, 3, -1, 2, -1, -1]], jnp.int32)
    layer = RaggedKV(k=jnp.zeros((1, 6, 4)), v=jnp.zeros((1, 6, 4)), pos=pos,
                     offsets=jnp.asarray([[0, 3, 6]], jnp.int32), fill=jnp.asarray([[2, 1]], jnp.int32), max_len=3)
    per_slot = 4 * (4 + 4 + 1)
    assert nbytes(layer) == 6 * per_slot + 4 * 3 + 4 * 2
    assert valid_nbytes(layer) == 3 * per_slot + 4 * 3 + 4 * 2


@pytest.mark.parametrize("name,run_dir", [("eviction_shared", "runs/eviction-shared"),
                                          ("eviction_changed", "runs/eviction_changed"),
                                          ("eviction_window8", "runs/eviction-window8")])
def test_eviction_configs_take_the_model_as_argument(name, run_dir):
    """``--config=configs/<name>.py:gemma3-270m``: the same cells as SmolLM2's table, another model and run dir."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base, gemma = mod.get_config().to_dict(), mod.get_config("gemma3-270m").to_dict()
    assert (base["model"]["name"], base["run_dir"]) == ("smollm2-135m", run_dir)
    assert (gemma["model"]["name"], gemma["run_dir"]) == ("gemma3-270m", f"{run_dir}-gemma3-270m")
    for key in ("methods", "tasks", "perplexity", "prompt_style", "max_new_tokens"):
        assert gemma[key] == base[key]
    assert gemma["tasks"]["niah_single"]["depths"] == (0.2, 0.4, 0.6, 0.8)
    assert gemma["tasks"]["niah_single"]["seeds"] == (0, 1)
    validate(mod.get_config("gemma3-270m"))

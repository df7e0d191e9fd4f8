"""Experiments divided among JAX processes: two real processes (jax.distributed on localhost) produce the same merged
results as one process, and resume from the shards of an interrupted run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from kvjax.eval import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_share_is_a_partition():
    for n, count in [(0, 2), (1, 2), (7, 3), (8, 8)]:
        shares = [distributed.my_share(n, i, count) for i in range(count)]
        assert sorted(sum(shares, [])) == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_merge_shards_order_and_dedup(tmp_path):
    main = tmp_path / "results.jsonl"
    main.write_text(json.dumps({"key": "a", "v": 0}) + "\n" + '{"torn": ')
    (tmp_path / "results.p0-of-2.jsonl").write_text(json.dumps({"key": "c", "v": 1}) + "\n" +
                                                    json.dumps({"key": "a", "v": 9}) + "\n")
    (tmp_path / "results.p1-of-2.jsonl").write_text(json.dumps({"key": "b", "v": 2}) + "\n" + '{"key": "x"')
    assert distributed.merge_shards(str(tmp_path), ["a", "b", "c"]) == 2
    rows = distributed.read_jsonl(str(main))
    assert [(r["key"], r["v"]) for r in rows] == [("a", 0), ("b", 2), ("c", 1)]
    assert distributed.shard_files(str(tmp_path)) == []


def _launch(run_dir, cache, *extra):
    return [sys.executable, "-m", "kvjax.launch", "--config=configs/tiny_distributed.py",
            f"--config.run_dir={run_dir}", "--progress=false", f"--compile_cache={cache}", *extra]


def test_two_processes_equal_one(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    cache = tmp_path / "xla-cache"  # the 2 processes reuse the single run's compiled programs
    single, multi = tmp_path / "single", tmp_path / "multi"
    r = subprocess.run(_launch(single, cache), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = distributed.read_jsonl(str(single / "results.jsonl"))
    assert len(ref) == 4  # 2 prompts x (full, streaming_llm)

    # An interrupted earlier distributed run (3 processes) left one finished cell in its shard: it must be reused.
    multi.mkdir()
    seeded = dict(ref[1], seeded=True)
    (multi / "results.p2-of-3.jsonl").write_text(json.dumps(seeded) + "\n")

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(_launch(multi, cache, "--distributed", f"--coordinator=localhost:{port}",
                                      "--num_processes=2", f"--process_id={i}"),
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    got = distributed.read_jsonl(str(multi / "results.jsonl"))
    assert [r["key"] for r in got] == [r["key"] for r in ref]  # every cell once, in the single run's order
    assert got[1].get("seeded") and not any(r.get("seeded") for i, r in enumerate(got) if i != 1)
    for a, b in zip(got, ref):
        for k in ("prediction", "score", "kv_bytes_prefill", "kv_bytes_end", "compression_ratio", "prompt_tokens"):
            assert a[k] == b[k], (a["key"], k)
        assert abs(a["answer_logprob"] - b["answer_logprob"]) < 1e-4
    assert distributed.shard_files(str(multi)) == []
    for name in ("summary.csv", "summary.json", "quality_vs_bytes.png", "config.json"):
        assert (multi / name).exists(), name
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((multi / "summary.json").read_text())
    assert [(x["label"], x["task"], x.get("accuracy")) for x in s1] == [(x["label"], x["task"], x.get("accuracy"))
                                                                       for x in s2]

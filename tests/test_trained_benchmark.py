"""benchmarks/trained_compressors.py: the README tables are rebuilt from the per-cell JSON in display order, with
Wilson intervals that agree with kvjax.eval.scoring (no model is run here)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from kvjax.eval import scoring

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("trained_compressors",
                                               os.path.join(ROOT, "benchmarks", "trained_compressors.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _cells(scores, task="niah_single"):
    return [dict(task=task, score=float(s), answer_logprob=-1.0 - i, peak_prefill_bytes=2**20 * (i + 1),
                 peak_global_bytes=2**19, kv_bytes=2**20, global_kv_bytes=2**18, decode_tok_s=10.0 + i)
            for i, s in enumerate(scores)]


RESULTS = {  # in run order: the middle sparsity first, as the benchmark runs them
    "DuoAttention sparsity 0.5": dict(cells=_cells([1, 1, 0, 1]), perplexity=25.0),
    "full": dict(cells=_cells([1, 1, 1, 1]), perplexity=23.0),
    "StreamingLLM 16+64": dict(cells=_cells([0, 0, 0, 1]), perplexity=28.0),
    "DuoAttention sparsity 0.25": dict(cells=_cells([1, 1, 1, 1]), perplexity=24.0),
}


def test_rows_in_display_order_with_wilson_intervals():
    rows = bench.rows_from(RESULTS)
    assert [r["method"] for r in rows] == ["full", "StreamingLLM 16+64", "DuoAttention sparsity 0.25",
                                           "DuoAttention sparsity 0.5"]
    lo, hi = scoring.wilson_interval(3, 4)
    assert rows[3]["acc"] == rows[3]["acc_niah_single"] == f"3/4 [{lo:.2f}, {hi:.2f}]"
    assert rows[0]["acc"].startswith("4/4 [0.51, 1.00]")
    assert rows[0]["logp"] == "-2.50" and rows[0]["peak"] == "4.00 MiB" and rows[0]["tok_s"] == "11.5"


def test_render_rebuilds_the_table_from_the_json(tmp_path):
    args = {"kind": "duo", "model": "gemma3-270m", "ppl_tokens": 64, "ppl_context": 768}
    direct = bench.write_tables(str(tmp_path), "direct", "duo", RESULTS, True, args)
    path = tmp_path / "trained_duo_x.json"
    path.write_text(json.dumps({"args": args, "hybrid": True, "results": RESULTS}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "trained_compressors.py"), "duo",
                        "--render", str(path)], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "trained_duo_x.md").read_text()
    assert md == direct + "\n" == (tmp_path / "direct.md").read_text()
    header = md.splitlines()[0]
    assert "niah_single acc [95% Wilson]" in header and "global-layer KV after prefill" in header
    assert "perplexity (64 tok after 768)" in header
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

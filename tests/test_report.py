"""Report plots and tables: Pareto front, panels and y metrics, colours, markdown round trip, the figure itself."""
from __future__ import annotations

import os

import pytest

from kvjax.eval.report import (FAMILY_MARKERS, PALETTE, colour_map, markdown_table, panels_of, pareto_front,
                               plot_quality_vs_bytes, summary_from_markdown)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def row(label, method, task="passkey", n=1, kv=1e6, q=1.0, lp=-1.0):
    s = dict(label=label, method=method, task=task, context_tokens=1024, n=n, kv_bytes=kv, kv_bytes_full=8e6,
             compression_ratio=8e6 / kv, tok_s=10.0, speed_vs_full=1.0)
    if task == "perplexity":
        s.update(quality_name="perplexity", quality=q, kl_vs_full=lp, ci_low=None, ci_high=None)
    else:
        s.update(quality_name="accuracy", quality=q, ci_low=max(0.0, q - 0.3), ci_high=min(1.0, q + 0.3),
                 answer_logprob=lp)
    return s


def test_pareto_front():
    pts = [(1.0, -5.0), (2.0, -6.0), (2.0, -2.0), (4.0, -3.0), (8.0, -1.0), (0.5, -9.0)]
    assert pareto_front(pts) == [(0.5, -9.0), (1.0, -5.0), (2.0, -2.0), (8.0, -1.0)]
    # lower is better (KL): fewer bytes must buy a lower value to stay on the front
    assert pareto_front([(1.0, 0.5), (2.0, 0.7), (3.0, 0.1), (8.0, 0.0)], higher_is_better=False) == \
        [(1.0, 0.5), (3.0, 0.1), (8.0, 0.0)]


def test_panels_use_signal_metrics_and_accuracy_only_from_8_examples():
    few = [row("full", "full", n=2), row("snapkv[budget=128]", "snapkv", n=2),
           row("full", "full", task="perplexity", q=50.0, lp=0.0)]
    assert panels_of(few) == [("passkey", 1024, "answer_logprob"), ("perplexity", 1024, "kl_vs_full")]
    many = [row("full", "full", n=8), row("snapkv[budget=128]", "snapkv", n=8)]
    assert panels_of(many) == [("passkey", 1024, "answer_logprob"), ("passkey", 1024, "quality")]


def test_colours_unique_for_many_methods():
    labels = [f"m{i}" for i in range(len(PALETTE))] + ["full"]
    cm = colour_map(labels)
    assert cm["full"] == "black" and len({cm[l] for l in labels if l != "full"}) == len(PALETTE)
    assert len(set(PALETTE)) == len(PALETTE) >= 30 and len(set(FAMILY_MARKERS.values())) == len(FAMILY_MARKERS)


def test_markdown_round_trip_and_bad_rows():
    summary = [row("full", "full", kv=8 * 2**20), row("kivi[bits=2]", "kivi", q=0.0, lp=-6.03, kv=2**20),
               row("full", "full", task="perplexity", q=57.54, lp=0.0, kv=8 * 2**20)]
    back = summary_from_markdown(markdown_table(summary))
    assert [(s["label"], s["method"], s["task"], s["quality_name"]) for s in back] == \
        [(s["label"], s["method"], s["task"], s["quality_name"]) for s in summary]
    assert back[1]["answer_logprob"] == -6.03 and back[1]["kv_bytes"] == 2**20 and back[2]["kl_vs_full"] == 0.0
    assert summary_from_markdown(markdown_table(summary[1:2]).replace("kivi[", "low["),
                                 {"low": "kivi"})[0]["method"] == "kivi"
    with pytest.raises(ValueError, match="cannot parse report row"):
        summary_from_markdown(markdown_table(summary).replace("acc 0.00", "acc zero"))
    with pytest.raises(ValueError, match="no report table rows"):
        summary_from_markdown("nothing here")


def test_plot_stored_quickstart_results(tmp_path):
    """The README's figure from docs/results/quickstart-all-methods.md: 18 methods, 8 needle prompts each: an answer log-prob and an accuracy panel."""
    with open(os.path.join(ROOT, "docs/results/quickstart-all-methods.md")) as f:
        summary = summary_from_markdown(f.read())
    assert len({s["label"] for s in summary}) >= 18
    out = tmp_path / "q.png"
    panels = plot_quality_vs_bytes(summary, str(out))
    assert [p[2] for p in panels] == ["answer_logprob", "quality"]
    assert out.stat().st_size > 20_000 and not (tmp_path / "q.png.tmp.png").exists()


def _method_table():
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("method_table", os.path.join(ROOT, "scripts", "method_table.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _gen_row(label, depth, seed, score, alloc, glob=None):
    r = dict(label=label, task="niah_single", key=f"{label}|niah_single|1024|{depth}|{seed}", depth=depth + 0.013,
             score=score, answer_logprob=-1.0, kv_bytes_prefill=alloc, kv_bytes_full=8 * 2**20,
             kv_valid_bytes_prefill=alloc, kv_valid_bytes_full=8 * 2**20)
    if glob is not None:  # a hybrid model: the global layers alone
        r.update(kv_bytes_prefill_global=glob, kv_bytes_full_global=4 * 2**20, kv_valid_bytes_prefill_global=glob,
                 kv_valid_bytes_full_global=4 * 2**20)
    return r


def test_method_table_global_layer_bytes_and_depths():
    """scripts/method_table.py: Wilson cell, the global-layer columns only for rows that carry them (hybrid models),
    and the needles kept per requested depth (the cell key's, not the measured depth)."""
    mt = _method_table()
    rows = [_gen_row("full", d, s, 1.0, 8 * 2**20, 4 * 2**20) for d in (0.2, 0.8) for s in (0, 1)]
    rows += [_gen_row("snapkv", d, s, float(d == 0.8 and s == 0), 5 * 2**20, 1 * 2**20) for d in (0.2, 0.8)
             for s in (0, 1)]
    lines = mt.table(rows).splitlines()
    assert "global layers MiB allocated (ratio)" in lines[0]
    assert lines[3].split(" | ")[1:] == ["1/4 [0.05, 0.70]", "-1.00", "5.0 (1.60x)", "5.0 (1.60x)", "1.0 (4.00x)",
                                         "1.0 (4.00x) |"]
    plain = [{k: v for k, v in r.items() if not k.endswith("_global")} for r in rows]
    assert "global layers" not in mt.table(plain)
    assert mt.depth_table(rows).splitlines()[1:] == ["|---|---|---|", "| full | 2/2 | 2/2 |", "| snapkv | 0/2 | 1/2 |"]
    assert mt.depth_table(rows).splitlines()[0] == "| method | depth 0.2 | depth 0.8 |"

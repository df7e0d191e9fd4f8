"""One row per method variant of a run directory, the README's table format: needle (or passkey) accuracy with a 95%
Wilson interval, mean answer log-prob, perplexity per setting with its KL from the full cache, and the KV bytes
(allocated and valid, ratios to the full cache) after prefill on the task prompts.

Reads ``results.jsonl`` directly, so it also tabulates a run that was stopped before its summary was written (cells
of other configs in the same directory can be left out with ``--labels``).

    python scripts/method_table.py runs/eviction-shared > docs/results/eviction-shared.md
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from kvjax.eval.harness import is_ppl_task, read_results
from kvjax.eval.scoring import wilson_interval

MIB = 2**20


def rows_by_label(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """``{label: {task: [rows]}}`` in first-seen order; a cell run again (same ``key``: label, task, length, depth,
    seed; e.g. after the model's config fingerprint changed) counts once, its latest row."""
    latest = {r.get("key", id(r)): r for r in rows}
    out: dict[str, dict[str, list[dict]]] = {}
    for r in latest.values():
        out.setdefault(r["label"], {}).setdefault(r["task"], []).append(r)
    return out


def gen_cells(rs: list[dict]) -> tuple[str, str]:
    """``("k/n [lo, hi]", "mean answer log-p")`` of a task's cells."""
    k, n = int(sum(r["score"] for r in rs)), len(rs)
    lo, hi = wilson_interval(k, n)
    return f"{k}/{n} [{lo:.2f}, {hi:.2f}]", f"{np.mean([r['answer_logprob'] for r in rs]):.2f}"


def ppl_cell(rs: list[dict]) -> str:
    ppl = float(np.exp(np.mean([r["nll"] for r in rs])))
    kl = np.mean([r.get("kl_vs_full", 0.0) for r in rs])
    grows = " (grows)" if any(r.get("cache_grows") for r in rs) and rs[0].get("setting") == "stream" else ""
    return f"{ppl:.2f} ({kl:.3f}){grows}"


def bytes_cells(rs: list[dict]) -> tuple[str, str]:
    alloc = np.mean([r["kv_bytes_prefill"] for r in rs])
    full = np.mean([r["kv_bytes_full"] for r in rs])
    valid = np.mean([r["kv_valid_bytes_prefill"] for r in rs])
    vfull = np.mean([r["kv_valid_bytes_full"] for r in rs])
    return f"{alloc / MIB:.1f} ({full / alloc:.2f}x)", f"{valid / MIB:.1f} ({vfull / valid:.2f}x)"


def table(rows: list[dict], labels: list[str] | None = None) -> str:
    by = rows_by_label(rows)
    if labels:
        missing = [x for x in labels if x not in by]
        if missing:
            raise ValueError(f"labels not in the results: {', '.join(missing)} (have: {', '.join(by)})")
        by = {x: by[x] for x in labels}
    gen_tasks = sorted({t for ts in by.values() for t in ts if not is_ppl_task(t)})
    ppl_tasks = sorted({t for ts in by.values() for t in ts if is_ppl_task(t)})
    head = ["method"]
    for t in gen_tasks:
        head += [f"{t} acc [95% Wilson]", f"{t} answer log-p"]
    head += [f"{t.replace('perplexity_', 'ppl ')} (KL vs full)" for t in ppl_tasks]
    head += ["KV MiB allocated (ratio)", "KV MiB valid (ratio)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, ts in by.items():
        cells = [label]
        for t in gen_tasks:
            cells += list(gen_cells(ts[t])) if t in ts else ["-", "-"]
        cells += [ppl_cell(ts[t]) if t in ts else "-" for t in ppl_tasks]
        gen = [r for t in gen_tasks for r in ts.get(t, [])]
        cells += list(bytes_cells(gen)) if gen else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--labels", help="comma-separated method labels, in this order (default: all, as run)")
    a = p.parse_args(argv)
    path = os.path.join(a.run_dir, "results.jsonl")
    if not os.path.exists(path):
        print(f"error: no results.jsonl in {a.run_dir}", file=sys.stderr)
        return 2
    try:
        print(table(read_results(path), a.labels.split(",") if a.labels else None))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One row per method variant of a run directory, the README's table format: needle (or passkey) accuracy with a 95%
Wilson interval, mean answer log-prob, perplexity per setting with its KL from the full cache, and the KV bytes
(allocated and valid, ratios to the full cache) after prefill on the task prompts; for a model with sliding-window
layers (Gemma 3) also the bytes of its global-attention layers alone, the part the methods compress. ``--by_depth``
adds the needles kept per needle depth.

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


def bytes_cells(rs: list[dict], suffix: str = "") -> tuple[str, str]:
    """``("allocated MiB (ratio)", "valid MiB (ratio)")``; ``suffix="_global"``: the global-attention layers'."""
    alloc = np.mean([r[f"kv_bytes_prefill{suffix}"] for r in rs])
    full = np.mean([r[f"kv_bytes_full{suffix}"] for r in rs])
    valid = np.mean([r[f"kv_valid_bytes_prefill{suffix}"] for r in rs])
    vfull = np.mean([r[f"kv_valid_bytes_full{suffix}"] for r in rs])
    return f"{alloc / MIB:.1f} ({full / alloc:.2f}x)", f"{valid / MIB:.1f} ({vfull / valid:.2f}x)"


def has_global_bytes(rows: list[dict]) -> bool:
    """Whether the generation rows carry bytes of the global layers alone (models with sliding-window layers)."""
    gen = [r for r in rows if not is_ppl_task(r["task"])]
    return bool(gen) and all("kv_bytes_prefill_global" in r for r in gen)


def requested_depth(row: dict) -> float | None:
    """The needle depth the config asked for (the cell key's 4th field; ``row["depth"]`` is the measured one)."""
    parts = str(row.get("key", "")).split("|")
    try:
        return float(parts[3])
    except (IndexError, ValueError):
        return None


def depth_table(rows: list[dict], labels: list[str] | None = None) -> str:
    """Needles kept per method and needle depth (summed over seeds): where in the prompt a method loses them."""
    by = rows_by_label(rows)
    if labels:
        by = {x: by[x] for x in labels if x in by}
    gen = [r for ts in by.values() for t, rs in ts.items() if not is_ppl_task(t) for r in rs]
    depths = sorted({requested_depth(r) for r in gen} - {None})
    lines = ["| method | " + " | ".join(f"depth {d:g}" for d in depths) + " |", "|" + "---|" * (len(depths) + 1)]
    for label, ts in by.items():
        rs = [r for t, x in ts.items() if not is_ppl_task(t) for r in x]
        cells = []
        for d in depths:
            at = [r for r in rs if requested_depth(r) == d]
            cells.append(f"{int(sum(r['score'] for r in at))}/{len(at)}" if at else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    glob = has_global_bytes(rows)
    if glob:
        head += ["global layers MiB allocated (ratio)", "global layers MiB valid (ratio)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, ts in by.items():
        cells = [label]
        for t in gen_tasks:
            cells += list(gen_cells(ts[t])) if t in ts else ["-", "-"]
        cells += [ppl_cell(ts[t]) if t in ts else "-" for t in ppl_tasks]
        gen = [r for t in gen_tasks for r in ts.get(t, [])]
        cells += list(bytes_cells(gen)) if gen else ["-", "-"]
        if glob:
            cells += list(bytes_cells(gen, "_global")) if gen else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--labels", help="comma-separated method labels, in this order (default: all, as run)")
    p.add_argument("--by_depth", action="store_true", help="also a table of needles kept per method and depth")
    a = p.parse_args(argv)
    path = os.path.join(a.run_dir, "results.jsonl")
    if not os.path.exists(path):
        print(f"error: no results.jsonl in {a.run_dir}", file=sys.stderr)
        return 2
    try:
        rows, labels = read_results(path), a.labels.split(",") if a.labels else None
        print(table(rows, labels))
        if a.by_depth:
            print("\n" + depth_table(rows, labels))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Markdown tables from a run directory: ``python -m kvjax.eval.report runs/quickstart [runs/other ...]``.

One row per (method variant, task, context length) from ``summary.json``: quality (accuracy with its 95% interval,
or perplexity with the KL divergence from the full cache), teacher-forced answer log-probability, KV bytes after
prefill, compression ratio against the full cache of the same prompts, decode tokens/s and its ratio to the full
cache measured in the same run.
"""
from __future__ import annotations

import json
import os
import sys


def markdown_table(summary: list[dict]) -> str:
    lines = ["| task | ctx | method | quality | answer log-p / KL | KV MiB | ratio | tok/s | speed vs full |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        if s["quality_name"] == "accuracy":
            q = f"acc {s['quality']:.2f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}] (n={s['n']})"
            extra = f"{s['answer_logprob']:.2f}"
        else:
            q = f"ppl {s['quality']:.2f}"
            extra = f"KL {s.get('kl_vs_full', 0.0):.4f}"
        vs = f"{s['speed_vs_full']:.2f}x" if s.get("speed_vs_full") else "-"
        lines.append(f"| {s['task']} | {s['context_tokens']} | {s['label']} | {q} | {extra} | "
                     f"{s['kv_bytes'] / 2**20:.2f} | {s['compression_ratio']:.2f}x | {s['tok_s']:.1f} | {vs} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for run_dir in argv:
        path = os.path.join(run_dir, "summary.json")
        if not os.path.exists(path):
            print(f"error: no summary.json in {run_dir}", file=sys.stderr)
            return 2
        with open(path) as f:
            summary = json.load(f)
        print(f"### {run_dir}\n")
        print(markdown_table(summary))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Reports of a run directory: markdown tables, quality-vs-bytes plots and ``report.md``.

``python -m kvjax.launch`` writes ``report.md`` (tables per task with the plots embedded) and the plots into every run
directory. From the command line:

* ``python -m kvjax.eval.report RUN_DIR [RUN_DIR ...]`` prints the markdown tables of runs (from ``summary.json``);
* ``python -m kvjax.eval.report --write RUN_DIR`` (re)writes ``report.md`` and the plots of a run;
* ``python -m kvjax.eval.report --from_markdown docs/results/quickstart.md --plot out.png`` re-draws the plot from a
  markdown table this module wrote (how the README's figures are made from the stored results, without re-running).

Tables: one row per (method variant, task, context length): quality (accuracy with its 95% Wilson interval, or
perplexity with the KL divergence from the full cache, marked "cache grows" when the method's cache was not held at a
fixed size over the scored continuation), teacher-forced answer log-probability, KV bytes the state allocates after
prefill and the compression ratio against the full cache of the same prompts, the bytes of its valid entries (no
padding of ragged heads, no free room) and that ratio, decode tokens/s and its ratio to the full cache.

Plots (:func:`plot_quality_vs_bytes`): one panel per (task, context length, y metric), KV bytes on a log x axis; one
marker shape per method family (:func:`kvjax.compress.base.method_family`), one colour per method variant (never
repeated within a figure), a legend that maps one-to-one, the Pareto front (fewest bytes for the best quality) drawn,
and the full cache marked with a star and a dashed line. The y axes carry signal at small example counts: the
teacher-forced answer log-probability for generation tasks, the KL divergence from the full cache for perplexity
runs; accuracy (with Wilson intervals) is plotted only when every point rests on at least :data:`MIN_N_ACCURACY`
examples.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any

MIN_N_ACCURACY = 8  # accuracy panels only when every point has at least this many examples
FAMILY_MARKERS = {  # one marker shape per family (kvjax.compress.base.FAMILIES), in legend order
    "eviction": "o", "decode-time eviction": "s", "merging": "D", "quantization": "^", "composed": "P", "other": "X",
}
# Distinct colours: matplotlib's tab10, then Kelly's maximum-contrast set (without white, black and near-duplicates
# of tab10), then tab20's light shades: 34 colours, so a figure repeats a colour only beyond 34 method variants (and
# then the (colour, marker) pair still differs unless the family matches too).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#f3c300", "#875692", "#a1caf1", "#be0032", "#c2b280", "#008856", "#e68fac", "#0067a5",
           "#f99379", "#604e97", "#f6a600", "#b3446c", "#dcd300", "#882d17", "#8db600", "#654522", "#e25822",
           "#2b3d26", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94")
Y_METRICS = {  # key in a summary row -> (axis label, higher is better)
    "answer_logprob": ("answer log-prob (teacher-forced, higher is better)", True),
    "kl_vs_full": ("KL from the full cache (nats/token, lower is better)", False),
    "quality": ("accuracy (95% Wilson interval)", True),
}


# ----------------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------------
def markdown_table(summary: list[dict]) -> str:
    lines = ["| task | ctx | method | quality | answer log-p / KL | KV MiB allocated | ratio | KV MiB valid | valid ratio "
             "| tok/s | speed vs full |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        if s["quality_name"] == "accuracy":
            q = f"acc {s['quality']:.2f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}] (n={s['n']})"
            extra = f"{s['answer_logprob']:.2f}"
        else:
            q = f"ppl {s['quality']:.2f}" + (" (cache grows)" if s.get("cache_grows") else "")
            extra = f"KL {s.get('kl_vs_full', 0.0):.4f}"
        vs = f"{s['speed_vs_full']:.2f}x" if s.get("speed_vs_full") else "-"
        vb = f"{s['kv_valid_bytes'] / 2**20:.2f}" if "kv_valid_bytes" in s else "-"
        vr = f"{s['valid_ratio']:.2f}x" if "valid_ratio" in s else "-"
        lines.append(f"| {s['task']} | {s['context_tokens']} | {s['label']} | {q} | {extra} | "
                     f"{s['kv_bytes'] / 2**20:.2f} | {s['compression_ratio']:.2f}x | {vb} | {vr} | {s['tok_s']:.1f} | {vs} |")
    return "\n".join(lines)


_ACC = re.compile(r"acc ([\d.]+) \[([\d.]+), ([\d.]+)\] \(n=(\d+)\)")


def summary_from_markdown(text: str, aliases: dict[str, str] | None = None) -> list[dict]:
    """Summary rows back from the tables :func:`markdown_table` wrote (e.g. ``docs/results/*.md``), for re-plotting
    stored results. A row's method is its label without the sweep suffix, or ``aliases[that]`` (config keys that name
    another method, e.g. ``{"window_only": "streaming_llm"}``). A malformed row raises ``ValueError`` naming it."""
    aliases = aliases or {}
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) not in (9, 11) or cells[0] in ("task", "") or set(cells[0]) <= {"-"}:
            continue
        valid = None
        if len(cells) == 11:  # tables with allocated and valid bytes
            task, ctx, label, quality, extra, mib, ratio, vmib, vratio, tok_s, vs = cells
            valid = (vmib, vratio)
        else:
            task, ctx, label, quality, extra, mib, ratio, tok_s, vs = cells
        try:
            s: dict[str, Any] = dict(task=task, context_tokens=int(ctx), label=label,
                                     method=aliases.get(label.split("[")[0], label.split("[")[0]),
                                     kv_bytes=float(mib) * 2**20, compression_ratio=float(ratio.rstrip("x")),
                                     tok_s=float(tok_s), speed_vs_full=None if vs == "-" else float(vs.rstrip("x")))
            if valid is not None and valid[0] != "-":
                s.update(kv_valid_bytes=float(valid[0]) * 2**20, valid_ratio=float(valid[1].rstrip("x")))
            if quality.endswith(" (cache grows)"):
                quality = quality[:-len(" (cache grows)")]
                s["cache_grows"] = True
            m = _ACC.fullmatch(quality)
            if m:
                s.update(quality_name="accuracy", quality=float(m[1]), ci_low=float(m[2]), ci_high=float(m[3]),
                         n=int(m[4]), answer_logprob=float(extra))
            elif quality.startswith("ppl ") and extra.startswith("KL "):
                s.update(quality_name="perplexity", quality=float(quality[4:]), kl_vs_full=float(extra[3:]), n=1,
                         ci_low=None, ci_high=None)
            else:
                raise ValueError("quality column")
        except ValueError as e:
            raise ValueError(f"cannot parse report row {line.strip()!r} ({e})") from None
        out.append(s)
    if not out:
        raise ValueError("no report table rows found (expected the columns markdown_table writes)")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------------
def family_of(row: dict) -> str:
    """The family of a summary row's method (``"full"`` for the full cache; ``"other"`` for unknown names)."""
    from kvjax.compress.base import _REGISTRY, _import_all, method_family

    _import_all()
    name = row["method"]
    if name == "chain":
        return "composed"
    cls = _REGISTRY.get(name)
    return method_family(cls) if cls is not None else "other"


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (fewer bytes ``x`` and better ``y``), sorted by ``x``."""
    sign = 1.0 if higher_is_better else -1.0
    front: list[tuple[float, float]] = []
    best = -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if sign * y > best:
            front.append((x, y))
            best = sign * y
    return front


def panels_of(summary: list[dict]) -> list[tuple[str, int, str]]:
    """(task, context length, y metric) of every panel :func:`plot_quality_vs_bytes` draws for ``summary``."""
    out = []
    for task, ctx in sorted({(s["task"], s["context_tokens"]) for s in summary}):
        pts = [s for s in summary if s["task"] == task and s["context_tokens"] == ctx]
        if pts[0]["quality_name"] == "perplexity":
            out.append((task, ctx, "kl_vs_full"))
            continue
        if all("answer_logprob" in s for s in pts):
            out.append((task, ctx, "answer_logprob"))
        if min(s["n"] for s in pts) >= MIN_N_ACCURACY:
            out.append((task, ctx, "quality"))
    return out


def colour_map(labels: list[str]) -> dict[str, str]:
    """One palette colour per label, in the given order (``full`` is black); colours repeat only beyond
    ``len(PALETTE)`` labels."""
    others = [l for l in dict.fromkeys(labels) if l != "full"]
    return {l: PALETTE[i % len(PALETTE)] for i, l in enumerate(others)} | {"full": "black"}


def plot_quality_vs_bytes(summary: list[dict], path: str, title: str | None = None) -> list[tuple[str, int, str]]:
    """Draws every panel of :func:`panels_of` into one figure at ``path``; returns the panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    panels = panels_of(summary)
    if not panels:
        raise ValueError("nothing to plot: the summary has no rows")
    families = {s["label"]: ("full" if s["method"] == "full" else family_of(s)) for s in summary}
    order = list(FAMILY_MARKERS)
    labels = sorted({s["label"] for s in summary if s["method"] != "full"},
                    key=lambda l: (order.index(families[l]) if families[l] in order else len(order), l))
    colours = colour_map(labels)  # in legend order: neighbours in the legend get the most distinct colours
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols + 3.2, 3.8 * nrows), squeeze=False)
    for ax, (task, ctx, key) in zip(axes.flat, panels):
        ylabel, higher = Y_METRICS[key]
        pts = [s for s in summary if s["task"] == task and s["context_tokens"] == ctx and s.get(key) is not None]
        for s in pts:
            x, y = s["kv_bytes"] / 2**20, s[key]
            if s["method"] == "full":
                ax.axhline(y, color="black", ls="--", lw=0.8, alpha=0.6)
                ax.plot([x], [y], marker="*", ms=15, color="black", ls="none", zorder=4)
                ax.annotate("full cache", (x, y), xytext=(-4, 6), textcoords="offset points", ha="right", fontsize=7)
                continue
            if key == "quality" and s.get("ci_low") is not None:
                ax.errorbar([x], [y], yerr=[[y - s["ci_low"]], [s["ci_high"] - y]], color=colours[s["label"]],
                            lw=0.8, capsize=2, zorder=2)
            ax.plot([x], [y], marker=FAMILY_MARKERS.get(families[s["label"]], "X"), ms=7, ls="none",
                    color=colours[s["label"]], markeredgecolor="white", markeredgewidth=0.5, zorder=3)
        front = pareto_front([(s["kv_bytes"] / 2**20, s[key]) for s in pts], higher)
        if len(front) > 1:
            fx, fy = zip(*front)
            ax.step(fx, fy, where="post", color="0.35", lw=1.0, alpha=0.7, zorder=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("KV cache after prefill (MiB, log scale)")
        ax.set_ylabel(ylabel, fontsize=8)
        n = min(s["n"] for s in pts) if pts else 0
        ax.set_title(f"{task} @ {ctx} tokens (n={n} per point)", fontsize=9)
        ax.grid(alpha=0.3, which="both", lw=0.5)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    # One legend for the figure: every method variant once (colour + family marker), grouped by family.
    handles = [Line2D([], [], marker="*", ms=12, color="black", ls="--", lw=0.8, label="full cache")]
    handles += [Line2D([], [], marker=FAMILY_MARKERS.get(families[l], "X"), ms=7, ls="none", color=colours[l],
                       label=f"{l}  ({families[l]})") for l in labels]
    handles += [Line2D([], [], color="0.35", lw=1.0, label="Pareto front")]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False,
               title="method (family)", title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return panels


# ----------------------------------------------------------------------------------------------------------------------
# report.md
# ----------------------------------------------------------------------------------------------------------------------
PLOT_NAME = "quality_vs_bytes.png"


def render_report(summary: list[dict], config: dict | None = None, plot: str | None = PLOT_NAME,
                  title: str = "kvjax run") -> str:
    """The markdown of ``report.md``: what ran, the plot, and one table per task."""
    lines = [f"# {title}", ""]
    if config:
        model = config.get("model", {})
        lines += [f"Model: `{model.get('name')}` ({model.get('dtype', 'float32')}); methods: "
                  f"{', '.join(f'`{m}`' for m in config.get('methods', {}))}; run directory `{config.get('run_dir')}`.",
                  ""]
    lines += ["Quality against KV bytes after prefill (log x); one marker shape per family, one colour per method "
              "variant, the grey step line is the Pareto front, the star and dashed line the full cache. Answer "
              "log-prob is the teacher-forced log-probability of the reference answer; KL is measured against the "
              "full cache on the perplexity text.", ""]
    if plot:
        lines += [f"![quality vs KV bytes]({plot})", ""]
    for task in sorted({s["task"] for s in summary}):
        lines += [f"## {task}", "", markdown_table([s for s in summary if s["task"] == task]), ""]
    lines += ["Accuracy intervals are 95% Wilson intervals over the n examples of a row; speeds are decode tokens/s "
              "with every program compiled before its timed call.", ""]
    return "\n".join(lines)


def write_report(run_dir: str, summary: list[dict], config: dict | None = None) -> str:
    """Writes the plot and ``report.md`` into ``run_dir`` (atomically); returns the report's path."""
    if config is None and os.path.exists(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    plot = None
    if summary:
        plot_quality_vs_bytes(summary, os.path.join(run_dir, PLOT_NAME))
        plot = PLOT_NAME
    path = os.path.join(run_dir, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write(render_report(summary, config, plot, title=f"kvjax run: {os.path.basename(os.path.normpath(run_dir))}"))
    os.replace(path + ".tmp", path)
    return path


def _load_summary(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no summary.json in {run_dir}")
    with open(path) as f:
        return json.load(f)


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m kvjax.eval.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="*", help="run directories (with summary.json)")
    p.add_argument("--write", action="store_true", help="(re)write report.md and the plot into each run directory")
    p.add_argument("--from_markdown", help="a markdown table written by this module, instead of run directories")
    p.add_argument("--plot", help="write the quality-vs-bytes figure of --from_markdown to this PNG")
    p.add_argument("--title", help="figure title (with --plot)")
    p.add_argument("--alias", action="append", default=[], metavar="KEY=METHOD",
                   help="with --from_markdown: a config key that names another method (window_only=streaming_llm)")
    a = p.parse_args(argv)
    try:
        if a.from_markdown:
            with open(a.from_markdown) as f:
                summary = summary_from_markdown(f.read(), dict(kv.split("=", 1) for kv in a.alias))
            if not a.plot:
                p.error("--from_markdown needs --plot OUT.png")
            plot_quality_vs_bytes(summary, a.plot, a.title)
            print(f"wrote {a.plot}")
            return 0
        if not a.run_dirs:
            p.error("give run directories or --from_markdown")
        for run_dir in a.run_dirs:
            summary = _load_summary(run_dir)
            if a.write:
                print(f"wrote {write_report(run_dir, summary)}")
                continue
            print(f"### {run_dir}\n")
            print(markdown_table(summary))
            print()
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

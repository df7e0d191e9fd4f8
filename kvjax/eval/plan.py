"""What can run and what a config will run, without loading a model: ``python -m kvjax.launch --list_methods``,
``--list_tasks`` and ``--dry_run``.

* :func:`method_catalog`: every registered compression method with its family, hyper-parameters and defaults, and the
  paper it implements (title and arXiv id, read from the method's module docstring).
* :func:`task_catalog`: every task generator with its options and defaults.
* :func:`plan_experiment`: the cells a config runs (method variant x task x context length x depth x seed, plus the
  perplexity cell), how many are already in the run directory, and a rough time estimate.

The time estimate is a cost model calibrated on measured runs on this project's 2-core CPU (the quickstart: 18
variants x 3 cells in 8 min 33 s with a cold compilation cache): compiling a method variant's programs for one prompt
shape costs ~12 s there and dominates, a cell runs in ~1.5 s per 1K tokens, scaled by the model's size. GPUs and TPUs
compile and run faster; a warm compilation cache skips most of the compile term. Treat it as an order of magnitude.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import re
import sys
from typing import Any

# Cost model (seconds, 2-core CPU, SmolLM2-135M f32): per (variant, prompt shape) compilation, per cell at 1K tokens,
# per prefill at 1K tokens, and model loading. MODEL_SCALE multiplies the run-time terms for other models.
COMPILE_S, CELL_S_PER_1K, PREFILL_S_PER_1K, LOAD_S = 12.0, 1.5, 3.0, 10.0
MODEL_SCALE = {"smollm2-135m": 1.0, "gemma3-270m": 2.0, "tiny-random": 0.05}
COMPILE_SCALE = {"tiny-random": 0.15}


def _paper(cls) -> str:
    """"Title", arXiv id from the first paragraph of the method's module (or class) docstring."""
    doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
    if cls.__module__ in ("__main__", "kvjax.compress.base") or not doc:
        doc = inspect.getdoc(cls) or ""
    para = " ".join(doc.split("\n\n")[0].split())
    title = re.search(r'"([^"]+)"', para)
    arxiv = re.search(r"arXiv[: ]+(\d{4}\.\d{4,5})", para)
    if title or arxiv:
        return ", ".join(x for x in (f'"{title[1]}"' if title else "", f"arXiv {arxiv[1]}" if arxiv else "") if x)
    first = (inspect.getdoc(cls) or "").split("\n")[0]
    return first or "-"


def method_catalog() -> list[dict[str, Any]]:
    """One dict per registered method: name, family, kind, hyper-parameters {name: default or "required"}, paper."""
    from kvjax.compress.base import _REGISTRY, _import_all, method_family

    _import_all()
    out = []
    for name in sorted(_REGISTRY):
        cls = _REGISTRY[name]
        hp = {}
        for f in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
            if f.default is not dataclasses.MISSING:
                hp[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                hp[f.name] = f.default_factory()  # type: ignore[misc]
            else:
                hp[f.name] = "required"
        out.append(dict(name=name, family=method_family(cls), kind=cls.kind, hparams=hp, paper=_paper(cls)))
    return out


def task_catalog() -> list[dict[str, Any]]:
    """One dict per task generator: name, options {name: default}, description (docstring's first line)."""
    from kvjax.eval.tasks import TASKS

    out = []
    for name, gen in TASKS.items():
        sig = inspect.signature(gen)
        opts = {p.name: p.default for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}
        first = " ".join((inspect.getdoc(gen) or "").split("\n\n")[0].split())
        out.append(dict(name=name, options=opts, doc=first))
    return out


def format_methods(catalog: list[dict]) -> str:
    lines = []
    for m in catalog:
        hp = ", ".join(f"{k}={v!r}" for k, v in m["hparams"].items()) or "(none)"
        lines.append(f"{m['name']}  [{m['family']}]\n    paper: {m['paper']}\n    hyper-parameters: {hp}")
    return "\n".join(lines)


def format_tasks(catalog: list[dict]) -> str:
    lines = []
    for t in catalog:
        opts = ", ".join(f"{k}={v!r}" for k, v in t["options"].items())
        lines.append(f"{t['name']}\n    {t['doc']}\n    options (config tasks.<name>.kwargs): {opts}")
    lines.append("perplexity (config.perplexity, not a task): corpus, context_tokens, eval_tokens, n_segments, "
                 "mode=chunk|stream")
    return "\n".join(lines)


@dataclasses.dataclass
class Plan:
    """The cells of an experiment: rows of (variant label, task, context tokens, cells), totals and estimates."""

    rows: list[tuple[str, str, int, int]]
    n_cells: int
    n_done: int
    shape_groups: int
    est_seconds: float
    model: str
    run_dir: str

    def format(self) -> str:
        head = f"{'method variant':<36}{'task':<18}{'ctx':>7}{'cells':>7}"
        lines = [f"model {self.model}; run directory {self.run_dir}", "", head, "-" * len(head)]
        lines += [f"{label[:35]:<36}{task:<18}{ctx:>7}{n:>7}" for label, task, ctx, n in self.rows]
        todo = self.n_cells - self.n_done
        lines += ["", f"{self.n_cells} cells ({self.n_done} already in results.jsonl, {todo} to run) in "
                      f"{self.shape_groups} prompt shape(s)",
                  f"estimated time: ~{_fmt_s(self.est_seconds)} on a 2-core CPU with a cold compilation cache "
                  "(rough; see kvjax.eval.plan)"]
        return "\n".join(lines)


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def plan_experiment(config) -> Plan:
    """The cells ``config`` will run (validated first, as the run would be; nothing is loaded or written)."""
    from kvjax.eval import harness
    from kvjax.eval.experiment import _to_dict, validate

    variants, tasks = validate(config)
    c = _to_dict(config)
    units: list[tuple[str, int, int]] = []  # (task, context tokens, examples)
    ppl = c.get("perplexity", {})
    if ppl.get("enabled"):
        from kvjax.eval.experiment import ppl_modes

        units += [(harness.ppl_task_name(m), int(ppl["context_tokens"]), 1) for m in ppl_modes(ppl)]
    for tname, spec in tasks.items():
        per_len = len(spec.get("depths", [0.5])) * len(spec.get("seeds", [0]))
        units += [(tname, int(n), per_len) for n in spec["context_tokens"]]
    rows = [(v.label, t, n, k) for v in variants for t, n, k in units]
    n_cells = sum(r[3] for r in rows)
    # Cells done with the same method and hyper-parameters (the run itself also matches model, prompts and settings
    # exactly, by cell identity: see kvjax.eval.rundir; this count does not load the tokenizer, so it is an estimate).
    same = {(v.label, v.method.describe()) for v in variants}
    done = {r.get("key") for r in harness.read_results(os.path.join(c["run_dir"], "results.jsonl"))
            if (r.get("label"), r.get("method_desc")) in same}
    n_done = min(len(done), n_cells)
    # Prompts of one context length share a shape (padded); the perplexity batch is its own shape.
    shapes: dict[tuple, tuple[int, int]] = {}  # shape -> (tokens, examples)
    for t, n, k in units:
        key = ("ppl",) if harness.is_ppl_task(t) else ("gen", n)
        tok = n + (int(ppl["eval_tokens"]) if harness.is_ppl_task(t) else 0)
        shapes[key] = (tok, shapes.get(key, (tok, 0))[1] + k)
    model = c["model"]["name"]
    scale = MODEL_SCALE.get(model, 1.0)
    cscale = COMPILE_SCALE.get(model, 1.0)
    frac_todo = 1.0 - n_done / max(n_cells, 1)
    est = LOAD_S * scale
    for tok, k in shapes.values():
        est += frac_todo * (k * PREFILL_S_PER_1K * tok / 1024 * scale
                            + len(variants) * (COMPILE_S * cscale + k * CELL_S_PER_1K * tok / 1024 * scale))
    return Plan(rows, n_cells, n_done, len(shapes), est, model, c["run_dir"])

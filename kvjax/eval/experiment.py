"""Runs a whole experiment from an ml_collections config (see ``configs/quickstart.py`` for every field).

Everything is validated before any cell runs: unknown methods, hyper-parameters, tasks, budgets larger than the
context and missing checkpoints fail with one clear message, and nothing is written to the run directory.

The run directory (see :mod:`kvjax.eval.rundir`) is owned by one launch at a time (a second one fails with a message
naming the first). Each cell is identified by everything that determines its result (model, dtype, its config's
fingerprint, the method with all hyper-parameters, the exact prompt and answer, decoding and perplexity settings), so a
rerun reuses exactly the cells it would compute again. Rerunning a directory with a *changed* config runs the new
config's cells beside the old ones, which stay in ``results.jsonl``: ``config.json`` is the config of the latest
launch, every config ever run there is kept as ``configs/<id>.json`` (the change is printed), and ``summary.*`` cover
the latest config's cells only, never a mix.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from kvjax.eval import distributed, harness, rundir
from kvjax.eval.tasks import get_task, sweep


class ConfigError(ValueError):
    """The experiment config is invalid (the message names the bad value and the valid choices)."""


@dataclasses.dataclass
class TaskGroup:
    task: str
    context_tokens: int
    prepared: list[harness.Prepared]
    max_new_tokens: int


def _to_dict(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def validate(config) -> tuple[list[harness.Variant], dict]:
    """Checks the config without loading the model; returns the method variants and the task specs."""
    from kvjax.pretrained import EMBEDDED

    from kvjax.eval.checks import check_experiment  # noqa: PLC0415

    c = _to_dict(config)
    check_experiment(c)  # typed fields: counts, lengths, depths, sweeps (one line naming the field)
    name = c["model"]["name"]
    if name not in EMBEDDED and not os.path.exists(name):
        raise ConfigError(f"model.name={name!r} is neither an embedded model ({', '.join(EMBEDDED)}) nor an existing "
                          "checkpoint path")
    if c["model"].get("dtype", "float32") not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype={c['model']['dtype']!r}: choose float32 or bfloat16")
    try:
        variants = harness.expand_methods(c["methods"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not variants:
        raise ConfigError("config.methods is empty")
    tasks = c.get("tasks", {})
    lengths: list[int] = []
    for tname, spec in tasks.items():
        try:
            get_task(spec.get("task", tname))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        unknown = set(spec) - {"task", "context_tokens", "depths", "seeds", "kwargs", "max_new_tokens"}
        if unknown:
            raise ConfigError(f"tasks.{tname} has unknown keys {sorted(unknown)}; valid: task, context_tokens, depths, "
                              "seeds, kwargs, max_new_tokens")
        lengths += list(spec["context_tokens"])
    ppl = c.get("perplexity", {})
    if ppl.get("enabled"):
        bad = [m for m in ppl_modes(ppl) if m not in harness.PPL_MODES]
        if bad or not ppl_modes(ppl):
            raise ConfigError(f"perplexity.mode={ppl.get('mode')!r}: choose one or more of "
                              f"{', '.join(harness.PPL_MODES)} (once = compress once then grow, stream = token by "
                              "token with each method's decode phase)")
        lengths.append(int(ppl["context_tokens"]))
    for v in variants:
        b = harness.method_budget(v.method)
        for n in lengths:
            if b is not None and b > n:
                raise ConfigError(f"method {v.label}: budget {b} is larger than the context ({n} tokens); "
                                  f"use a budget <= {n}")
    if not tasks and not ppl.get("enabled"):
        raise ConfigError("nothing to run: config.tasks is empty and perplexity is disabled")
    validate_mesh_config(c, variants, tasks)
    return variants, tasks


def validate_mesh_config(c: dict, variants, tasks) -> None:
    """``config.mesh`` (e.g. ``"model:2,sequence:4"``): parsed, checked against the local devices, the methods (a
    sequence axis needs dense caches) and the perplexity batch (``n_segments`` over ``data``), all before the model is
    loaded. Generation cells hold one prompt each: with ``data:n`` they are dealt to the ``n`` data-parallel groups
    (see :func:`_run`). The model's heads are checked once it is loaded."""
    from kvjax import sharding

    try:
        spec = sharding.parse_mesh(c.get("mesh") or "")
        if spec is None:
            return
        if spec.sequence > 1:
            for v in variants:
                if not v.is_full:
                    sharding.check_sequence_method(v.method)
        ppl = c.get("perplexity", {})
        if ppl.get("enabled"):
            sharding.validate_mesh(spec, batch=int(ppl["n_segments"]))
        if spec.size > jax.local_device_count():
            sharding.make_mesh(spec)  # raises the one-line error naming the device count
    except sharding.ShardingError as e:
        raise ConfigError(f"mesh={c.get('mesh')!r}: {e}") from None


def ppl_modes(ppl: dict) -> list[str]:
    """The perplexity settings a config asks for: ``mode`` is one name or a tuple of them."""
    mode = ppl.get("mode", "chunk")
    return [mode] if isinstance(mode, str) else list(mode)


def build_groups(lm, tasks: dict, style: str, default_max_new: int) -> list[TaskGroup]:
    """Task groups (task x length), their prompts left-padded to one length per requested context length across
    tasks: every compiled program (compression, decoding) then serves all the tasks of that length. The full cache's
    bytes include those few masked slots (the prompts are within ~2% of the requested length)."""
    groups = []
    for tname, spec in tasks.items():
        for n in spec["context_tokens"]:
            examples = sweep(spec.get("task", tname), [n], list(spec.get("depths", [0.5])),
                             list(spec.get("seeds", [0])), lm.tokenizer.count, **dict(spec.get("kwargs", {})))
            groups.append(TaskGroup(tname, n, harness.prepare_examples(lm, examples, style),
                                    int(spec.get("max_new_tokens", default_max_new))))
    for n in {g.context_tokens for g in groups}:
        same = [g for g in groups if g.context_tokens == n]
        t = max(len(p.tokens) for g in same for p in g.prepared)
        for g in same:
            g.prepared = harness.pad_prepared(g.prepared, t)
    return groups


def ppl_segments(lm, ppl: dict) -> np.ndarray:
    """``n_segments`` windows of real text (context + eval tokens) at evenly spread offsets of the corpus; for models
    that expect a BOS token (Gemma) the first token of each window is replaced by BOS."""
    from kvjax.data.corpora import load_text

    ids = np.asarray(lm.tokenizer.encode(load_text(ppl["corpus"])), np.int32)
    need = int(ppl["context_tokens"]) + int(ppl["eval_tokens"])
    n = int(ppl["n_segments"])
    if len(ids) < need * n:
        raise ConfigError(f"corpus {ppl['corpus']!r} has {len(ids)} tokens, fewer than {n} x {need}")
    starts = np.linspace(0, len(ids) - need, n).astype(int)
    segs = np.stack([ids[s:s + need] for s in starts])
    tok = lm.tokenizer
    if tok.add_bos_token and tok.bos_id is not None:  # models trained with BOS (Gemma) see each segment after it
        segs[:, 0] = tok.bos_id
    return segs


def run_experiment(config, *, progress: bool = True) -> list[dict]:
    """Runs (or resumes) every cell of ``config``; writes results, summary and plot on process 0; returns the summary."""
    variants, tasks = validate(config)
    c = _to_dict(config)
    run_dir = c["run_dir"]
    writer = jax.process_index() == 0
    try:
        lock = rundir.RunDirLock(run_dir, jax.process_index()).acquire()
    except rundir.RunDirError as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"run_dir={run_dir!r} cannot be used: {e.strerror or e}") from None
    if lock.previous_owner:
        print(f"{run_dir}: took over the lock of {lock.previous_owner}, which is no longer running", file=sys.stderr)
    try:
        return _run(c, variants, tasks, run_dir, writer, progress)
    finally:
        lock.release()


def _run(c: dict, variants, tasks, run_dir: str, writer: bool, progress: bool) -> list[dict]:
    from kvjax.pretrained import load_pretrained

    lm = load_pretrained(c["model"]["name"], c["model"].get("dtype", "float32"), progress=progress)
    if lm.tokenizer is None:
        raise ConfigError(f"model.name={c['model']['name']!r} has no tokenizer (kvjax reads tokenizers from GGUF "
                          "files and its embedded models, not from checkpoint directories), but the tasks and the "
                          "perplexity corpus need one")
    if c.get("mesh"):  # shard the model and every KV state over this process's local devices
        from kvjax import sharding

        try:
            lm.mesh = sharding.make_mesh(c["mesh"])
            sharding.validate_mesh(lm.mesh, lm.cfg)
        except sharding.ShardingError as e:
            raise ConfigError(f"mesh={c['mesh']!r}: {e}") from None
        lm.params = lm.model.shard_params(lm.params)
    lanes = _data_lanes(lm)
    p_index, p_count = distributed.process_layout()
    style = c.get("prompt_style", "auto")
    style = lm.prompt_style if style == "auto" else style
    if style not in ("plain", "chat"):
        raise ConfigError(f"prompt_style={style!r}: choose auto, plain or chat")
    groups = build_groups(lm, tasks, style, int(c.get("max_new_tokens", 16)))
    ppl = c.get("perplexity", {})
    segments = ppl_segments(lm, ppl) if ppl.get("enabled") else None

    results_path = os.path.join(run_dir, "results.jsonl")
    if writer:
        _record_config(run_dir, c)
    rows = distributed.read_all_rows(run_dir)  # results.jsonl and the shards of an interrupted distributed run
    by_id = {rundir.row_id(r): r for r in rows}

    # Units of work: one prefill each (an example, or the perplexity batch), compressed by every variant.
    units: list[tuple] = []
    if segments is not None:
        units += [("ppl", None, mode) for mode in ppl_modes(ppl)]
    for g in groups:
        for p in g.prepared:
            units.append(("gen", g, p))
    ordered = sorted(variants, key=lambda v: not v.is_full)  # the full cache first: every ratio's reference
    model_id = _model_identity(c, lm)
    cells = {(i, v.label): _identity(model_id, u, v, ppl, segments) for i, u in enumerate(units) for v in ordered}
    ids = {k: rundir.cell_id(ident) for k, ident in cells.items()}
    canonical = _canonical_order(units, ordered, ids)
    mine = set(range(len(units)))
    if p_count > 1:  # this process's share of the units (kvjax.eval.distributed); rows go to its own shard file
        mine = set(distributed.my_share(len(units), p_index, p_count))
        results_path = distributed.shard_path(run_dir, p_index, p_count)
        os.makedirs(run_dir, exist_ok=True)
    n_cells = len(mine) * len(ordered)
    todo = [(u, [v for v in ordered if ids[i, v.label] not in by_id]) for i, u in enumerate(units) if i in mine]
    todo = [(u, vs) for u, vs in todo if vs]
    n_todo = sum(len(vs) for _, vs in todo)
    others = len(set(by_id) - set(ids.values()))
    if progress and n_todo < n_cells:
        print(f"resuming {run_dir}: {n_cells - n_todo} of {n_cells} cells already done")
    if writer and others:
        print(f"{run_dir}: results.jsonl also holds {others} cell(s) of other configs; they are kept but not part of "
              "this run's summary", file=sys.stderr)
    unit_index = {id(u): i for i, u in enumerate(units)}
    full = next((v for v in variants if v.is_full), None)
    ppl_ref: dict[str, dict] = {}  # full-cache reference per perplexity setting
    precompile = bool(c.get("precompile", True))
    bar = tqdm(total=n_todo, desc="cells", disable=not progress, dynamic_ncols=True)
    # Prompts are processed in groups of one shape (the perplexity batch; the prompts of one context length): the
    # group is prefilled once, then each method variant runs on all its prompts before the next variant starts, and
    # the compiled programs are dropped between variants. A method's programs thus serve every prompt of the shape
    # (one compilation per variant and group), only one group's prefilled states are held at a time, and XLA's CPU
    # executables (~600 memory maps each) never pile up to the kernel's map limit (65530 by default) in long runs.
    shape_groups: dict[tuple, list[int]] = {}
    for i, (unit, _) in enumerate(todo):
        shape_groups.setdefault(("ppl",) if unit[0] == "ppl" else ("gen", unit[1].context_tokens), []).append(i)
    f = rundir.open_for_append(results_path) if (writer or p_count > 1) else None
    lock = threading.Lock()  # data-parallel lanes write rows, results and the bar from their own threads

    def run_members(lane, members: list[int], sync: threading.Barrier | None) -> None:
        prefilled = {}
        for i in members:
            unit = todo[i][0]
            bar.set_postfix_str("prefill " + _where(unit))
            same = next((j for j in prefilled if todo[j][0][0] == "ppl"), None) if unit[0] == "ppl" else None
            prefilled[i] = prefilled[same] if same is not None else \
                _prefill(lane, unit, variants, ppl, segments, precompile)  # perplexity settings share one prefill
            if unit[0] == "ppl" and full is not None:
                _, ppl_ref[unit[2]] = harness.run_perplexity_cell(lane, full, segments, int(ppl["context_tokens"]),
                                                                  unit[2], None, prefilled[i], precompile)
        for v in ordered:
            for i in members:
                unit, vs = todo[i]
                if v not in vs:
                    continue
                bar.set_postfix_str(f"{v.label} {_where(unit)}")
                row = _run_cell(lane, unit, v, ppl, segments, ppl_ref, prefilled[i], precompile)
                k = (unit_index[id(unit)], v.label)
                row.update(key=_key(unit, v), cell_id=ids[k], cell=cells[k], label=v.label, method=v.method.name,
                           method_desc=v.method.describe(), warm=precompile, model=lm.name, time=time.time(),
                           **_memory())
                with lock:
                    by_id[ids[k]] = row
                    if f is not None:
                        rundir.append_row(f, row, default=_json_default)
                    bar.update(1)
            # Programs are dropped between variants; lanes drop them together (between their timed calls, never
            # between one lane's compile and its timed call).
            if sync is None:
                jax.clear_caches()
            elif sync.wait() == 0:
                jax.clear_caches()
                sync.wait()
            else:
                sync.wait()

    try:
        for key, members in shape_groups.items():
            if key[0] == "gen" and len(lanes) > 1:  # data:n: the prompts of a shape are dealt to the n groups
                _run_lanes(run_members, lanes, members)
            else:
                run_members(lm, members, None)
    finally:
        bar.close()
        if f is not None:
            f.close()
    if p_count > 1:  # every process is done: process 0 merges the shards into results.jsonl
        distributed.barrier("kvjax-experiment-cells-done")
        if writer:
            distributed.merge_shards(run_dir, canonical, _json_default)
            by_id = {rundir.row_id(r): r for r in distributed.read_all_rows(run_dir)}
        distributed.barrier("kvjax-experiment-merged")
    # This config's cells only (a reused row carries this config's label and task name).
    rows = [dict(by_id[ids[i, v.label]], label=v.label, **({"task": units[i][1].task} if units[i][0] == "gen" else {}))
            for i in range(len(units)) for v in ordered if ids[i, v.label] in by_id]
    if not writer:
        return harness.summarize(rows)
    summary = harness.write_summary(run_dir, rows)
    if progress:
        print(harness.format_table(summary))
        print(f"\nresults: {results_path}\nsummary: {os.path.join(run_dir, 'summary.csv')}\n"
              f"plot:    {os.path.join(run_dir, 'quality_vs_bytes.png')}\n"
              f"report:  {os.path.join(run_dir, 'report.md')}")
    return summary


def _data_lanes(lm) -> list:
    """The model once per data-parallel group: with a mesh ``data:n`` (n > 1), ``n`` copies of ``lm``, each on its
    own ``data:1`` sub-mesh (params replicated to each group, as data parallelism does); otherwise ``[lm]``."""
    from kvjax import sharding

    if lm.mesh is None or int(lm.mesh.shape["data"]) == 1:
        return [lm]
    lanes = []
    for sub in sharding.data_submeshes(lm.mesh):
        lane = dataclasses.replace(lm, mesh=sub)
        lanes.append(dataclasses.replace(lane, params=lane.model.shard_params(lm.params)))
    return lanes


def _run_lanes(run_members, lanes: list, members: list[int]) -> None:
    """Runs ``members`` (one shape's generation units) dealt round-robin to the data-parallel ``lanes``, one thread
    each (JAX dispatch is thread-safe; each lane computes on its own devices). The first error of any lane is
    raised (the others stop at their next barrier)."""
    shares = [members[g::len(lanes)] for g in range(len(lanes))]
    sync = threading.Barrier(len(lanes))

    def lane_job(g: int) -> None:
        try:
            run_members(lanes[g], shares[g], sync)
        except BaseException:
            sync.abort()
            raise

    with ThreadPoolExecutor(len(lanes), thread_name_prefix="kvjax-data-lane") as ex:
        futures = [ex.submit(lane_job, g) for g in range(len(lanes))]
        errors = [fut.exception() for fut in futures]
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def _record_config(run_dir: str, c: dict) -> None:
    """Writes ``config.json`` (the latest launch's config) and keeps every config run in this directory as
    ``configs/<id>.json``; a changed config is announced with its differences (never silently overwritten)."""
    new = json.loads(json.dumps(c, default=str))
    record = {k: v for k, v in new.items() if k != "run_dir"}
    cid = rundir.cell_id(record)[:12]
    keep = os.path.join(run_dir, "configs")
    os.makedirs(keep, exist_ok=True)
    path = os.path.join(run_dir, "config.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict):
            old_record = {k: v for k, v in old.items() if k != "run_dir"}
            oid = rundir.cell_id(old_record)[:12]
            if oid != cid:
                if not os.path.exists(os.path.join(keep, f"{oid}.json")):
                    rundir.atomic_write_text(os.path.join(keep, f"{oid}.json"), json.dumps(old, indent=1))
                diff = rundir.flat_diff(old_record, record)
                print(f"{run_dir} was last run with another config (kept as configs/{oid}.json; changed: "
                      f"{'; '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}); this config's cells run beside the "
                      "old ones, and the summary covers this config only", file=sys.stderr)
        else:
            bad = os.path.join(keep, f"unreadable-config-{int(time.time())}.json")
            os.replace(path, bad)
            print(f"{run_dir}/config.json was unreadable; moved to {bad}", file=sys.stderr)
    text = json.dumps(new, indent=1)
    if not os.path.exists(os.path.join(keep, f"{cid}.json")):
        rundir.atomic_write_text(os.path.join(keep, f"{cid}.json"), text)
    rundir.atomic_write_text(path, text)


def _model_identity(c: dict, lm) -> dict:
    from kvjax.persist import config_fingerprint

    return {"name": c["model"]["name"], "dtype": c["model"].get("dtype", "float32"),
            "config_sha256": config_fingerprint(lm.cfg)}


def _identity(model_id: dict, unit, v, ppl: dict, segments) -> dict:
    """Everything that determines a cell's result (hashed into its ``cell_id``)."""
    kind, g, p = unit
    ident = {"model": model_id, "method": v.method.describe()}
    if kind == "ppl":
        return ident | {"task": harness.ppl_task_name(p), "corpus": ppl["corpus"],
                        "context_tokens": int(ppl["context_tokens"]), "eval_tokens": int(ppl["eval_tokens"]),
                        "n_segments": int(ppl["n_segments"]), "mode": p,
                        "tokens_sha256": rundir.sha256_arrays(segments)}
    ex = p.example
    return ident | {"task": ex.task, "context_tokens": g.context_tokens,
                    "depth": ex.meta.get("requested_depth", ex.depth), "seed": ex.seed,
                    "max_new_tokens": g.max_new_tokens, "answers": list(ex.answers),
                    "example_meta_sha256": rundir.cell_id(ex.meta),
                    "prompt_sha256": rundir.sha256_arrays(p.tokens, p.mask, p.answer_ids, p.answer_mask)}


def _canonical_order(units, ordered, ids) -> list[str]:
    """Cell ids in the order a single process writes them (shape group, variant, unit): the merged results of a
    distributed run come in this order, so they read like a single-process run's."""
    groups: dict[tuple, list[int]] = {}
    for i, u in enumerate(units):
        groups.setdefault(("ppl",) if u[0] == "ppl" else ("gen", u[1].context_tokens), []).append(i)
    return [ids[i, v.label] for members in groups.values() for v in ordered for i in members]


def _where(unit) -> str:
    kind, g, p = unit
    return harness.ppl_task_name(p) if kind == "ppl" else f"{g.task}@{g.context_tokens}"


def _key(unit, v) -> str:
    kind, g, p = unit
    if kind == "ppl":
        return harness.cell_key(v.label, harness.ppl_task_name(p), 0, None, None)
    ex = p.example
    return harness.cell_key(v.label, g.task, g.context_tokens, ex.meta.get("requested_depth", ex.depth), ex.seed)


def _room(unit, ppl) -> int:
    kind, g, p = unit
    return int(ppl["eval_tokens"]) if kind == "ppl" else harness.generation_room(p, g.max_new_tokens)


def _prefill(lm, unit, variants, ppl, segments, precompile: bool):
    import jax.numpy as jnp

    kind, g, p = unit
    if kind == "ppl":
        toks = jnp.asarray(segments[:, :int(ppl["context_tokens"])])
        return harness.shared_prefill(lm, toks, None, variants, _room(unit, ppl), precompile)
    return harness.shared_prefill(lm, jnp.asarray(p.tokens[None]), jnp.asarray(p.mask[None]), variants,
                                  _room(unit, ppl), precompile)


def _run_cell(lm, unit, v, ppl, segments, ppl_ref, prefilled, precompile: bool) -> dict:
    kind, g, p = unit
    if kind == "ppl":
        row, _ = harness.run_perplexity_cell(lm, v, segments, int(ppl["context_tokens"]), p, ppl_ref.get(p),
                                             prefilled, precompile)
        row["corpus"] = ppl["corpus"]
        return row
    row = harness.run_generation_cell(lm, v, p, g.max_new_tokens, prefilled, precompile)
    row["task"] = g.task
    row["context_tokens"] = g.context_tokens
    return row


def _memory() -> dict[str, Any]:
    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return {}
    return {"peak_device_bytes": stats.get("peak_bytes_in_use")}


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)

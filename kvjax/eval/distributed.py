"""Experiments divided among JAX processes (multi-host pods, or several processes on one machine).

Under ``jax.distributed`` (``python -m kvjax.launch --distributed``) every process runs the same config, but only its
share of the work: the experiment's *units* (one prefill each: an example's prompt, or the perplexity batch; every
method variant of a unit runs where the unit runs) are dealt round-robin, unit ``u`` to process
``u % process_count``. Each process computes on its own local devices (sharded over them with ``--mesh``) and
appends its rows to its own shard file ``results.p<i>-of-<n>.jsonl`` (process ``i`` holds the run directory's lock
``.lock.p<i>``, :class:`kvjax.eval.rundir.RunDirLock`, so two launches never write one shard). When all are done
(a barrier), process 0 merges the shards into the usual ``results.jsonl`` (in the canonical cell order, each cell
once), removes the merged shards and writes the summary and the plot.

Resume: every process reads ``results.jsonl`` and every shard file present (of any process count), so cells
finished by a crashed or interrupted run are not run again, whichever process ran them, even if the new run uses
another number of processes.
"""
from __future__ import annotations

import glob
import os
import re

import jax

from kvjax.eval import rundir

_SHARD_RE = re.compile(r"results\.p(\d+)-of-(\d+)\.jsonl$")


def process_layout() -> tuple[int, int]:
    """``(process_index, process_count)`` of this JAX process."""
    return jax.process_index(), jax.process_count()


def my_share(n_units: int, index: int, count: int) -> list[int]:
    """The unit indices process ``index`` of ``count`` runs (round-robin: balanced to within one unit)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process index {index} is not in [0, {count})")
    return list(range(index, n_units, count))


def shard_path(run_dir: str, index: int, count: int) -> str:
    return os.path.join(run_dir, f"results.p{index}-of-{count}.jsonl")


def shard_files(run_dir: str) -> list[str]:
    """Every results shard in ``run_dir`` (of any process count), sorted."""
    return sorted(p for p in glob.glob(os.path.join(run_dir, "results.p*-of-*.jsonl"))
                  if _SHARD_RE.search(os.path.basename(p)))


def read_jsonl(path: str) -> list[dict]:
    """Rows of one results file (:func:`kvjax.eval.rundir.read_rows`: torn lines and repeated cells skipped)."""
    return rundir.read_rows(path)


def read_all_rows(run_dir: str) -> list[dict]:
    """``results.jsonl`` then every shard, each cell once (the first row of a cell wins)."""
    seen, out = set(), []
    for path in [os.path.join(run_dir, "results.jsonl")] + shard_files(run_dir):
        for row in rundir.read_rows(path):
            k = rundir.row_id(row)
            if k not in seen:
                seen.add(k)
                out.append(row)
    return out


BARRIER_TIMEOUT_S = 48 * 3600  # processes wait for the slowest one's share of the cells


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Waits until every process reaches ``name`` (no-op with one process). Uses the ``jax.distributed``
    coordination service (no device collectives: CPU processes need no collectives backend, and no device memory is
    touched)."""
    if jax.process_count() <= 1:
        return
    from jax._src import distributed as jax_distributed  # noqa: PLC0415 (the coordination client jax.distributed made)

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.process_count() > 1 but jax.distributed has no client; call jax.distributed.initialize")
    client.wait_at_barrier(name, int(timeout_s * 1000))


def merge_shards(run_dir: str, order: list[str], default=None) -> int:
    """Process 0: appends to ``results.jsonl`` every shard row whose cell it lacks, in the canonical ``order`` of cell
    ids (cells outside ``order``, e.g. of another config, after them), each fsynced
    (:func:`kvjax.eval.rundir.append_row`), then deletes the shard files. Returns the number of rows added.
    ``default`` serialises values json cannot."""
    main = os.path.join(run_dir, "results.jsonl")
    have = {rundir.row_id(r) for r in rundir.read_rows(main)}
    shards = shard_files(run_dir)
    new: dict[str, dict] = {}
    for path in shards:
        for row in rundir.read_rows(path):
            k = rundir.row_id(row)
            if k not in have and k not in new:
                new[k] = row
    rank = {k: i for i, k in enumerate(order)}
    added = sorted(new, key=lambda k: (rank.get(k, len(rank)), k))
    if added:
        f = rundir.open_for_append(main)
        try:
            for k in added:
                rundir.append_row(f, new[k], default=default)
        finally:
            f.close()
    for path in shards:
        os.remove(path)
    return len(added)

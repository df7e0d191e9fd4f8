"""Run directories that lose nothing and count nothing twice: an owner lock, append-only results, cell identities.

* **One owner at a time.** :class:`RunDirLock` holds an exclusive ``flock`` on ``<run_dir>/.lock`` for the whole run
  and writes the owner's pid, host, start time and command line into it. A second launch into the same directory fails
  at once with one line naming that process. The kernel drops the lock when its process dies (even by ``kill -9``), so
  a stale lock is taken over without any guessing about pids; the takeover is reported. Under
  ``jax.distributed`` process ``i > 0`` locks ``.lock.p<i>``, so process 0 of a run excludes any other run's process 0.
* **Append-only results.** :func:`open_for_append` starts a torn last line (a crash mid-write) on a fresh line, so a
  fragment never swallows the next row; every row is flushed and fsynced as it is written (:func:`append_row`).
* **Forgiving, honest reading.** :func:`read_rows` skips torn or garbage lines and duplicate rows of one cell (keeping
  the first), with a warning naming the line numbers: a skipped cell is simply not done, so a resume re-runs it, and a
  file written twice over by two processes still summarises each cell once.
* **Cell identity.** :func:`cell_id` hashes everything that determines a cell's result (model and its config, dtype,
  the method's full description with every hyper-parameter, the exact prompt tokens and answer, decoding settings),
  so a changed config can never reuse a result it did not produce.
* **Atomic small files.** :func:`atomic_write_text` writes ``config.json``, summaries and records through a temporary
  file renamed into place.
"""
from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import socket
import sys
import tempfile
import warnings
from typing import Any, Iterable

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None


class RunDirError(RuntimeError):
    """The run directory cannot be used (another process owns it, or it cannot be locked / written)."""


# ----------------------------------------------------------------------------------------------------------------------
# Owner lock
# ----------------------------------------------------------------------------------------------------------------------
def lock_name(process_index: int = 0) -> str:
    return ".lock" if process_index == 0 else f".lock.p{process_index}"


def _describe_owner(text: str) -> str:
    try:
        o = json.loads(text)
        return (f"pid {o['pid']} on host {o['host']} (started {o.get('started', '?')}: "
                f"{' '.join(o.get('argv') or []) or '?'})")
    except (ValueError, KeyError, TypeError):
        return "another process (its pid is not recorded yet)"


class RunDirLock:
    """Exclusive ownership of a run directory for the lifetime of a run (a context manager)."""

    def __init__(self, run_dir: str, process_index: int = 0):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, lock_name(process_index))
        self.fd: int | None = None
        self.previous_owner: str | None = None  # set when a dead process's lock was taken over

    def acquire(self) -> "RunDirLock":
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            text = os.pread(fd, 65536, 0).decode(errors="replace")
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"run directory {self.run_dir} is in use by {_describe_owner(text)}; wait for it "
                                  f"to finish or choose another run_dir") from None
            raise RunDirError(f"cannot lock run directory {self.run_dir} ({e.strerror}); the filesystem must "
                              "support file locks") from None
        old = os.pread(fd, 65536, 0).decode(errors="replace").strip()
        if old:  # the lock was free but names an owner: that process died without releasing it (kill -9, crash)
            self.previous_owner = _describe_owner(old)
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # a lock file naming nobody: released cleanly
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------------------------------
# Results file
# ----------------------------------------------------------------------------------------------------------------------
def row_id(row: dict) -> str | None:
    """A row's cell identity (``cell_id``; rows of kvjax versions before identities existed have only ``key``)."""
    return row.get("cell_id") or row.get("key")


def read_rows(path: str, *, warn: bool = True) -> list[dict]:
    """The rows of a JSON-lines results file, each cell once: torn or garbage lines and repeated cells are skipped
    (the first row of a cell is kept), with one warning naming the line numbers."""
    rows: list[dict] = []
    if not os.path.exists(path):
        return rows
    bad, dup = [], []
    seen: set[str] = set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                row = None
            rid = row_id(row) if isinstance(row, dict) else None
            if not isinstance(rid, str):
                bad.append(lineno)
                continue
            if rid in seen:
                dup.append(lineno)
                continue
            seen.add(rid)
            rows.append(row)
    if warn and bad:
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s) (torn or corrupt; line {_lines(bad)}); "
                      "their cells count as not done and are re-run", stacklevel=2)
    if warn and dup:
        warnings.warn(f"{path}: skipped {len(dup)} repeated row(s) of cells already read (line {_lines(dup)}); each "
                      "cell is counted once", stacklevel=2)
    return rows


def _lines(nums: list[int]) -> str:
    return ", ".join(map(str, nums[:10])) + (" ..." if len(nums) > 10 else "")


def open_for_append(path: str):
    """Opens a results file for appending rows; a torn last line (no final newline) is closed first, so the next row
    starts on a fresh line and the fragment stays a single skippable line."""
    f = open(path, "a+b")
    f.seek(0, os.SEEK_END)
    if f.tell() > 0:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
            f.flush()
    return f


def append_row(f, row: dict, default=None) -> None:
    """Appends one row as one line and makes it durable before returning."""
    f.write((json.dumps(row, default=default) + "\n").encode())
    f.flush()
    os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------------------
# Identities and small files
# ----------------------------------------------------------------------------------------------------------------------
def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cell_id(identity: dict) -> str:
    """A stable id of everything in ``identity`` (SHA-256 of its canonical JSON, 32 hex digits)."""
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:32]


def sha256_arrays(*arrays) -> str:
    """SHA-256 over arrays' dtypes, shapes and bytes (e.g. the exact prompt of a cell)."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same directory renamed into place."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def flat_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted paths where two nested dicts differ, as ``path: old -> new``."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        p = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += flat_diff(a, b, p + ".")
        elif a != b:
            out.append(f"{p}: {a!r} -> {b!r}")
    return out


def iter_ids(rows: Iterable[dict]) -> set[str]:
    return {rid for rid in map(row_id, rows) if rid}

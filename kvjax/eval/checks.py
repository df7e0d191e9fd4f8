"""One-line checks of what a launch is given, run before anything is loaded or compiled.

* :func:`check_config_file`: the ``--config`` file exists, is a file, parses as Python and defines ``get_config``;
* :func:`check_experiment`: the typed fields of an experiment config (counts, lengths, depths, sweeps), each error
  naming the field, the bad value and what is allowed (method hyper-parameters are checked against the registry's
  typed fields by :func:`kvjax.compress.get_method`);
* :func:`check_run_dir`: the run directory is (or can be made) a writable directory.

Every failure is a :class:`~kvjax.eval.experiment.ConfigError` (``kvjax.launch`` turns it into exit code 2).
"""
from __future__ import annotations

import ast
import errno
import math
import os
import tempfile
from numbers import Integral, Real
from typing import Any


def _error(msg: str) -> Exception:
    from kvjax.eval.experiment import ConfigError  # noqa: PLC0415

    return ConfigError(msg)


def check_config_file(path: str) -> None:
    """``path`` (``file.py`` or ``file.py:arg``) names a Python file that defines ``get_config``."""
    path = path.split(":", 1)[0]
    if not os.path.exists(path):
        raise _error(f"config file {path} does not exist")
    if os.path.isdir(path):
        raise _error(f"config file {path} is a directory; give a .py file that defines get_config()")
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except SyntaxError as e:
        raise _error(f"config file {path} has a syntax error at line {e.lineno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _error(f"cannot read config file {path}: {e}") from None
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    names |= {a.asname or a.name for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    if "get_config" not in names:
        raise _error(f"config file {path} does not define get_config() (it must return an ml_collections "
                     "ConfigDict)")


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v))


def positive_int(where: str, v, *, allow_zero: bool = False) -> None:
    if not _is_int(v) or v < (0 if allow_zero else 1):
        raise _error(f"{where}={v!r}: expected an integer {'>= 0' if allow_zero else '> 0'}")


def _sequence(where: str, v, check) -> None:
    if not isinstance(v, (list, tuple)):
        raise _error(f"{where}={v!r}: expected a tuple of values, e.g. (1024,)")
    if not v:
        raise _error(f"{where}=(): an empty tuple runs nothing; give at least one value")
    for x in v:
        check(where, x)


def _depth(where: str, v) -> None:
    if not _is_real(v) or not 0.0 <= float(v) <= 1.0:
        raise _error(f"{where} has {v!r}: depths are numbers in [0, 1] (0 = start of the context, 1 = end)")


def _seed(where: str, v) -> None:
    if not _is_int(v):
        raise _error(f"{where} has {v!r}: seeds are integers")


def check_experiment(c: dict[str, Any]) -> None:
    """Typed fields of an experiment config dict (see ``configs/quickstart.py``)."""
    if "max_new_tokens" in c:
        positive_int("max_new_tokens", c["max_new_tokens"])
    if not isinstance(c.get("run_dir", ""), str) or not c.get("run_dir", "x"):
        raise _error(f"run_dir={c.get('run_dir')!r}: expected a directory path")
    for tname, spec in (c.get("tasks") or {}).items():
        if not hasattr(spec, "get"):
            raise _error(f"tasks.{tname}={spec!r}: expected a dict of task settings")
        if "context_tokens" not in spec:
            raise _error(f"tasks.{tname} has no context_tokens; give the prompt lengths, e.g. (1024,)")
        _sequence(f"tasks.{tname}.context_tokens", spec["context_tokens"], lambda w, x: positive_int(w, x))
        if "depths" in spec:
            _sequence(f"tasks.{tname}.depths", spec["depths"], _depth)
        if "seeds" in spec:
            _sequence(f"tasks.{tname}.seeds", spec["seeds"], _seed)
        if "max_new_tokens" in spec:
            positive_int(f"tasks.{tname}.max_new_tokens", spec["max_new_tokens"])
    ppl = c.get("perplexity") or {}
    if ppl.get("enabled"):
        for k in ("context_tokens", "eval_tokens", "n_segments"):
            if k in ppl:
                positive_int(f"perplexity.{k}", ppl[k])


def check_run_dir(path: str) -> None:
    """The run directory exists as a writable directory or can be created (nothing is left behind by the check)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise _error(f"run_dir {path} exists and is not a directory; choose another run_dir")
    probe_dir = path
    while not os.path.exists(probe_dir):  # the nearest existing ancestor must accept the new directory
        probe_dir = os.path.dirname(probe_dir)
    if not os.path.isdir(probe_dir):
        raise _error(f"run_dir {path}: {probe_dir} is a file, not a directory")
    try:
        probe_write(probe_dir)
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise _error(f"run_dir {path} is not writable ({probe_dir}: {reason}); choose another run_dir") from None


def probe_write(directory: str) -> None:
    """Creates, writes, syncs and removes a small file in ``directory`` (raises OSError when that fails)."""
    fd, name = tempfile.mkstemp(prefix=".kvjax-probe-", dir=directory)
    try:
        os.write(fd, b"\0" * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)


def os_error_line(e: OSError) -> str:
    """One line for an OSError met while running (full disk, read-only file system, permissions)."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on device{where}: free some space or choose another run_dir"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where}: {e.strerror}; choose a writable run_dir"
    return f"{e.strerror or e}{where}"

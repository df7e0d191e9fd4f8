"""Command-line entry point: ``python -m kvjax.launch --config=configs/quickstart.py [--config.x=y ...]``.

Flags: ``--config`` (an ml_collections config file; any field can be overridden on the command line, e.g.
``--config.methods.snapkv.budget="(256,512)"`` or ``--config.run_dir=runs/mine``), ``--distributed`` (call
``jax.distributed.initialize()`` first, for multi-host TPU pods; only process 0 writes files), ``--progress``.
Exit code 2 with a one-line message for an invalid config.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "experiment config file")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "initialize jax.distributed (multi-host pods)")
_PROGRESS = flags.DEFINE_bool("progress", True, "show progress bars")
_COMPILE_CACHE = flags.DEFINE_string("compile_cache", os.path.expanduser("~/.cache/kvjax/xla"),
                                     "persistent XLA compilation cache directory ('' to disable)")


def main(argv) -> int:
    del argv
    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    if _COMPILE_CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    from kvjax.eval.experiment import ConfigError, run_experiment

    try:
        run_experiment(_CONFIG.value, progress=_PROGRESS.value)
    except (ConfigError, FileNotFoundError) as e:
        print(f"kvjax.launch: error: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()

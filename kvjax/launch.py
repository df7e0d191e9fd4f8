"""Command-line entry point: ``python -m kvjax.launch --config=configs/quickstart.py [--config.x=y ...]``.

Configs with a ``train`` section (``configs/locret_train.py``, ``configs/duo_train.py``) run a training
(:mod:`kvjax.train.run`) instead of an evaluation.

Flags: ``--config`` (an ml_collections config file; any field can be overridden on the command line, e.g.
``--config.methods.snapkv.budget="(256,512)"`` or ``--config.run_dir=runs/mine``), ``--mesh=data:1,model:2,sequence:4``
(shard the model and KV states over this process's devices, :mod:`kvjax.sharding`), ``--distributed`` (call
``jax.distributed.initialize()`` first — on a pod it discovers its peers; elsewhere pass ``--coordinator=host:port
--num_processes=N --process_id=I`` — and divide the cells among the processes, :mod:`kvjax.eval.distributed`),
``--progress``.
Exit code 2 with a one-line message for an invalid config.

Listings (nothing is loaded or run): ``--list_methods`` (every registered method with its family, hyper-parameters,
defaults and paper), ``--list_tasks`` (every task with its options), ``--dry_run`` (the cells ``--config`` would run,
how many are already done, and an estimated time; see :mod:`kvjax.eval.plan`).

A finished run directory holds ``report.md`` (tables and the quality-vs-bytes plot, see :mod:`kvjax.eval.report`).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "experiment config file")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "initialize jax.distributed (multi-host pods)")
_MESH = flags.DEFINE_string("mesh", None, "device mesh over this process's local devices, e.g. 'data:2,model:4' or "
                            "'model:2,sequence:4' (overrides config.mesh; see kvjax.sharding)")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "with --distributed: coordinator host:port (default: "
                                   "discovered by jax.distributed, e.g. on Cloud TPU / GKE / SLURM)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with --distributed: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "with --distributed: this process's index")
_PROGRESS = flags.DEFINE_bool("progress", True, "show progress bars")
_LIST_METHODS = flags.DEFINE_bool("list_methods", False, "list every registered method and exit")
_LIST_TASKS = flags.DEFINE_bool("list_tasks", False, "list every task and exit")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the cells --config would run and an estimated time, then exit")
_COMPILE_CACHE = flags.DEFINE_string("compile_cache", os.path.expanduser("~/.cache/kvjax/xla"),
                                     "persistent XLA compilation cache directory ('' to disable)")


def main(argv) -> int:
    del argv
    from kvjax.eval import plan

    if _LIST_METHODS.value:
        print(plan.format_methods(plan.method_catalog()))
        return 0
    if _LIST_TASKS.value:
        print(plan.format_tasks(plan.task_catalog()))
        return 0
    from kvjax.eval.experiment import ConfigError

    config = _CONFIG.value
    if _MESH.value is not None:
        with config.unlocked():
            config.mesh = _MESH.value
    if _DRY_RUN.value and "train" in config:
        from kvjax.train.run import check_training

        try:
            check_training(config)
        except (ValueError, KeyError) as e:
            return _fail(ConfigError(str(e)))
        t = config.train
        print(f"training {t.kind} on {config.model.name}: {t.steps} steps of {t.data.batch_size} x "
              f"{t.data.seq_len} tokens from {', '.join(t.data.sources)} -> {config.run_dir}/ckpt")
        return 0
    if _DRY_RUN.value:
        try:
            print(plan.plan_experiment(config).format())
        except ConfigError as e:
            print(f"kvjax.launch: error: {e}", file=sys.stderr)
            return 2
        return 0
    import jax

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every checkpoint step at INFO
    if _DISTRIBUTED.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    if _COMPILE_CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    from kvjax.eval.checks import check_run_dir

    try:
        if "train" not in config:
            from kvjax.eval.experiment import validate

            validate(config)  # before the run directory is checked or anything is loaded
            check_run_dir(config.run_dir)
    except Exception as e:  # noqa: BLE001
        return _fail(e)
    return execute(config, progress=_PROGRESS.value)


def execute(config, *, progress: bool = True) -> int:
    """Runs ``config`` (an experiment, or a training when it has a ``train`` section); returns the exit code: 0, or
    2 after printing one line for an invalid config, an unreadable / unsupported checkpoint, a missing tokenizer, or
    a run directory that cannot be written (read-only, full disk)."""
    from kvjax.eval.experiment import ConfigError, run_experiment

    try:
        if "train" in config:  # a training run (kvjax.train.run): configs/locret_train.py, duo_train.py
            from kvjax.train.run import run_training

            try:
                run_training(config, progress=progress)
            except ValueError as e:  # bad config values, mismatched / corrupt checkpoints (CheckpointError)
                raise ConfigError(str(e)) from None
        else:
            run_experiment(config, progress=progress)
    except Exception as e:  # noqa: BLE001 (_fail re-raises what is not a user error)
        return _fail(e)
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from kvjax.checkpoints.safetensors import CheckpointError
    from kvjax.config import UnsupportedConfigError
    from kvjax.eval.experiment import ConfigError
    from kvjax.persist import StateFileError
    from kvjax.sharding import ShardingError

    return ConfigError, CheckpointError, UnsupportedConfigError, StateFileError, ShardingError


def _fail(e: BaseException) -> int:
    """One line on stderr and exit code 2 for user errors; anything else is a bug and keeps its traceback."""
    from kvjax.checkpoints.gguf import GGUFError
    from kvjax.eval.checks import os_error_line

    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        line = str(e)
    elif isinstance(e, OSError):
        line = os_error_line(e)
    elif isinstance(e, _user_errors() + (GGUFError,)):
        line = str(e)
    else:
        raise e
    print(f"kvjax.launch: error: {' '.join(line.split())}", file=sys.stderr)
    return 2


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with one-line errors (exit code 2) for a bad ``--config`` file or a bad flag: the config
    file is checked (exists, is a file, parses, defines ``get_config``) before ml_collections executes it."""
    from kvjax.eval.checks import check_config_file
    from kvjax.eval.experiment import ConfigError

    path = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
    try:
        if path is not None:
            check_config_file(path)
        return flags.FLAGS(argv)
    except (ConfigError, flags.Error) as e:
        print(f"kvjax.launch: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError, TypeError) as e:  # ml_collections: an override names a missing field
        print(f"kvjax.launch: error: {unknown_override_line(path, argv, e)}", file=sys.stderr)
        sys.exit(2)


def unknown_override_line(path: str | None, argv: list[str], e: BaseException) -> str:
    """One line naming the ``--config.a.b=v`` override whose field does not exist and the fields that do there."""
    from kvjax import configs

    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    try:
        file, _, arg = (path or "configs/quickstart.py").partition(":")
        module = configs.config_module(file)
        node = (module.get_config(arg) if arg else module.get_config()).to_dict()
        for dotted in overrides:
            cur, walked = node, []
            for key in dotted.split("."):
                if not isinstance(cur, dict) or key not in cur:
                    where = ".".join(walked) or "the config"
                    have = ", ".join(sorted(cur)) if isinstance(cur, dict) else f"a {type(cur).__name__} value"
                    return (f"--config.{dotted}: {where} has no field {key!r} in {file} (it has: {have or 'none'}); "
                            "an override can only set a field the config file defines")
                cur, walked = cur[key], walked + [key]
    except Exception:  # noqa: BLE001 (the generic line below still names the field)
        pass
    return f"a --config override names a field the config does not have: {e}"


def run() -> None:
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
    run()

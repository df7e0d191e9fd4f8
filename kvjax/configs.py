"""Building blocks of the config files in ``configs/`` (plain ml_collections files read by ``kvjax.launch``).

``experiment`` gives the fields every experiment config starts with; ``sibling`` loads another config file of the
same directory (a variant overrides a few fields of its base, e.g. ``configs/duo_train_gemma.py`` of
``configs/duo_train.py``). Configs stay plain files: these helpers only remove the preamble they all repeated.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections


def experiment(run_dir: str, *, model: str = "smollm2-135m", dtype: str = "float32", precompile: bool = True,
               prompt_style: str = "plain", max_new_tokens: int = 10) -> ml_collections.ConfigDict:
    """The common head of an experiment config: run directory, model, and generation settings.

    ``precompile``: compile every program before its timed call, so no timing includes compilation.
    ``prompt_style``: ``plain`` (raw text), ``chat`` (the model's chat template) or ``auto`` (the model's own).
    The caller adds ``methods``, ``tasks`` and ``perplexity``.
    """
    c = training(run_dir, model=model, dtype=dtype)
    c.precompile = precompile
    c.prompt_style = prompt_style
    c.max_new_tokens = max_new_tokens
    return c


def training(run_dir: str, *, model: str = "smollm2-135m", dtype: str = "float32") -> ml_collections.ConfigDict:
    """The common head of a training config (``kvjax.train.run``): run directory and frozen backbone; the caller
    adds the ``train`` section."""
    c = ml_collections.ConfigDict()
    c.run_dir = run_dir
    c.model = ml_collections.ConfigDict({"name": model, "dtype": dtype})
    return c


def sibling(config_file: str, name: str, *args) -> ml_collections.ConfigDict:
    """``get_config(*args)`` of ``<name>.py`` in the directory of ``config_file`` (pass ``__file__``).

    Config files are loaded by path (``--config=configs/x.py``), not imported as a package, so a variant reaches its
    base through this instead of an ``import``.
    """
    return sibling_module(config_file, name).get_config(*args)


def sibling_module(config_file: str, name: str):
    """The module of ``<name>.py`` beside ``config_file``, for a variant that reads its base's constants too."""
    return config_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py"))


def config_module(path: str):
    """The config file at ``path`` executed as a module (what ml_collections' ``--config`` does)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config {os.path.basename(path)[:-3]!r}: no file {path}")
    spec = importlib.util.spec_from_file_location(f"kvjax_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

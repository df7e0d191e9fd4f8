"""Every config file in configs/ loads and passes the checks launch runs before loading a model; evaluation configs
point at the artefacts their training configs write (kvjax.configs)."""
from __future__ import annotations

import glob
import inspect
import os

import pytest

from kvjax import configs
from kvjax.eval.experiment import validate
from kvjax.train.run import check_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))
ARTEFACTS = {"heads", "gates"}  # method options that name a trained artefact by path


def _load(name: str, *args):
    return configs.sibling(os.path.join(ROOT, "configs", "x.py"), name, *args)


def _artefact_paths(c) -> list[tuple[str, str]]:
    return [(m, spec[k]) for m, spec in c.to_dict().get("methods", {}).items() for k in ARTEFACTS if k in spec]


@pytest.mark.parametrize("name", FILES)
def test_config_file_loads_and_validates(name):
    c = _load(name)
    assert c.run_dir.startswith("runs/") and c.model.name
    if "train" in c:
        check_training(c)
        return
    if any(not os.path.exists(os.path.join(ROOT, p)) for _, p in _artefact_paths(c)):
        pytest.skip(f"configs/{name}.py needs a trained artefact that a training config writes (checked below)")
    cwd = os.getcwd()
    os.chdir(ROOT)  # artefact paths are relative to the repository root, as launch is run from there
    try:
        validate(c)
    finally:
        os.chdir(cwd)


def test_trained_artefacts_come_from_a_config_or_from_the_repository():
    """An artefact path in an evaluation config is a committed file or the ``ckpt`` a training config writes."""
    written = {f"{_load(n).run_dir}/ckpt" for n in FILES if "train" in _load(n)}
    assert {"runs/locret/ckpt", "runs/duo/ckpt", "runs/locret-gemma3/ckpt", "runs/duo-gemma3/ckpt"} <= written
    for name in FILES:
        for method, path in _artefact_paths(_load(name)):
            assert path in written or os.path.exists(os.path.join(ROOT, path)), (name, method, path)


def test_variants_share_their_base():
    """``configs.sibling``: a variant is its base with a few fields overridden, never a copy."""
    base, gemma = _load("duo_train"), _load("duo_train_gemma")
    assert gemma.model.name == "gemma3-270m" and gemma.run_dir == "runs/duo-gemma3"
    assert gemma.train.optim.to_dict() == base.train.optim.to_dict()
    assert gemma.train.method.to_dict() == base.train.method.to_dict()
    for name in FILES:
        params = inspect.signature(configs.sibling_module(os.path.join(ROOT, "configs", "x.py"), name).get_config)
        assert all(p.default is not inspect.Parameter.empty for p in params.parameters.values()), name


def test_sibling_names_a_missing_file():
    with pytest.raises(FileNotFoundError, match="no_such_config"):
        _load("no_such_config")


def test_experiment_head_defaults():
    c = configs.experiment("runs/x")
    assert c.to_dict() == {"run_dir": "runs/x", "model": {"name": "smollm2-135m", "dtype": "float32"},
                           "precompile": True, "prompt_style": "plain", "max_new_tokens": 10}

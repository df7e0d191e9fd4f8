"""Every notebook in notebooks/ executes top to bottom (nbclient), so a notebook that breaks fails CI.

Convention for notebooks (see notebooks/README.md): a notebook reads the model name from the environment variable
``KVJAX_NOTEBOOK_MODEL`` (default: the real model, e.g. ``"smollm2-135m"``) and writes files only under
``KVJAX_NOTEBOOK_OUT``. CI runs every notebook with ``KVJAX_NOTEBOOK_MODEL=tiny-random`` (a 2-layer random model with
SmolLM2's tokenizer: the same cells in seconds); the run with the real model is marked slow. New notebooks are picked
up automatically; their outputs are never written back by these tests.
"""
from __future__ import annotations

import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def execute(path: str, model: str, out_dir, timeout: int):
    """Runs the notebook at ``path`` in a fresh kernel with the model switch set; returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env = {"KVJAX_NOTEBOOK_MODEL": model, "KVJAX_NOTEBOOK_OUT": str(out_dir), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def _errors(nb) -> list[str]:
    return [o.get("ename", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]


def test_notebooks_exist_and_follow_the_convention():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "compare_methods.ipynb", "write_your_own_method.ipynb",
            "inside_the_cache.ipynb"} <= names
    for path in NOTEBOOKS:
        text = open(path).read()
        assert "KVJAX_NOTEBOOK_MODEL" in text, f"{path} does not read KVJAX_NOTEBOOK_MODEL (see notebooks/README.md)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes_on_tiny_model(path, tmp_path):
    nb = execute(path, "tiny-random", tmp_path, timeout=300)
    assert not _errors(nb)
    assert any(o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes_on_real_model(path, tmp_path):
    nb = execute(path, "smollm2-135m", tmp_path, timeout=1800)
    assert not _errors(nb)

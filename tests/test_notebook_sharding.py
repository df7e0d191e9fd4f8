"""notebooks/sharding.ipynb executes on the tiny random model (8 simulated CPU devices, set by its first cell).

When ``tests/test_notebooks.py`` (which executes every notebook in notebooks/) is present, it covers this notebook and
this test steps aside, so the notebook is not executed twice in CI."""
from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "notebooks", "sharding.ipynb")


@pytest.mark.skipif(os.path.exists(os.path.join(ROOT, "tests", "test_notebooks.py")),
                    reason="tests/test_notebooks.py executes every notebook")
def test_sharding_notebook_executes(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(PATH, as_version=4)
    env = {"KVJAX_NOTEBOOK_MODEL": "tiny-random", "KVJAX_NOTEBOOK_OUT": str(tmp_path), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this environment
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": os.path.dirname(PATH)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "8 cpu devices" in text and "mesh: {'data': 1, 'model': 2, 'sequence': 4}" in text
    assert "refused: mesh axis model:3 does not divide" in text
    assert "sharded:  " in text and "max |logit diff|" in text
    assert (tmp_path / "sharding-experiment" / "results.jsonl").exists()

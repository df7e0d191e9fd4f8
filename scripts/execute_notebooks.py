"""Executes notebooks top to bottom and stores their outputs in the files (how notebooks/ outputs are made).

Usage: python scripts/execute_notebooks.py [--model smollm2-135m] [--timeout 3600] notebooks/NAME.ipynb ...
The model goes to the notebooks as KVJAX_NOTEBOOK_MODEL (see notebooks/README.md); the file is replaced atomically
only when every cell ran without error.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> int:
    import nbformat
    from nbclient import NotebookClient

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    a = p.parse_args(argv)
    os.environ.update(KVJAX_NOTEBOOK_MODEL=a.model,
                      PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    failed = []
    for path in a.notebooks:
        nb = nbformat.read(path, as_version=4)
        t0 = time.time()
        try:
            NotebookClient(nb, timeout=a.timeout, kernel_name="python3",
                           resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}}).execute()
        except Exception as e:  # noqa: BLE001 (report, keep the file as it was, go on with the next notebook)
            print(f"{path}: FAILED after {time.time() - t0:.0f} s: {str(e)[-2000:]}", file=sys.stderr)
            failed.append(path)
            continue
        fd, tmp = tempfile.mkstemp(suffix=".ipynb", dir=os.path.dirname(os.path.abspath(path)))
        os.close(fd)
        nbformat.write(nb, tmp)
        os.replace(tmp, path)
        print(f"{path}: executed with {a.model} in {time.time() - t0:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

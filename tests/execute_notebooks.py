"""Re-execute chapters in place to refresh their stored outputs (what the book shows).

Usage: ``python tests/execute_notebooks.py book/NN_x.ipynb [...]`` (``make execute NB=...``).
Runs each notebook top to bottom in a fresh kernel from the book/ folder, stores the outputs and
prints the time it took. Set ``FISHR_PROFILE=paper`` to refresh a chapter at the paper profile.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def execute(path: Path, timeout: int = 1800) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)
    return time.perf_counter() - start


if __name__ == "__main__":
    os.environ.setdefault("FISHR_PROGRESS", "0")  # no progress bars in the stored outputs
    for arg in sys.argv[1:]:
        print(f"{arg}: executed in {execute(Path(arg)):.1f} s", flush=True)

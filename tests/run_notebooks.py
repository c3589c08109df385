"""Run nbval over every chapter in book/, one pytest process per notebook, and print the time
each took.

A chapter is checked strictly (outputs must match the stored ones, after the substitutions of
``tests/nbval_sanitize.cfg``) unless its notebook metadata says ``"fishr": {"nbval": "lax"}``;
lax chapters only need to run without error, and cells tagged ``nbval-check-output`` are
still compared. Experiments run in the quick profile and write their records to a temporary
cache, so CI always trains for real. Usage: ``python tests/run_notebooks.py [book/NN_x.ipynb ...]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SANITIZE = ROOT / "tests" / "nbval_sanitize.cfg"


def nbval_mode(path: Path) -> str:
    """``strict`` or ``lax``, from the notebook's ``metadata.fishr.nbval`` (default strict)."""
    mode = json.loads(path.read_text())["metadata"].get("fishr", {}).get("nbval", "strict")
    if mode not in ("strict", "lax"):
        raise ValueError(f"{path}: metadata.fishr.nbval is {mode!r}; use 'strict' or 'lax'.")
    return mode


def run(path: Path, env: dict[str, str]) -> tuple[bool, float, str]:
    mode = nbval_mode(path)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-current-env",
           "--nbval-lax" if mode == "lax" else "--nbval", "--nbval-sanitize-with", str(SANITIZE),
           str(path)]
    start = time.perf_counter()
    ok = subprocess.run(cmd, cwd=ROOT, env=env).returncode == 0
    return ok, time.perf_counter() - start, mode


def main(argv: list[str]) -> int:
    paths = [Path(p).resolve() for p in argv] or sorted((ROOT / "book").glob("*.ipynb"))
    env = dict(os.environ, FISHR_PROFILE=os.environ.get("FISHR_PROFILE", "quick"))
    env.setdefault("FISHR_RESULTS_DIR", tempfile.mkdtemp(prefix="fishr-results-"))
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    rows = []
    for path in paths:
        print(f"\n=== {path.relative_to(ROOT)} ===", flush=True)
        rows.append((path.relative_to(ROOT), *run(path, env)))
    print("\nnotebook                                          mode     time     result")
    for name, ok, seconds, mode in rows:
        print(f"{str(name):<50}{mode:<9}{seconds:6.1f} s  {'passed' if ok else 'FAILED'}")
    failed = sum(not ok for _, ok, _, _ in rows)
    print(f"notebooks: {len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

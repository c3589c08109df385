"""Rewrite the setup cell (cell 1) of every chapter book/NN_*.ipynb with the same text, tagged
``hide-input`` (collapsed on the rendered page; Colab shows it as it is), and turn any
``# NBVAL_CHECK_OUTPUT`` comment into the cell tag ``nbval-check-output``, which nbval reads
the same way and readers never see.

Idempotent. Run from the repository root: ``python tests/update_setup_cells.py [book/NN_x.ipynb ...]``
(no arguments: every chapter).
The release ref is ``v`` + ``fishr_lite.__version__`` (read from fishr_lite/__init__.py).
Only the cell's source changes; its stored output (printed outside Colab) stays as it is.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path.cwd()

SETUP_TAG = "hide-input"
MARKER, MARKER_TAG = "# NBVAL_CHECK_OUTPUT", "nbval-check-output"

SETUP_CELL = '''\
# Setup: on Colab only, install fishr_lite from the book's repository at
# the release this book was built with; use the GPU and the paper profile.
import os
import subprocess
import sys

ON_COLAB = "google.colab" in sys.modules
if ON_COLAB:
    repo = os.environ.get("FISHR_REPO",
                          "https://github.com/fishr-book/fishr-book")
    ref = os.environ.get("FISHR_REF", "{ref}")  # pinned release
    clone = os.path.abspath("fishr-book")
    if not os.path.isdir(clone):
        subprocess.run(["git", "-c", "advice.detachedHead=false", "clone",
                        "--quiet", "--depth", "1", "--branch", ref, repo,
                        clone], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                        "-e", clone], check=True)
    sys.path.insert(0, clone)  # fishr_lite from the clone, beside data/

from fishr_lite.profiles import current_profile, default_device

device = default_device()  # CUDA if available; then "paper" by default
if ON_COLAB and device.type != "cuda":
    print("No GPU: for the paper profile choose Runtime > Change runtime "
          "type > GPU and run again. Meanwhile the quick profile runs.")
print(f"profile: {{current_profile()}}, device: {{device.type}}")'''


def release_ref() -> str:
    text = (ROOT / "fishr_lite" / "__init__.py").read_text()
    version = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if not version:
        sys.exit("fishr_lite/__init__.py has no __version__ line")
    return "v" + version.group(1)


def add_tag(cell: dict, tag: str) -> None:
    tags = cell.setdefault("metadata", {}).setdefault("tags", [])
    if tag not in tags:
        tags.append(tag)


def markers_to_tag(cell: dict) -> None:
    """``# NBVAL_CHECK_OUTPUT`` (a line of the source) -> the tag ``nbval-check-output``."""
    lines = "".join(cell["source"]).splitlines(keepends=True)
    if cell["cell_type"] != "code" or not any(line.strip() == MARKER for line in lines):
        return
    kept = [line for line in lines if line.strip() != MARKER]
    while kept and not kept[0].strip():
        kept.pop(0)  # the blank line that followed the marker
    cell["source"] = "".join(kept).rstrip("\n").splitlines(keepends=True)
    add_tag(cell, MARKER_TAG)


def main(argv: list[str]) -> int:
    text = SETUP_CELL.format(ref=release_ref())
    chapters = [Path(a).resolve() for a in argv] or sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
    if not chapters:
        sys.exit("no chapters found: run from the repository root")
    bad = []
    for path in chapters:
        raw = path.read_text()
        nb = json.loads(raw)
        cell = nb["cells"][1]
        if cell["cell_type"] != "code" or "google.colab" not in "".join(cell["source"]):
            bad.append(path.name)
            continue
        cell["source"] = text.splitlines(keepends=True)
        add_tag(cell, SETUP_TAG)
        for other in nb["cells"]:
            markers_to_tag(other)
        new = json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        if new != raw:
            path.write_text(new)
            print(f"updated  {path.relative_to(ROOT)}")
        else:
            print(f"current  {path.relative_to(ROOT)}")
    if bad:
        sys.exit("cell 1 is not a setup cell (code mentioning google.colab) in: " + ", ".join(bad)
                 + "; put one there (copy it from another chapter) and run again")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Write the student edition of the book: every chapter with its solutions taken out.

Usage (from the repository root): ``python tools/student_edition.py [--out DIR] [book/NN_x.ipynb ...]``
(``make student``). For each chapter ``book/NN_slug.ipynb`` it writes ``DIR/book/NN_slug.ipynb``
(default DIR: ``_build/student``) where

- each solution cell (a code cell tagged ``hide-cell``: the cells the rendered book folds
  behind *Show solution*) is replaced by an empty code cell holding ``# Your answer here``;
- every output and execution count is stripped, so a student starts from a clean notebook;
- the Colab badge of the first cell points at the student copy, which the book's workflow
  publishes on the branch ``student`` at the same path (``book/NN_slug.ipynb``), and a line
  under it links the full edition on ``main``.

Everything else (prose, exercises, setup cell, the code that the exercises build on) is kept
as it is. ``tests/test_student_edition.py`` checks that no solution code remains and that no
later cell needs a name that only a solution defines, so the student edition runs with the
answers left blank.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = "fishr-book/fishr-book"  # _config.yml: repository.url
FULL_BRANCH, STUDENT_BRANCH = "main", "student"
ANSWER = "# Your answer here\n"


def colab_url(path: str, branch: str) -> str:
    """The *Open in Colab* link of ``path`` (``book/NN_slug.ipynb``) on ``branch``."""
    return f"https://colab.research.google.com/github/{REPOSITORY}/blob/{branch}/{path}"


def is_solution(cell: dict) -> bool:
    """A solution: a code cell that the rendered book hides behind a toggle."""
    return cell["cell_type"] == "code" and "hide-cell" in cell.get("metadata", {}).get("tags", [])


def answer_cell(solution: dict) -> dict:
    cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
            "source": [ANSWER]}
    if "id" in solution:
        cell["id"] = solution["id"]
    return cell


def student_notebook(nb: dict, path: str) -> dict:
    """The student edition of the chapter ``nb`` stored at ``path`` (``book/NN_slug.ipynb``)."""
    nb = copy.deepcopy(nb)
    cells = []
    for cell in nb["cells"]:
        if is_solution(cell):
            cells.append(answer_cell(cell))
            continue
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
            cell["metadata"].pop("execution", None)
        cells.append(cell)
    first = "".join(cells[0]["source"])
    full, student = colab_url(path, FULL_BRANCH), colab_url(path, STUDENT_BRANCH)
    if full not in first:
        raise ValueError(f"{path}: the first cell has no Colab badge linking {full}")
    badge_end = first.index(full) + len(full) + 1  # after the badge's closing parenthesis
    first = (first[:badge_end].replace(full, student)
             + "\n\n*Student edition: each exercise's solution is replaced by an empty answer "
               f"cell. The [full edition]({full}) has the solutions.*" + first[badge_end:])
    cells[0]["source"] = first.splitlines(keepends=True)
    nb["cells"] = cells
    return nb


def chapters() -> list[Path]:
    return sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


def write(paths: list[Path], out: Path) -> list[Path]:
    written = []
    for path in paths:
        rel = path.resolve().relative_to(ROOT).as_posix()
        nb = student_notebook(json.loads(path.read_text()), rel)
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
        written.append(target)
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="*", type=Path, help="default: every book/NN_*.ipynb")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "student")
    args = parser.parse_args(argv)
    paths = args.chapters or chapters()
    for target in write(paths, args.out):
        print(f"wrote {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

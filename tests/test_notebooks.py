"""Notebook hygiene: every chapter has outputs and no errors, a Colab badge pointing at itself,
the python3 kernel, the setup cell (the same in every chapter, pinned to the release), a
takeaways box, exercises with hidden solutions, and a place in _toc.yml."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

import fishr_lite

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "book").glob("*.ipynb"))


def toc_files() -> set[str]:
    files = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("file", "root"):
                    files.add(str(Path(value).with_suffix("")))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load((ROOT / "_toc.yml").read_text()))
    return files


def test_there_are_chapters():
    assert CHAPTERS, "book/ has no chapters"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_hygiene(path):
    nb = json.loads(path.read_text())
    name = path.relative_to(ROOT).as_posix()
    assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name), f"{name}: name it NN_slug.ipynb"
    assert nb["metadata"]["kernelspec"]["name"] == "python3", f"{name}: kernel must be python3"
    cells = nb["cells"]
    first = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown" and first.lstrip().startswith("# ")
    assert f"colab.research.google.com/github/" in first and f"/blob/main/{name}" in first, (
        f"{name}: the first cell needs a Colab badge pointing at this notebook")
    assert "Learning objectives" in first and "Run time" in first
    assert "google.colab" in "".join(cells[1]["source"]), f"{name}: second cell is the setup cell"
    assert "hide-input" in cells[1]["metadata"].get("tags", []), (
        f"{name}: the setup cell is collapsed on the page; run tests/update_setup_cells.py")
    assert not any("NBVAL_" in "".join(c["source"]) for c in cells), (
        f"{name}: nbval markers are cell tags (nbval-check-output), not visible comments; "
        "run tests/update_setup_cells.py")
    assert any(c["cell_type"] == "markdown" and "{admonition} Takeaways" in "".join(c["source"])
               for c in cells), f"{name}: needs a takeaways box (```{{admonition}} Takeaways)"
    code = [c for c in cells if c["cell_type"] == "code"]
    assert any(c.get("outputs") for c in code), f"{name}: no stored outputs"
    assert all(c.get("execution_count") for c in code if "".join(c["source"]).strip()), (
        f"{name}: a code cell was not executed; run `make execute NB={name}`")
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{name}: stored error output"
    stderr = "".join("".join(o["text"]) for c in code for o in c["outputs"]
                     if o["output_type"] == "stream" and o.get("name") == "stderr")
    assert "Warning" not in stderr, f"{name}: a stored output shows a warning: {stderr[:300]}"
    assert str(path.relative_to(ROOT).with_suffix("")) in toc_files(), f"{name} is not in _toc.yml"
    solutions = [c for c in code if "hide-cell" in c["metadata"].get("tags", [])]
    assert len(solutions) >= 3, f"{name}: needs at least three exercises with hidden solutions"


def test_setup_cell_is_pinned_and_shared():
    """One setup cell for every chapter, cloning the release ``v<fishr_lite.__version__>``."""
    setups = {path.name: "".join(json.loads(path.read_text())["cells"][1]["source"])
              for path in CHAPTERS}
    spec = importlib.util.spec_from_file_location("update_setup_cells", ROOT / "tests" / "update_setup_cells.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    expected = script.SETUP_CELL.format(ref=f"v{fishr_lite.__version__}")
    pin = f'os.environ.get("FISHR_REF", "v{fishr_lite.__version__}")'
    assert pin in expected, f"the setup cell must pin the release: {pin}"
    differ = [name for name, text in setups.items() if text != expected]
    assert not differ, (f"the setup cell of {differ} is not the current one; run "
                        "`python tests/update_setup_cells.py` to rewrite them all")

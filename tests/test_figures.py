"""Every figure of the book is a numbered MyST-NB figure with a caption, referred to by {numref}.

A code cell that draws a figure carries ``metadata.mystnb.figure`` (``name`` fig-<chapter>-<N>,
``caption``); the markdown cell right after it, tagged ``remove-cell``, repeats the caption as
"**Figure C.N.** ..." (C: the chapter's file number, as ``_ext/chapter_figure_numbers.py``
numbers it in the book) for readers of the notebook itself (Jupyter, Colab), where MyST-NB
does not render the metadata. The prose says {numref}`fig-...`, never a bare "Figure N"."""

from __future__ import annotations

import json
import re
import struct
import base64
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
NUMREF = re.compile(r"\{numref\}`(fig-[a-z0-9-]+)`")


def source(cell: dict) -> str:
    return "".join(cell["source"])


def images(cell: dict) -> list[dict]:
    return [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_figures_are_numbered_with_captions(path: Path) -> None:
    cells = json.loads(path.read_text())["cells"]
    chapter, slug = path.stem.split("_", 1)
    chapter, slug = int(chapter), slug.replace("_", "-")
    names = []
    for i, cell in enumerate(cells):
        figure = cell["metadata"].get("mystnb", {}).get("figure")
        if cell["cell_type"] != "code" or not (images(cell) or figure):
            continue
        assert figure and figure.get("caption", "").strip(), (
            f"{path.name} cell {i} draws a figure without metadata.mystnb.figure.caption")
        assert len(images(cell)) == 1, f"{path.name} cell {i}: one figure per cell"
        names.append(figure["name"])
        assert figure["name"] == f"fig-{slug}-{len(names)}", (
            f"{path.name} cell {i}: name the {len(names)}th figure fig-{slug}-{len(names)}")
        twin = cells[i + 1]
        assert twin["cell_type"] == "markdown" and "remove-cell" in twin["metadata"].get("tags", [])
        # the notebook's copy says "Figure C.N" where the caption says {numref}`fig-...-N`
        plain = NUMREF.sub(lambda m: f"Figure {chapter}." + m.group(1).rsplit("-", 1)[1],
                           figure["caption"])
        assert source(twin) == f"**Figure {chapter}.{len(names)}.** {plain}", (
            f"{path.name} cell {i + 1}: the notebook's caption differs from the figure's")
    prose = [source(c) for c in cells
             if c["cell_type"] == "markdown" and "remove-cell" not in c["metadata"].get("tags", [])]
    prose += [c["metadata"]["mystnb"]["figure"]["caption"] for c in cells
              if "figure" in c["metadata"].get("mystnb", {})]
    for text in prose:
        bare = re.search(r"\bFigure \d+\b", text)
        assert not bare, f"{path.name}: say {{numref}}`fig-...` instead of {bare.group(0)!r}"
        for name in NUMREF.findall(text):
            assert name in names, f"{path.name}: {{numref}}`{name}` names no figure here"


def png_size(data: str) -> tuple[int, int]:
    header = base64.b64decode(data[:64])
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_figures_are_drawn_at_twice_the_density(path: Path) -> None:
    """Retina PNGs: the image has twice the pixels of the size it is shown at."""
    for cell in json.loads(path.read_text())["cells"]:
        for output in images(cell):
            shown = output.get("metadata", {}).get("image/png", {}).get("width")
            width, _ = png_size(output["data"]["image/png"])
            assert shown and width >= 2 * shown - 1, (
                f"{path.name}: a figure of {width} px shown at {shown} px; draw it with "
                "fishr_lite.plotting.set_style() (retina PNG) and re-execute the chapter")

"""Number each chapter's figures after its file number: Figure 3.2 is the second figure of
``book/03_fisher_and_hessian``, in the HTML and in every {numref}. Sphinx alone numbers the
figures of an unnumbered table of contents through the whole book (Figure 1 ... Figure 50)."""

from __future__ import annotations

import re
from typing import Any

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment

CHAPTER = re.compile(r"(?:^|/)(\d\d)_[^/]+$")


def number_by_chapter(app: Sphinx, env: BuildEnvironment) -> list[str]:
    """Replace Sphinx's book-wide figure numbers (n,) by (chapter, k), k in page order."""
    changed = []
    for docname, by_type in env.toc_fignumbers.items():
        match = CHAPTER.search(docname)
        figures = by_type.get("figure")
        if not match or not figures:
            continue
        chapter = int(match.group(1))
        ordered = sorted(figures, key=figures.get)  # Sphinx numbered them in page order
        renumbered = {fig_id: (chapter, k) for k, fig_id in enumerate(ordered, start=1)}
        if renumbered != figures:
            by_type["figure"] = renumbered
            changed.append(docname)
    return changed


def setup(app: Sphinx) -> dict[str, Any]:
    # after Sphinx's own TocTreeCollector (priority 500) has assigned its numbers
    app.connect("env-get-updated", number_by_chapter, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

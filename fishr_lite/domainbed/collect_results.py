"""Command line: DomainBed's ``collect_results`` for a sweep folder.

    python -m fishr_lite.domainbed.collect_results --input_dir SWEEP_DIR [--latex]

Prints the result tables (plain text, or LaTeX with ``--latex``) and writes them into the
sweep folder: ``results.txt`` (the text) and ``results.tex`` (a LaTeX document: article,
booktabs, adjustbox, a section "Full DomainBed results", then the tables), as DomainBed's
``scripts/collect_results.py`` does. DomainBed writes only the file of the format it prints;
we write both, so the folder always holds both. The tables are those of
:mod:`.reporting` (DomainBed's layout, plus a line counting corrupt lines skipped and
incomplete runs left out; ``--include_incomplete`` reads them as DomainBed does).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .reporting import SweepReport, build_report

LATEX_HEADER = ("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{adjustbox}\n"
                "\\begin{document}\n\\section{Full DomainBed results}\n")


def latex_document(report: SweepReport) -> str:
    """The report's LaTeX tables as a standalone document (DomainBed's ``results.tex``)."""
    return LATEX_HEADER + report.to_latex() + "\\end{document}\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def collect_results(input_dir: str | os.PathLike, *, latex: bool = False, error: str = "se",
                    include_incomplete: bool = False) -> str:
    """Write ``results.txt`` and ``results.tex`` into ``input_dir``; return the chosen text."""
    report = build_report(input_dir, error=error, include_incomplete=include_incomplete)
    text, tex = report.to_text(), latex_document(report)
    _write(Path(input_dir) / "results.txt", text)
    _write(Path(input_dir) / "results.tex", tex)
    return tex if latex else text


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Parse ``argv``, write both files, print the chosen format and return it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input_dir", required=True, help="the sweep's output folder")
    parser.add_argument("--latex", action="store_true", help="print the LaTeX document")
    parser.add_argument("--error", choices=["se", "std"], default="se",
                        help="error shown after the mean: standard error (DomainBed) or std")
    parser.add_argument("--include_incomplete", action="store_true",
                        help="also read runs without a 'done' marker, as DomainBed does")
    args = parser.parse_args(argv)
    text = collect_results(args.input_dir, latex=args.latex, error=args.error,
                           include_incomplete=args.include_incomplete)
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()

"""Command line: the result tables of a DomainBed sweep folder.

    python -m fishr_lite.domainbed.report --input_dir SWEEP_DIR [--markdown | --latex]

Plain text is DomainBed's ``collect_results.py`` layout; a last line counts the corrupt lines
skipped and the incomplete runs (folders without ``done``, left out unless
``--include_incomplete``). Cells are mean +/- standard error over trials, as in DomainBed
(``--error std`` for the standard deviation).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .reporting import build_report


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Parse ``argv``, print the report and return it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input_dir", required=True, help="the sweep's output folder")
    style = parser.add_mutually_exclusive_group()
    style.add_argument("--latex", action="store_true", help="LaTeX tables (booktabs)")
    style.add_argument("--markdown", action="store_true", help="Markdown tables")
    parser.add_argument("--error", choices=["se", "std"], default="se",
                        help="error shown after the mean: standard error (DomainBed) or std")
    parser.add_argument("--include_incomplete", action="store_true",
                        help="also read runs without a 'done' marker, as DomainBed does")
    parser.add_argument("--output", help="also write the report to this file")
    args = parser.parse_args(argv)
    report = build_report(args.input_dir, error=args.error,
                          include_incomplete=args.include_incomplete)
    text = report.to_latex() if args.latex else report.to_markdown() if args.markdown \
        else report.to_text()
    sys.stdout.write(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()

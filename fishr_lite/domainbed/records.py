"""Read a DomainBed sweep: one folder per run, each with ``results.jsonl`` and a ``done`` marker.

A run writes one JSON record per checkpoint to ``results.jsonl`` (keys ``args``, ``hparams``,
``step``, ``env{i}_in_acc``, ``env{i}_out_acc``, ...) and, once it has finished, an empty file
``done``. DomainBed's own reader (``reporting.load_records``) reads every ``results.jsonl`` it
finds, finished or not, and crashes on a corrupt line. We differ on purpose, in two ways:

- a line that is not a JSON object with an ``args`` key (a truncated last line from a killed
  job, a disk-full write) is skipped with a warning naming the file and the line number, and
  counted in :attr:`SweepRecords.skipped_lines`;
- a run folder without ``done`` is *incomplete*: by default its records are left out (a run
  still training would otherwise enter model selection with its early checkpoints only, and
  the test-domain oracle, which takes the last checkpoint, would pick a half-trained model);
  it is listed in :attr:`SweepRecords.incomplete_runs` so reports show it. Pass
  ``include_incomplete=True`` to read them anyway, as DomainBed does.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.jsonl"
DONE_FILE = "done"


@dataclass
class SweepRecords:
    """The records of a sweep, and what could not be used.

    ``records`` are the checkpoint dictionaries, in DomainBed's schema, of the runs read (run
    folders in sorted order, lines in file order); ``skipped_lines`` lists ``(file, line
    number)`` of each corrupt line skipped; ``incomplete_runs`` lists run folders without
    ``done``; ``n_runs`` counts the run folders seen.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped_lines: list[tuple[str, int]] = field(default_factory=list)
    incomplete_runs: list[str] = field(default_factory=list)
    n_runs: int = 0

    def __len__(self) -> int:
        return len(self.records)

    @property
    def n_skipped_lines(self) -> int:
        return len(self.skipped_lines)

    @property
    def n_incomplete_runs(self) -> int:
        return len(self.incomplete_runs)

    def summary(self) -> str:
        """One line: how many records were read, lines skipped and runs incomplete."""
        return (
            f"{len(self.records)} records from {self.n_runs} run folders; "
            f"{self.n_skipped_lines} corrupt lines skipped; "
            f"{self.n_incomplete_runs} incomplete runs (no '{DONE_FILE}' marker)"
        )

    def to_dataframe(self) -> "pandas.DataFrame":
        """One row per record; ``args`` and ``hparams`` flattened to ``args.x``, ``hparams.y``."""
        import pandas as pd

        return pd.json_normalize(self.records, max_level=1)


def read_results_file(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[int]]:
    """Parse one ``results.jsonl``: its records and the (1-based) numbers of the lines skipped.

    Blank lines are ignored; any other line that is not a JSON object with an ``args`` key is
    skipped with a ``UserWarning`` naming the file and the line.
    """
    records, skipped = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                reason = f"not valid JSON ({error.msg})"
            else:
                if isinstance(record, dict) and isinstance(record.get("args"), dict):
                    records.append(record)
                    continue
                reason = "not a DomainBed record (a JSON object with an 'args' key)"
            skipped.append(number)
            warnings.warn(f"{path}, line {number}: skipped, {reason}", stacklevel=2)
    return records, skipped


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run's folder (see :func:`load_records`), not a log folder."""
    path = Path(path)
    if not path.is_dir() or path.name.startswith("."):
        return False
    if (path / RESULTS_FILE).exists() or (path / DONE_FILE).exists():
        return True
    return len(path.name) == 32 and all(c in "0123456789abcdef" for c in path.name)


def load_records(input_dir: str | os.PathLike, *, include_incomplete: bool = False) -> SweepRecords:
    """Read every run folder directly under ``input_dir`` (see the module docstring).

    A sub-folder is a run if it holds ``results.jsonl`` or ``done``, or if its name is an md5
    digest (32 hexadecimal digits: the sweep names each job's folder so, and creates it when the
    job starts, before the first record). Other folders (``logs/``, submitit's, any name
    starting with ``.``) and files are not runs: neither read nor counted. Incomplete runs are
    listed, and read only with ``include_incomplete``.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise ValueError(
            f"{str(root)!r} is not a directory; pass the sweep's output folder, the one whose "
            f"sub-folders each hold a run's {RESULTS_FILE}."
        )
    sweep = SweepRecords()
    for run_dir in sorted(p for p in root.iterdir() if is_run_folder(p)):
        results, done = run_dir / RESULTS_FILE, (run_dir / DONE_FILE).exists()
        sweep.n_runs += 1
        if not done:
            sweep.incomplete_runs.append(str(run_dir))
            if not include_incomplete:
                continue
        if results.exists():
            records, skipped = read_results_file(results)
            sweep.records.extend(records)
            sweep.skipped_lines.extend((str(results), n) for n in skipped)
    return sweep

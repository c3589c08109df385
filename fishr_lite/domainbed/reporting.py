"""Result tables of a DomainBed sweep, as DomainBed's ``collect_results.py`` prints them.

For each selection method: one table per dataset (rows: algorithms; columns: the test
environment, then ``Avg``), then an averages table (columns: datasets, then ``Avg``).

A cell is ``mean +/- err`` over trials, in percent. DomainBed's ``format_mean`` calls ``err``
the standard error and computes it as ``np.std(accs) / sqrt(n)`` (population std, ddof=0);
that is our default (``error="se"``); ``error="std"`` reports ``np.std(accs)`` itself (ddof=0).
An environment cell averages the trials' selected test accuracies; the dataset's ``Avg`` is the
mean of its environment means (no error; ``X`` when an environment has no trial); an averages
cell first averages each trial over the test environments it has, then takes mean and error
over trials. ``X`` marks a cell without data.

Outputs: :meth:`SweepReport.to_text` (byte for byte DomainBed's text for the tables, then a
line counting skipped corrupt lines and incomplete runs), ``to_markdown``, ``to_latex``, and
``to_dataframe`` (long form, numeric). Datasets DomainBed does not know are kept (after the
known ones, environments named ``env0``, ...), where DomainBed drops them.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from .names import ALGORITHMS, DATASETS, environment_names, ordered
from .records import SweepRecords, load_records
from .selection import (
    SELECTION_METHODS,
    SelectionMethod,
    get_selection_method,
    n_environments,
    selected_accuracies,
)

ERRORS = ("se", "std")


def mean_and_error(accs: Sequence[float], error: str = "se") -> tuple[Optional[float], Optional[float]]:
    """Mean and error of accuracies in [0, 1], in percent: ``(100 m, 100 s / sqrt(n))`` for "se"."""
    if error not in ERRORS:
        raise ValueError(f"error={error!r}; use 'se' (DomainBed's standard error) or 'std'.")
    if len(accs) == 0:
        return None, None
    std = float(np.std(list(accs)))
    err = std / math.sqrt(len(accs)) if error == "se" else std
    return 100 * float(np.mean(list(accs))), 100 * err


@dataclass
class Table:
    """One table: ``means[i][j]`` and ``errs[i][j]`` in percent (``None`` where no data)."""

    title: str
    selection: str
    name: str  # the dataset, or "Averages"
    row_labels: list[str]
    col_labels: list[str]
    means: list[list[Optional[float]]]
    errs: list[list[Optional[float]]]
    n_trials: list[list[int]]

    def cell(self, i: int, j: int, pm: str = " +/- ") -> str:
        mean, err = self.means[i][j], self.errs[i][j]
        if mean is None:
            return "X"
        return f"{mean:.1f}" if err is None else f"{mean:.1f}{pm}{err:.1f}"

    def to_dataframe(self) -> "pandas.DataFrame":
        """The table as displayed: algorithms x columns of formatted strings."""
        import pandas as pd

        cells = [[self.cell(i, j, " ± ") for j in range(len(self.col_labels))]
                 for i in range(len(self.row_labels))]
        frame = pd.DataFrame(cells, index=self.row_labels, columns=self.col_labels)
        frame.index.name = "Algorithm"
        return frame


def _row_of_means(means: list[Optional[float]]) -> Optional[float]:
    return None if any(m is None for m in means) or not means else sum(means) / len(means)


def dataset_table(rows: list[dict], dataset: str, method: str, algorithms: list[str],
                  env_names: list[str], error: str = "se") -> Table:
    """Table of one dataset: mean/error over trials per (algorithm, test environment), and Avg."""
    accs: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r["dataset"] == dataset:
            accs[(r["algorithm"], r["test_env"])].append(r["acc"])
    means, errs, counts = [], [], []
    for algorithm in algorithms:
        cells = [mean_and_error(accs[(algorithm, t)], error) for t in range(len(env_names))]
        row_means = [m for m, _ in cells]
        means.append(row_means + [_row_of_means(row_means)])
        errs.append([e for _, e in cells] + [None])
        n = [len(accs[(algorithm, t)]) for t in range(len(env_names))]
        counts.append(n + [min(n) if n else 0])
    title = f"Dataset: {dataset}, model selection method: {method}"
    return Table(title, method, dataset, algorithms, env_names + ["Avg"], means, errs, counts)


def averages_table(rows: list[dict], method: str, algorithms: list[str], datasets: list[str],
                   error: str = "se") -> Table:
    """Per (algorithm, dataset): each trial's mean over test environments, then mean/error."""
    per_trial: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        per_trial[(r["algorithm"], r["dataset"], r["trial_seed"])].append(r["acc"])
    means, errs, counts = [], [], []
    for algorithm in algorithms:
        cells, n = [], []
        for dataset in datasets:
            trial_means = [float(np.mean(v)) for (a, d, _), v in per_trial.items()
                           if (a, d) == (algorithm, dataset)]
            cells.append(mean_and_error(trial_means, error))
            n.append(len(trial_means))
        row_means = [m for m, _ in cells]
        means.append(row_means + [_row_of_means(row_means)])
        errs.append([e for _, e in cells] + [None])
        counts.append(n + [min(n) if n else 0])
    title = f"Averages, model selection method: {method}"
    return Table(title, method, "Averages", algorithms, datasets + ["Avg"], means, errs, counts)


@dataclass
class SweepReport:
    """All tables of a sweep, per selection method, with what was skipped while reading."""

    sweep: SweepRecords
    tables: list[Table] = field(default_factory=list)
    error: str = "se"

    def table(self, name: str, method: str | type[SelectionMethod]) -> Table:
        """The table of dataset ``name`` (or ``"Averages"``) under a selection method."""
        label = get_selection_method(method).name
        for t in self.tables:
            if t.name == name and t.selection == label:
                return t
        raise ValueError(f"no table {name!r} for {label!r}; pick one of these (name, method): "
                         f"{sorted({(t.name, t.selection) for t in self.tables})}")

    def footer(self) -> str:
        kind = "standard error (DomainBed)" if self.error == "se" else "standard deviation"
        return (f"Cells: mean +/- {kind} over trials, in %. "
                f"Skipped corrupt lines: {self.sweep.n_skipped_lines}; "
                f"incomplete runs (no 'done'): {self.sweep.n_incomplete_runs}")

    def to_text(self) -> str:
        """DomainBed's plain-text layout (fixed-width columns), then the footer line."""
        out = [f"Total records: {len(self.sweep)}"]
        for t in self.tables:
            width = 25 if t.name == "Averages" else 20
            out += ["", f"-------- {t.title}"]
            for row in [["Algorithm", *t.col_labels]] + [
                [label, *(t.cell(i, j) for j in range(len(t.col_labels)))]
                for i, label in enumerate(t.row_labels)
            ]:
                out.append("  ".join(str(x).ljust(width)[:width] for x in row) + " ")
        return "\n".join(out) + "\n\n" + self.footer() + "\n"

    def to_markdown(self) -> str:
        """One pipe table per dataset and method, with ``±``."""
        out = [f"Total records: {len(self.sweep)}"]
        for t in self.tables:
            out += ["", f"#### {t.title}", "",
                    "| Algorithm | " + " | ".join(t.col_labels) + " |",
                    "|---|" + "---|" * len(t.col_labels)]
            for i, label in enumerate(t.row_labels):
                cells = [t.cell(i, j, " ± ") for j in range(len(t.col_labels))]
                out.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(out) + "\n\n" + self.footer() + "\n"

    def to_latex(self) -> str:
        """A LaTeX fragment (booktabs): a subsection per method, a table per dataset."""
        esc = lambda s: str(s).replace("%", r"\%").replace("_", r"\_")
        out, current = [f"% Total records: {len(self.sweep)}"], None
        for t in self.tables:
            if t.selection != current:
                current = t.selection
                out += ["", rf"\subsection{{Model selection: {esc(current)}}}"]
            out += ["", rf"\subsubsection{{{esc(t.name)}}}", r"\begin{center}",
                    r"\adjustbox{max width=\textwidth}{%",
                    r"\begin{tabular}{l" + "c" * len(t.col_labels) + "}", r"\toprule",
                    " & ".join(rf"\textbf{{{esc(c)}}}" for c in ["Algorithm", *t.col_labels])
                    + r" \\", r"\midrule"]
            for i, label in enumerate(t.row_labels):
                cells = [t.cell(i, j, r" $\pm$ ") for j in range(len(t.col_labels))]
                out.append(" & ".join([esc(label), *cells]) + r" \\")
            out += [r"\bottomrule", r"\end{tabular}}", r"\end{center}"]
        return "\n".join(out) + "\n\n% " + self.footer() + "\n"

    def to_dataframe(self) -> "pandas.DataFrame":
        """Long form: table, selection, algorithm, column, mean, err, n_trials (percent)."""
        import pandas as pd

        rows = [{"table": t.name, "selection": t.selection, "algorithm": label, "column": col,
                 "mean": t.means[i][j], "err": t.errs[i][j], "n_trials": t.n_trials[i][j]}
                for t in self.tables for i, label in enumerate(t.row_labels)
                for j, col in enumerate(t.col_labels)]
        return pd.DataFrame(rows)


def build_report(sweep: SweepRecords | str | os.PathLike,
                 methods: Sequence[type[SelectionMethod]] = tuple(SELECTION_METHODS),
                 error: str = "se", **load_options: Any) -> SweepReport:
    """Tables of a sweep (its records, or its folder read with :func:`.load_records`)."""
    if not isinstance(sweep, SweepRecords):
        sweep = load_records(sweep, **load_options)
    mean_and_error([], error)  # validates ``error``
    records = sweep.records
    algorithms = ordered([r["args"]["algorithm"] for r in records], ALGORITHMS)
    datasets = ordered(sorted({r["args"]["dataset"] for r in records}), DATASETS)
    n_envs = {r["args"]["dataset"]: n_environments(r) for r in records}
    report = SweepReport(sweep, error=error)
    for method in methods:
        rows = selected_accuracies(records, method)
        for dataset in datasets:
            envs = environment_names(dataset, n_envs[dataset])
            report.tables.append(dataset_table(rows, dataset, method.name, algorithms, envs, error))
        report.tables.append(averages_table(rows, method.name, algorithms, datasets, error))
    return report

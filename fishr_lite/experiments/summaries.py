"""Colored MNIST records as tables: mean ± std over restarts, histories in long form, text.

The records are those of :func:`fishr_lite.experiments.coloredmnist.run` (one per algorithm
and restart); ``coloredmnist`` re-exports :func:`summarize`, :func:`histories` and
:func:`format_table`.
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any, Sequence

METRICS = ("train_acc", "test_acc", "gray_test_acc")


def require_pandas() -> ModuleType:
    """The pandas module, or an ImportError that says how to install it."""
    try:
        import pandas
    except ImportError as error:
        raise ImportError("summaries need pandas: pip install pandas "
                          "(or pip install 'fishr-lite[book]')") from error
    return pandas


def _config_columns(config: dict) -> dict[str, Any]:
    """A record's configuration as flat columns: dict or list values (``objective_options``,
    a diagnostics callback's settings) as canonical JSON, so that they can be grouped."""
    flat = {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
            for k, v in config.items()}
    flat.setdefault("objective_options", json.dumps({}))
    return flat


def summarize(records: Sequence[dict]) -> "pandas.DataFrame":
    """Mean ± std over restarts of the final accuracies, in %: a pandas DataFrame.

    One row per configuration up to the restart, indexed by ``algorithm``, ``label_flip`` and
    any other configuration field that differs between the records (an ablation's penalty
    weight, say). Columns: ``restarts``, then ``{train,test,gray_test}_acc_{mean,std}``; std
    is the population std (numpy's default), as the script reports it.
    """
    pd = require_pandas()

    frame = pd.DataFrame([{**_config_columns(r["config"]),
                           **{m: 100 * r["result"][m] for m in METRICS}} for r in records])
    if frame.empty:
        return pd.DataFrame(columns=["restarts", *(f"{m}_{s}" for m in METRICS
                                                  for s in ("mean", "std"))])
    varying = [c for c in frame.columns if c not in ("algorithm", "label_flip", "restart", *METRICS)
               and frame[c].nunique() > 1]
    grouped = frame.groupby(["algorithm", "label_flip", *varying], sort=False)
    table = grouped[list(METRICS)].agg(["mean", lambda x: x.std(ddof=0)])
    table.columns = [f"{m}_{'mean' if stat == 'mean' else 'std'}" for m, stat in table.columns]
    table.insert(0, "restarts", grouped.size())
    return table


def histories(records: Sequence[dict]) -> "pandas.DataFrame":
    """Every record's history in long form, one row per logged step (the columns of the
    history of :func:`fishr_lite.experiments.coloredmnist.train`) with its configuration's
    fields as further columns (``algorithm``, ``restart``, ``label_flip``, ...)."""
    pd = require_pandas()

    frames = [pd.DataFrame(r["result"]["history"]).assign(**_config_columns(r["config"]))
              for r in records]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def format_table(table: "pandas.DataFrame") -> str:
    """The summary as text: one line per row of :func:`summarize`, ``mean ± std`` in %."""
    names = list(table.index.names)
    header = f"{' / '.join(names):<32} {'n':>3}  {'train acc':>13}  {'test acc':>13}  {'gray test acc':>13}"
    lines = [header]
    for index, row in table.iterrows():
        label = " / ".join(str(v) for v in (index if isinstance(index, tuple) else (index,)))
        cells = [f"{row[f'{m}_mean']:5.1f} ± {row[f'{m}_std']:4.1f}" for m in METRICS]
        lines.append(f"{label:<32} {int(row['restarts']):>3}  " + "  ".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)

"""Colored MNIST reports: the published Table 2, profile records, curves with restart bands.

- :func:`published_table2` reads ``data/published/coloredmnist_table2.csv`` (source in that
  folder's README): accuracies in %, ``*_mean`` and ``*_std`` over the paper's 10 restarts.
- :func:`select` keeps the records whose configuration is exactly a profile's (``paper`` by
  default) for their algorithm, whatever the restart: a cache folder may also hold quick runs
  and ablations, and a table must not mix them.
- :func:`beside_published` puts our ``mean ± std`` (from
  :func:`fishr_lite.experiments.summaries.summarize`) next to the published one.
- :func:`curve_bands` and :func:`plot_curves` aggregate a metric of the histories per step
  over restarts: the line is the mean, the band spans min to max (with 2 to 10 restarts a
  min-max band hides nothing; a ± std band would pretend to a precision we do not have).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Callable, Sequence

from fishr_lite.experiments import coloredmnist as cm
from fishr_lite.experiments.summaries import require_pandas
from fishr_lite.results import PACKAGE_DIR

PUBLISHED_TABLE2 = PACKAGE_DIR.parent / "data" / "published" / "coloredmnist_table2.csv"
#: Table 2's metrics, in the order of the paper's columns, with their display names.
METRIC_NAMES = {"train_acc": "train", "test_acc": "test", "gray_test_acc": "gray test"}


def published_table2(path: str | Path | None = None) -> "pandas.DataFrame":
    """Table 2 of the Fishr paper as a DataFrame indexed by algorithm (accuracies in %)."""
    pd = require_pandas()
    path = Path(path) if path is not None else PUBLISHED_TABLE2
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass the path of coloredmnist_table2.csv "
                         "(it ships in the repository's data/published/ folder)")
    return pd.read_csv(path).set_index("algorithm")


def profile_config(algorithm: str, profile: str = "paper", label_flip: float = 0.25,
                   **overrides: Any) -> dict[str, Any]:
    """The configuration of ``algorithm`` under ``profile``, without its ``restart`` field."""
    config = cm.make_configs(algorithm, profile=profile, restarts=1, label_flip=label_flip,
                             **overrides)[0].to_dict()
    config.pop("restart")
    return json.loads(json.dumps(config))  # as stored in a record (JSON round trip)


def select(records: Sequence[dict], profile: str = "paper", label_flip: float = 0.25,
           algorithms: Sequence[str] | None = None, **overrides: Any) -> list[dict]:
    """Records whose configuration is ``profile``'s (with ``label_flip`` and ``overrides``)
    for their algorithm, any restart; sorted by algorithm (``algorithms`` order, default
    :data:`~fishr_lite.experiments.coloredmnist.ALGORITHMS`) then restart."""
    order = list(algorithms) if algorithms is not None else list(cm.ALGORITHMS)
    unknown = [a for a in order if a not in cm.ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown algorithms {unknown}; choose among {cm.ALGORITHMS}")
    expected = {a: profile_config(a, profile, label_flip, **overrides) for a in order}
    kept = [r for r in records if r["config"].get("algorithm") in expected
            and {k: v for k, v in r["config"].items() if k != "restart"}
            == expected[r["config"]["algorithm"]]]
    return sorted(kept, key=lambda r: (order.index(r["config"]["algorithm"]),
                                       r["config"]["restart"]))


def restarts_per_algorithm(records: Sequence[dict]) -> dict[str, list[int]]:
    """``{algorithm: sorted restarts}`` of the records."""
    found: dict[str, list[int]] = {}
    for r in records:
        found.setdefault(r["config"]["algorithm"], []).append(r["config"]["restart"])
    return {a: sorted(v) for a, v in found.items()}


def beside_published(summary: "pandas.DataFrame", published: "pandas.DataFrame",
                     metrics: Sequence[str] = tuple(METRIC_NAMES)) -> "pandas.DataFrame":
    """One row per algorithm of ``summary`` (from ``coloredmnist.summarize``, one label flip):
    ``restarts``, then for each metric ``"<metric> ours"`` and ``"<metric> paper"`` as
    ``"mean ± std"`` strings (``"-"`` where the paper has no number)."""
    pd = require_pandas()
    summary = summary.reset_index()
    if summary["algorithm"].duplicated().any():
        raise ValueError("summary has several rows per algorithm (several label flips or "
                         "settings); select one profile's records with select() first")
    rows = []
    for _, row in summary.iterrows():
        name = row["algorithm"]
        out: dict[str, Any] = {"algorithm": name, "restarts": int(row["restarts"])}
        for m in metrics:
            label = METRIC_NAMES.get(m, m)
            out[f"{label} ours"] = f"{row[f'{m}_mean']:.1f} ± {row[f'{m}_std']:.1f}"
            out[f"{label} paper"] = (f"{published.loc[name, f'{m}_mean']:.1f} ± "
                                     f"{published.loc[name, f'{m}_std']:.1f}"
                                     if name in published.index else "-")
        rows.append(out)
    return pd.DataFrame(rows).set_index("algorithm")


Labeller = Callable[[dict], str]


def _labeller(label: str | Labeller) -> Labeller:
    if callable(label):
        return label
    return lambda record: str(record["config"][label])


def curve_bands(records: Sequence[dict], metric: str,
                label: str | Labeller = "algorithm") -> "pandas.DataFrame":
    """Per (label, step): ``mean``, ``min``, ``max`` and ``n`` (restarts) of ``metric`` in the
    histories; ``label`` is a config field or a function of the record (default algorithm)."""
    pd = require_pandas()
    if not records:
        return pd.DataFrame(columns=["label", "step", "mean", "min", "max", "n"])
    name = _labeller(label)
    missing = [r["key"] for r in records if metric not in r["result"]["history"]]
    if missing:
        known = sorted(records[0]["result"]["history"])
        raise ValueError(f"metric {metric!r} is not in the history of records {missing}; "
                         f"choose one of {known}")
    frame = pd.concat([pd.DataFrame({"step": r["result"]["history"]["step"],
                                     "value": r["result"]["history"][metric],
                                     "label": name(r)}) for r in records])
    grouped = frame.groupby(["label", "step"], sort=False)["value"]
    return grouped.agg(["mean", "min", "max", "size"]).rename(
        columns={"size": "n"}).reset_index()


def plot_curves(records: Sequence[dict], metrics: Sequence[str] = ("test_acc", "fishr_penalty"),
                label: str | Labeller = "algorithm", colors: dict[str, str] | None = None,
                axes: Sequence["matplotlib.axes.Axes"] | None = None,
                anneal_step: int | None = None) -> "matplotlib.figure.Figure":
    """One panel per metric against the step: mean over restarts (line), min-max (band).

    Accuracies are shown in %, penalties on a log scale; ``anneal_step`` draws a dotted line
    where the penalty weight jumps. Returns the figure."""
    import matplotlib.pyplot as plt

    from fishr_lite.plotting import ALGORITHM_COLORS, PALETTE

    if axes is None:
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    colors = {**ALGORITHM_COLORS, **(colors or {})}
    for ax, metric in zip(axes, metrics):
        bands = curve_bands(records, metric, label)
        scale = 100.0 if metric.endswith("acc") else 1.0
        for k, (name, band) in enumerate(bands.groupby("label", sort=False)):
            color = colors.get(name, PALETTE[k % len(PALETTE)])
            n = int(band["n"].max())
            ax.plot(band["step"], scale * band["mean"], color=color, lw=1.5,
                    label=f"{name} (n={n})")
            ax.fill_between(band["step"], scale * band["min"], scale * band["max"],
                            color=color, alpha=0.25, lw=0)
        if metric.endswith("penalty"):
            ax.set_yscale("log")
        if anneal_step is not None:
            ax.axvline(anneal_step, color="grey", ls=":", lw=1)
        ax.set_xlabel("training step")
        ax.set_ylabel(metric.replace("_", " ") + (" (%)" if scale == 100.0 else ""))
    axes[0].legend(fontsize=8)
    fig = axes[0].figure
    fig.tight_layout()
    return fig


def sweep_command(algorithms: Sequence[str], profile: str = "paper", restarts: int = 10,
                  label_flip: float = 0.25, out: str = "data/results") -> str:
    """The command line that runs (or resumes) a sweep; finished runs are read back."""
    args = ["python", "-m", "fishr_lite.experiments.coloredmnist"]
    for a in algorithms:
        args += ["--algorithm", a]
    args += ["--profile", profile, "--restarts", str(restarts), "--label-flip",
             f"{label_flip:g}", "--out", out]
    return shlex.join(args)

"""Tests of fishr_lite.experiments.reporting: published table, record selection, curve bands."""

import shlex

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from fishr_lite.experiments import coloredmnist as cm  # noqa: E402
from fishr_lite.experiments import reporting  # noqa: E402


def fake_record(config: cm.Config, test_accs, penalties=None) -> dict:
    """A record shaped like the cache's, with a history of len(test_accs) logged steps."""
    steps = list(range(0, 10 * len(test_accs), 10))
    penalties = penalties or [1.0] * len(steps)
    history = {"step": steps, "test_acc": list(test_accs), "fishr_penalty": list(penalties)}
    result = {"train_acc": 0.7, "test_acc": test_accs[-1], "gray_test_acc": 0.6,
              "history": history}
    return {"key": f"{config.algorithm}-{config.restart}", "config": config.to_dict(),
            "result": result}


def test_published_table2_has_the_four_algorithms_and_checks_its_path(tmp_path):
    table = reporting.published_table2()
    assert list(table.index) == ["erm", "irm", "vrex", "fishr"]
    assert table["test_acc_mean"].idxmax() == "fishr"
    with pytest.raises(ValueError, match="coloredmnist_table2.csv"):
        reporting.published_table2(tmp_path / "missing.csv")


def test_select_keeps_only_the_profile_configurations_sorted():
    paper = cm.make_configs(["fishr", "erm"], profile="paper", restarts=3)
    quick = cm.make_configs(["erm"], profile="quick", restarts=2)
    ablation = cm.make_configs(["fishr"], profile="paper", restarts=1, penalty_weight=10.0)
    no_flip = cm.make_configs(["erm"], profile="paper", restarts=1, label_flip=0.0)
    ema = cm.make_configs(["fishr"], profile="paper", restarts=2,
                          objective_options={"ema": 0.95})
    records = [fake_record(c, [0.5]) for c in [*paper, *quick, *ablation, *no_flip, *ema]]
    kept = reporting.select(records[::-1])
    assert [(r["config"]["algorithm"], r["config"]["restart"]) for r in kept] == [
        ("erm", 0), ("erm", 1), ("erm", 2), ("fishr", 0), ("fishr", 1), ("fishr", 2)]
    assert len(reporting.select(records, profile="quick")) == 2
    assert len(reporting.select(records, penalty_weight=10.0)) == 1
    assert len(reporting.select(records, label_flip=0.0)) == 1
    assert len(reporting.select(records, objective_options={"ema": 0.95})) == 2
    assert reporting.select(records, algorithms=["irm"]) == []
    assert reporting.restarts_per_algorithm(kept) == {"erm": [0, 1, 2], "fishr": [0, 1, 2]}
    with pytest.raises(ValueError, match="unknown algorithms"):
        reporting.select(records, algorithms=["sgd"])


def test_curve_bands_are_mean_min_max_over_restarts():
    configs = cm.make_configs(["erm", "fishr"], profile="quick", restarts=2)
    accs = {("erm", 0): [0.5, 0.2], ("erm", 1): [0.7, 0.4],
            ("fishr", 0): [0.5, 0.6], ("fishr", 1): [0.5, 0.8]}
    records = [fake_record(c, accs[c.algorithm, c.restart]) for c in configs]
    bands = reporting.curve_bands(records, "test_acc").set_index(["label", "step"])
    np.testing.assert_allclose(bands.loc[("erm", 10), ["mean", "min", "max"]], [0.3, 0.2, 0.4])
    np.testing.assert_allclose(bands.loc[("fishr", 10), ["mean", "min", "max"]],
                               [0.7, 0.6, 0.8])
    assert (bands["n"] == 2).all()
    by_restart = reporting.curve_bands(records, "test_acc",
                                       label=lambda r: f"r{r['config']['restart']}")
    assert set(by_restart["label"]) == {"r0", "r1"}
    with pytest.raises(ValueError, match="not in the history"):
        reporting.curve_bands(records, "vrex_penalty")
    assert reporting.curve_bands([], "test_acc").empty


def test_beside_published_formats_ours_and_the_paper():
    configs = cm.make_configs(["erm", "fishr-fullcov"], profile="quick", restarts=2)
    records = [fake_record(c, [0.1, 0.2 + 0.1 * c.restart]) for c in configs]
    table = reporting.beside_published(cm.summarize(records), reporting.published_table2())
    assert table.loc["erm", "restarts"] == 2
    assert table.loc["erm", "test ours"] == "25.0 ± 5.0"
    assert table.loc["erm", "test paper"] == "14.0 ± 0.7"
    assert table.loc["fishr-fullcov", "test paper"] == "-"
    mixed = records + [fake_record(cm.make_configs("erm", profile="quick", restarts=1,
                                                   label_flip=0.0)[0], [0.9])]
    with pytest.raises(ValueError, match="several rows per algorithm"):
        reporting.beside_published(cm.summarize(mixed), reporting.published_table2())


@pytest.mark.slow
def test_plot_curves_draws_one_line_per_label_and_log_penalty():
    configs = cm.make_configs(["erm", "fishr"], profile="quick", restarts=2)
    records = [fake_record(c, [0.5, 0.6], [1e-3, 1e-5]) for c in configs]
    fig = reporting.plot_curves(records, anneal_step=5)
    acc, penalty = fig.axes
    assert [line.get_label() for line in acc.lines[:2]] == ["erm (n=2)", "fishr (n=2)"]
    np.testing.assert_allclose(acc.lines[0].get_ydata(), [50.0, 60.0])
    assert penalty.get_yscale() == "log" and acc.get_yscale() == "linear"


def test_sweep_command_runs_and_resumes_through_the_cli(tmp_path, capsys):
    command = reporting.sweep_command(["erm"], profile="quick", restarts=1, out=str(tmp_path))
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "fishr_lite.experiments.coloredmnist"]
    tiny = ["--steps", "2", "--fraction", "0.01"]
    assert cm.main(args[3:] + tiny) == 0
    assert len(list((tmp_path / "coloredmnist").glob("*.json"))) == 1
    assert cm.main(args[3:] + tiny) == 0  # resumed: read back, nothing added
    assert len(list((tmp_path / "coloredmnist").glob("*.json"))) == 1
    assert "erm" in capsys.readouterr().out

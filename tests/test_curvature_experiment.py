"""Tests of ``fishr_lite.experiments.curvature``: the chapter "Looking inside"'s diagnostics
callback, its records, and its command line (which resumes without training)."""

from __future__ import annotations

import math

import pytest

from fishr_lite.experiments import coloredmnist as cm
from fishr_lite.experiments import curvature as cv
from fishr_lite.results import ResultsCache

TINY = ["--profile", "quick", "--steps", "4", "--fraction", "0.01", "--hidden-dim", "8"]
TINY_OPTIONS = dict(profile="quick", steps=4, fraction=0.01, hidden_dim=8)
HEAD = {"grad_variance_distance", "empirical_fisher_distance", "fisher_distance",
        "hessian_distance", "inconsistency", "risk_gap", "lambda_max",
        "fisher_hessian_max_diff"}
ARRAYS = {"grad_variance": (9,), "grad_mean": (9,), "hessian_diag": (9,), "hessian": (9, 9),
          "empirical_fisher": (9, 9), "slice_1d": (41,), "slice_2d": (21, 21)}


def shape(value):
    return (len(value), *shape(value[0])) if isinstance(value, list) else ()


def no_training(*args, **kwargs):
    raise AssertionError("a stored run was trained again")


def test_settings_and_keys_are_the_chapters():
    """The settings, hence the records' keys, must not move: stored records depend on them."""
    assert cv.DIAGNOSTICS == {
        "version": 1, "every": 25, "extra_steps": [190], "epsilon": 0.1, "damping": 1e-3,
        "network_steps": [0, 190, -1], "lanczos_steps": 15, "top_k": 2,
        "slice_radius": 3.0, "slice_points": [41, 21]}
    cache = ResultsCache(cm.EXPERIMENT, "unused")
    keys = [cache.key(c) for c in cv.make_configs(profile="paper")]
    assert keys == ["bcf484e6e3c20964", "fdb0ab0950d5c7c7", "1ccf7457b95a2147",
                    "9c9f40cb5eb5040b", "54be3e0fbee24cab", "15470e617dfee151"]
    configs = cv.make_configs(profile="paper")
    assert [(c["algorithm"], c["restart"]) for c in configs] == [
        (a, r) for r in range(3) for a in ("erm", "fishr")]
    assert all(c["hidden_dim"] == 390 and c["fraction"] == 1.0 for c in configs)


def test_restart_selection():
    only = cv.make_configs(profile="quick", restarts=3, only=[2, 4])
    assert [(c["algorithm"], c["restart"]) for c in only] == [
        ("erm", 2), ("fishr", 2), ("erm", 4), ("fishr", 4)]


@pytest.mark.slow
def test_cli_records_the_quantities_and_resumes(tmp_path, capsys, monkeypatch):
    assert cv.main([*TINY, "--restarts", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()[-1]
    assert "2 records in" in out and ", 2 trained" in out
    records, missing = cv.stored_records(cache=tmp_path, restarts=1, **TINY_OPTIONS)
    assert not missing and [r["config"]["algorithm"] for r in records] == ["erm", "fishr"]
    for record in records:
        assert record["config"]["diagnostics"] == cv.DIAGNOSTICS
        rows = record["result"]["diagnostics"]
        last = [r for r in rows if r["step"] == 3]
        pair = {r["quantity"] for r in rows if r["domain"] == cv.PAIR}
        assert pair == HEAD
        assert {r["step"] for r in rows if r["quantity"] == "hessian_distance"} == {0, 3}
        for name in cv.NAMES:
            mine = {r["quantity"]: r["value"] for r in last if r["domain"] == name}
            assert {q: shape(mine[q]) for q in ARRAYS} == ARRAYS
            assert {"risk", "network_eigenvalue_1", "network_eigenvalue_2"} <= set(mine)
        diff = [r["value"] for r in rows if r["quantity"] == "fisher_hessian_max_diff"]
        assert max(diff) < 1e-4  # head Hessian = true Fisher
    table = cv.final_table(records)
    assert list(table.index) == [("erm", 0), ("fishr", 0)]
    assert table.drop(columns="hessian_distance_warmup").notna().all().all()
    assert table["hessian_distance_warmup"].isna().all()  # 4 steps: no warm-up step 190

    # a second call reads every run back: nothing is trained, no file is rewritten
    files = {p: p.read_bytes() for p in tmp_path.rglob("*.json")}
    monkeypatch.setattr(cm, "train", no_training)
    assert cv.main([*TINY, "--restarts", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()[-1]
    assert "2 records in" in out and ", 0 trained" in out
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.json")} == files

    # a restart without a record is reported missing, never trained by the reader
    found, missing = cv.stored_records(cache=tmp_path, restarts=2, **TINY_OPTIONS)
    assert len(found) == 2 and [(c["algorithm"], c["restart"]) for c in missing] == [
        ("erm", 1), ("fishr", 1)]
    assert cv.final_table([]).empty
    assert math.isnan(cv.final_table(found[:1])["hessian_distance_warmup"].iloc[0])


def test_command_line_text():
    assert cv.command() == ("python -m fishr_lite.experiments.curvature --profile paper "
                            "--restarts 3 --out data/results")
    with pytest.raises(SystemExit):
        cv.main(["--algorithm", "nope"])

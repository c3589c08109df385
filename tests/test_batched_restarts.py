"""Restarts trained together (fishr_lite.experiments.coloredmnist_batched) against plain
coloredmnist.train called once per restart, at tiny sizes (a few seconds on one CPU thread).

Tolerance: float32 rounding, not bit equality. The batched step runs its matrix products as
batched products and, inside torch.func, takes the plain Fishr variance where train takes the
row-blocked one, so values differ in their last bits. Measured over these runs: the NLL
(~0.6) within 1.2e-7 absolute (2e-7 relative, about one float32 ulp); the penalties (9e-7 and
up) within 4.4e-9 absolute. Relative to the value that is <= 2e-5, except where a penalty
is a difference of nearby numbers: V-REx's (R_0 - R_1)^2 with R_0 ~ R_1 ~ 0.6 has an absolute
error of order eps * R * |R_0 - R_1|, so its relative error grows as the risks meet (1.1e-4
measured at a value of 5e-6). Hence rtol=1e-4 and atol=1e-8 (2x the largest absolute error
seen, about 1% of the smallest penalty). Accuracies count samples: equal, or one sample apart
(they were equal in every run measured).
"""

from __future__ import annotations

import pytest
import torch

from fishr_lite.experiments import coloredmnist as cm
from fishr_lite.experiments import coloredmnist_batched as batched

# The penalty switches on at step 5 (weight 91257, loss divided by it), then 7 more steps.
TINY = dict(fraction=0.01, steps=12, penalty_anneal_iters=5, hidden_dim=16, history_every=3)
RESTARTS = (1, 3)  # not 0, 1: each restart must seed its own model and data
TABLE_2 = ("erm", "irm", "vrex", "fishr")
RTOL, ATOL = 1e-4, 1e-8


def configs(algorithm: str, **overrides) -> list[cm.Config]:
    return [cm.Config(algorithm=algorithm, restart=r, **{**TINY, **overrides}) for r in RESTARTS]


def assert_same_run(got: dict, expected: dict, samples: int) -> None:
    assert got.keys() == expected.keys() and got["history"].keys() == expected["history"].keys()
    assert got["steps"] == expected["steps"]
    assert got["history"]["step"] == expected["history"]["step"] == [0, 3, 6, 9, 11]
    for key, values in expected["history"].items():
        want, have = torch.tensor(values, dtype=torch.float64), torch.tensor(got["history"][key])
        if key.endswith("_acc"):  # fractions of samples: equal, or one sample apart
            assert (have - want).abs().max() <= 1.0 / samples + 1e-12, key
        else:
            torch.testing.assert_close(have.double(), want, rtol=RTOL, atol=ATOL, msg=key)
        if key != "step":
            assert got[key] == got["history"][key][-1], key


@pytest.mark.parametrize("algorithm", cm.ALGORITHMS)  # Table 2's four, and the two variants
def test_batched_restarts_equal_one_at_a_time_training(algorithm):
    runs = configs(algorithm)
    expected = [cm.train(c, "cpu") for c in runs]
    got = batched.train_restarts(runs, "cpu")
    samples = min(len(env) for env in cm.environments(1, 0.25, TINY["fraction"], "cpu"))
    for one, reference in zip(got, expected):
        assert_same_run(one, reference, samples)
    assert got[0]["history"]["train_nll"] != got[1]["history"]["train_nll"]  # restarts differ
    if algorithm == "erm":  # no penalty anywhere: the batched matrix products are the only change
        assert [g["history"]["penalty"] for g in got] == [e["history"]["penalty"] for e in expected]


def test_refuses_what_it_cannot_batch():
    with pytest.raises(ValueError, match="differ only in 'restart'.*label_flip"):
        mixed = [configs("fishr")[0], configs("fishr", label_flip=0.0)[1]]
        batched.train_restarts(mixed, "cpu")
    with pytest.raises(ValueError, match="repeat"):
        batched.train_restarts(configs("erm")[:1] * 2, "cpu")
    with pytest.raises(ValueError, match="moving average"):
        batched.train_restarts(configs("fishr", objective_options={"ema": 0.95}), "cpu")
    with pytest.raises(ValueError, match="moving average"):  # DomainBed's default ema
        batched.train_restarts(configs("fishr", objective_options={"convention": "domainbed"}),
                               "cpu")
    with pytest.raises(ValueError, match="diagnostics"):
        batched.train_restarts([{**configs("erm")[0].to_dict(), "diagnostics": {}}], "cpu")
    with pytest.raises(ValueError, match="no configurations"):
        batched.train_restarts([], "cpu")


def test_batched_records_are_the_records_train_makes(tmp_path, monkeypatch):
    settings = dict(profile="quick", restarts=2, cache=tmp_path, device="cpu", progress=False,
                    **TINY)
    first = batched.run_batched(["erm", "irm"], **settings)
    assert [(r["config"]["algorithm"], r["config"]["restart"]) for r in first] == [
        ("erm", 0), ("irm", 0), ("erm", 1), ("irm", 1)]  # coloredmnist.run's order
    for record in first:
        assert record["provenance"]["batched"]["restarts"] == [0, 1]
        assert record["provenance"]["wall_time_s"] <= record["provenance"]["batched"]["wall_time_s"]

    def no_training(*args, **kwargs):
        raise AssertionError("a record that train would have made was not accepted")

    monkeypatch.setattr(cm, "train", no_training)
    assert cm.run(["erm", "irm"], **settings) == first  # coloredmnist reads them as its own
    monkeypatch.setattr(batched, "train_restarts", no_training)
    assert batched.run_batched(["irm", "erm"], **settings) == [first[i] for i in (1, 0, 3, 2)]


def test_command_line_trains_the_missing_restarts(tmp_path, capsys):
    arguments = ["--algorithm", "vrex", "--profile", "quick", "--restarts", "2", "--out",
                 str(tmp_path), "--device", "cpu", "--steps", "3", "--fraction", "0.01",
                 "--hidden-dim", "8"]
    assert batched.main(arguments) == 0
    assert "vrex" in capsys.readouterr().out
    records = sorted((tmp_path / "coloredmnist").glob("*.json"))
    assert len(records) == 2
    restarts = cm.make_configs("vrex", profile="quick", restarts=2, steps=3, fraction=0.01,
                               hidden_dim=8)
    assert {cm.as_cache(tmp_path).path(c.to_dict()) for c in restarts} == set(records)

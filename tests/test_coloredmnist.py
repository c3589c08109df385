"""Tests of the Colored MNIST experiment on a tiny profile (a few hundred images, a few steps)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fishr_lite import results
from fishr_lite.experiments import coloredmnist as cm
from fishr_lite.experiments import progress_enabled
from fishr_lite.objectives import DomainBatch
from fishr_lite.results import CorruptRecordWarning, ResultsCache

TINY = dict(fraction=0.01, steps=6, penalty_anneal_iters=3, hidden_dim=16, history_every=2)


def tiny_run(algorithms, tmp_path, restarts=1, progress=False, **overrides):
    settings = {**TINY, **overrides}
    return cm.run(algorithms, profile="quick", restarts=restarts, cache=tmp_path,
                  device="cpu", progress=progress, **settings)


def test_every_algorithm_runs_end_to_end_and_writes_records(tmp_path):
    records = tiny_run(cm.ALGORITHMS, tmp_path)
    assert [r["config"]["algorithm"] for r in records] == list(cm.ALGORITHMS)
    files = sorted((tmp_path / "coloredmnist").glob("*.json"))
    assert len(files) == len(cm.ALGORITHMS)
    for record in records:
        result = record["result"]
        assert json.loads((tmp_path / "coloredmnist" / f"{record['key']}.json").read_text()) == record
        assert result["history"]["step"] == [0, 2, 4, 5]  # every 2 steps, and the last one
        for key in ("train_acc", "test_acc", "gray_test_acc"):
            assert 0.0 <= result[key] <= 1.0
            assert result[key] == result["history"][key][-1]
        penalties = torch.tensor(result["history"]["penalty"])
        assert torch.isfinite(penalties).all()
        algorithm = record["config"]["algorithm"]
        if algorithm == "erm":
            assert (penalties == 0).all()
        else:
            assert (penalties > 0).all()
        for monitored in ("fishr", "vrex", "irm"):  # recorded whatever the algorithm trains
            values = result["history"][f"{monitored}_penalty"]
            assert len(values) == 4 and all(v > 0 for v in values)
            if algorithm == monitored:
                assert values == pytest.approx(result["history"]["penalty"], rel=1e-5)
        assert record["provenance"]["device"] == "cpu"


def test_runs_are_reproducible_and_restarts_differ(tmp_path):
    config = cm.Config(algorithm="fishr", restart=1, **TINY)
    first, second = cm.train(config, "cpu"), cm.train(config, "cpu")
    assert first == second
    other = cm.train(cm.Config(algorithm="fishr", restart=2, **TINY), "cpu")
    assert other["history"]["train_nll"] != first["history"]["train_nll"]


@pytest.mark.slow  # compiles the closed form's kernels (seconds)
def test_a_run_with_the_compiled_closed_form_follows_the_eager_one():
    from fishr_lite.compiled_variance import compiled_closed_form

    config = cm.Config(algorithm="fishr", restart=1, **TINY)
    eager = cm.train(config, "cpu")
    with compiled_closed_form():
        compiled = cm.train(config, "cpu")
    for key in ("train_nll", "penalty", "fishr_penalty"):  # float32 rounding apart, the same run
        assert compiled["history"][key] == pytest.approx(eager["history"][key], rel=1e-4, abs=1e-7), key


def test_model_matches_the_script():
    model = cm.make_model(cm.Config(algorithm="erm"))
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(390, 392), (390,), (390, 390), (390,), (1, 390), (1,)]
    for layer in (model.featurizer[1], model.featurizer[3], model.head):
        assert (layer.bias == 0).all()
        fan_in, fan_out = layer.weight.shape[1], layer.weight.shape[0]
        bound = (6 / (fan_in + fan_out)) ** 0.5  # Xavier uniform
        assert layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.9 * bound
    features, logits = model(torch.rand(5, 2, 14, 14))
    assert features.shape == (5, 390) and logits.shape == (5,)


def test_total_loss_follows_the_script_schedule():
    config = cm.Config(algorithm="fishr", hidden_dim=4, penalty_anneal_iters=10,
                       penalty_weight=100.0, l2_weight=0.5)
    model = cm.make_model(config).double()
    norm = sum(p.pow(2).sum() for p in model.parameters())  # biases included, as the script
    nll, penalty = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    before = cm.total_loss(config, model, nll, penalty, step=9)
    after = cm.total_loss(config, model, nll, penalty, step=10)
    torch.testing.assert_close(before, nll + 0.5 * norm + 1.0 * penalty)
    torch.testing.assert_close(after, (nll + 0.5 * norm + 100.0 * penalty) / 100.0)
    erm = cm.Config(algorithm="erm", hidden_dim=4, penalty_anneal_iters=10, penalty_weight=100.0,
                    l2_weight=0.5)
    torch.testing.assert_close(cm.total_loss(erm, model, nll, penalty, step=10), nll + 0.5 * norm)


def script_loss(config, model, envs):
    """The official script's loss, with per-sample head gradients from a plain autograd loop."""
    nlls, irms, variances = [], [], []
    for env in envs:
        y = env.labels[:, None]
        features = model.featurizer(env.images)
        logits = model.head(features)
        nlls.append(F.binary_cross_entropy_with_logits(logits, y))
        scale = torch.tensor(1.0, dtype=logits.dtype, requires_grad=True)
        (g,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(logits * scale, y),
                                   [scale], create_graph=True)
        irms.append(g**2)
        blocks = []
        for p in (model.head.bias, model.head.weight):  # the script sorts parameter names
            rows = [torch.autograd.grad(F.binary_cross_entropy_with_logits(
                model.head(features[i:i + 1]), y[i:i + 1]), [p], create_graph=True)[0].reshape(-1)
                for i in range(len(env))]  # gradient of the mean loss times the batch size (1)
            grads = torch.stack(rows)
            if config.algorithm != "fishr-notcentered":
                grads = grads - grads.mean(0, keepdim=True)
            if config.algorithm == "fishr-fullcov":
                blocks.append((grads.T @ grads / grads.numel()).reshape(-1))
            else:
                blocks.append(grads.pow(2).mean(0))
        variances.append(torch.cat(blocks))
    mean = (variances[0] + variances[1]) / 2
    penalty = {"irm": torch.stack(irms).mean(), "vrex": (nlls[0] - nlls[1]) ** 2}.get(
        config.algorithm, ((variances[0] - mean) ** 2).sum() + ((variances[1] - mean) ** 2).sum())
    loss = torch.stack(nlls).mean() + config.l2_weight * sum(
        p.norm().pow(2) for p in model.parameters())
    if config.algorithm == "erm":
        return loss
    w = config.penalty_weight
    return (loss + w * penalty) / w


@pytest.mark.parametrize("algorithm", cm.ALGORITHMS)
def test_training_loss_equals_the_script_in_float64(algorithm):
    config = cm.Config(algorithm=algorithm, hidden_dim=6, fraction=0.001, penalty_anneal_iters=0)
    envs = [env for env in cm.environments(0, 0.25, 0.001, "cpu")[:2]]
    model = cm.make_model(config).double()
    with torch.no_grad():  # move off the initialisation, where the biases are all zero
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    objective = cm.make_run_objective(config, model.head)
    batches = []
    for env in envs:
        features, logits = model(env.images.double())
        batches.append(DomainBatch(features, logits, env.labels.double()))
    ours = cm.total_loss(config, model, objective.risks(batches).mean(),
                         objective.penalty(batches), step=1)
    doubled = [dataclasses.replace(env, images=env.images.double(), labels=env.labels.double())
               for env in envs]
    reference = script_loss(config, model, doubled)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=0)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(ours, params, retain_graph=True),
                    torch.autograd.grad(reference, params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)


def test_objectives_follow_the_script_convention():
    torch.manual_seed(0)
    head = torch.nn.Linear(3, 1)
    batches = [DomainBatch(features=torch.randn(6, 3), logits=torch.randn(6),
                           targets=torch.randint(0, 2, (6,)).float()) for _ in range(2)]
    vrex = cm.make_run_objective(cm.Config(algorithm="vrex"), head)
    risks = vrex.risks(batches)
    torch.testing.assert_close(vrex.penalty(batches), (risks[0] - risks[1]) ** 2)
    for algorithm in ("fishr", "fishr-notcentered", "fishr-fullcov"):
        objective = cm.make_run_objective(cm.Config(algorithm=algorithm), head)
        assert objective.moving_average is None  # the script has no moving average
        assert objective.options["coordinate_reduction"] == "sum"
        assert objective.options["domain_reduction"] == "sum"


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_duplicates(tmp_path, monkeypatch):
    real_train = cm.train
    calls = []

    def killed_at_third(config, device=None):
        calls.append((config["algorithm"], config["restart"]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train(config, device)

    monkeypatch.setattr(cm, "train", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(["erm", "fishr"], tmp_path, restarts=2)
    folder = tmp_path / "coloredmnist"
    assert len(list(folder.glob("*.json"))) == 2

    calls.clear()
    monkeypatch.setattr(cm, "train", lambda config, device=None: (
        calls.append((config["algorithm"], config["restart"])) or real_train(config, device)))
    records = tiny_run(["erm", "fishr"], tmp_path, restarts=2)
    assert calls == [("erm", 1), ("fishr", 1)]
    assert len(list(folder.glob("*.json"))) == 4
    assert len({r["key"] for r in records}) == 4

    calls.clear()
    assert tiny_run(["erm", "fishr"], tmp_path, restarts=2) == records
    assert calls == []


def test_corrupt_record_is_reported_and_recomputed(tmp_path):
    records = tiny_run(["erm", "irm"], tmp_path)
    path = tmp_path / "coloredmnist" / f"{records[1]['key']}.json"
    path.write_text(path.read_text()[:100])
    with pytest.warns(CorruptRecordWarning, match=path.name):
        again = tiny_run(["erm", "irm"], tmp_path)
    assert again[0] == records[0]  # read back, not recomputed
    assert again[1]["result"] == records[1]["result"]  # recomputed, same seed, same result
    assert again[1]["provenance"]["date"] >= records[1]["provenance"]["date"]


def test_summarize_mean_and_std_over_restarts():
    def record(algorithm, restart, test_acc):
        return {"config": {"algorithm": algorithm, "restart": restart, "label_flip": 0.25},
                "result": {"train_acc": 0.8, "test_acc": test_acc, "gray_test_acc": 0.5}}

    table = cm.summarize([record("erm", 0, 0.1), record("erm", 1, 0.3), record("fishr", 0, 0.7)])
    assert list(table.index.get_level_values("algorithm")) == ["erm", "fishr"]
    erm = table.loc[("erm", 0.25)]
    assert erm["restarts"] == 2
    assert erm["test_acc_mean"] == pytest.approx(20.0)
    assert erm["test_acc_std"] == pytest.approx(10.0)  # population std, as the script's np.std
    assert table.loc[("fishr", 0.25)]["test_acc_std"] == 0.0
    assert "20.0 ± 10.0" in cm.format_table(table)

    ablation = [record("fishr", 0, 0.6), record("fishr", 0, 0.4)]
    ablation[1]["config"]["penalty_weight"] = 10.0
    ablation[0]["config"]["penalty_weight"] = 1.0
    table = cm.summarize(ablation)  # differing fields become index levels, not restarts
    assert list(table.index.names) == ["algorithm", "label_flip", "penalty_weight"]
    assert list(table["restarts"]) == [1, 1]


def test_histories_long_form(tmp_path):
    records = tiny_run(["erm", "vrex"], tmp_path)
    frame = cm.histories(records)
    assert len(frame) == 2 * 4
    assert set(frame["algorithm"]) == {"erm", "vrex"}
    assert {"step", "test_acc", "penalty", "restart"} <= set(frame.columns)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown algorithm"):
        cm.Config(algorithm="fisher")
    with pytest.raises(ValueError, match="unknown profile"):
        cm.make_configs("erm", profile="fast")
    with pytest.raises(ValueError, match="restarts"):
        cm.make_configs("erm", profile="quick", restarts=0)
    with pytest.raises(ValueError, match="hidden_dim=0 must be >= 1"):
        cm.make_configs("erm", profile="quick", hidden_dim=0)
    with pytest.raises(ValueError, match="experiment"):
        cm.as_cache(ResultsCache("domainbed"))


def test_profiles_and_sweep_order():
    configs = cm.make_configs(["erm", "fishr"], profile="paper")
    assert len(configs) == 20 and {c.fraction for c in configs} == {1.0}
    assert [(c.algorithm, c.restart) for c in configs[:3]] == [("erm", 0), ("fishr", 0), ("erm", 1)]
    paper = configs[0]
    assert (paper.steps, paper.hidden_dim, paper.penalty_anneal_iters) == (501, 390, 190)
    quick = cm.make_configs("erm", profile="quick")
    assert len(quick) == cm.PROFILES["quick"]["restarts"]


def test_progress_is_quiet_in_ci(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CI", "true")
    assert not progress_enabled()
    tiny_run("erm", tmp_path / "quiet", progress=None, steps=1)
    assert "Colored MNIST" not in capsys.readouterr().err
    tiny_run("erm", tmp_path / "shown", progress=True, steps=1)
    assert "Colored MNIST" in capsys.readouterr().err


def test_command_line(tmp_path, capsys):
    argv = ["--algorithm", "erm", "--algorithm", "fishr", "--profile", "quick", "--restarts", "2",
            "--label-flip", "0.25", "--out", str(tmp_path), "--device", "cpu",
            "--steps", "3", "--fraction", "0.01"]
    assert cm.main(argv) == 0
    out = capsys.readouterr().out
    assert "erm" in out and "fishr" in out and "±" in out
    assert len(list((tmp_path / "coloredmnist").glob("*.json"))) == 4


@pytest.mark.slow
def test_module_entry_point(tmp_path):
    env = {**os.environ, "CI": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "fishr_lite.experiments.coloredmnist", "--algorithm", "vrex",
         "--restarts", "1", "--out", str(tmp_path), "--steps", "2", "--fraction", "0.01",
         "--device", "cpu", "--profile", "quick"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "vrex" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "fishr_lite.experiments.coloredmnist", "--algorithm", "lasso"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert bad.returncode != 0 and "invalid choice" in bad.stderr


def test_progress_can_be_switched_off(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("FISHR_PROGRESS", "0")
    assert not progress_enabled()


def test_every_stored_record_resolves_to_its_configuration():
    """The book's evidence: each record in data/results/coloredmnist is found again from its
    configuration, built through today's Config (a change of Config's shape must migrate them)."""
    cache = cm.as_cache(results.PACKAGE_DIR.parent / "data" / "results")
    records = sorted(cache.folder.glob("*.json"))
    assert records, "no stored Colored MNIST records"
    for path in records:
        stored = json.loads(path.read_text())
        fields = {k: v for k, v in stored["config"].items() if k != "diagnostics"}
        config = cm.Config(**fields).to_dict()
        if "diagnostics" in stored["config"]:
            config["diagnostics"] = stored["config"]["diagnostics"]
        assert cache.key(config) == path.stem, path.name
        assert cache.load(config)["result"] == stored["result"], path.name

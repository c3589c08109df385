"""Tests of the ``callback`` of the Colored MNIST ``train``: it sees every step's model before
its update, its records land in the result (and in the cache, under their own key), and it
never changes the training."""

from __future__ import annotations

import pytest
import torch

from fishr_lite.experiments import coloredmnist as cm
from fishr_lite.results import ResultsCache

TINY = dict(fraction=0.01, steps=6, penalty_anneal_iters=3, hidden_dim=16, history_every=2)


def head_norm_callback(every: int = 2):
    """Records ||w_head|| every ``every`` steps, and a gradient of the head (to leave a .grad)
    and a random draw (to consume the global random stream)."""

    def callback(step, model, environments):
        torch.rand(3)  # must not shift the training's random stream
        if step % every:
            return None
        x, y = environments[0].images, environments[0].labels
        _, logits = model(x)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, y).backward()  # leaves .grad
        return [{"step": step, "head_norm": model.head.weight.norm().item(),
                 "n_envs": len(environments)}]

    return callback


def test_callback_records_and_training_unchanged():
    config = cm.Config(algorithm="fishr", restart=1, **TINY)
    plain = cm.train(config, "cpu")
    tracked = cm.train(config, "cpu", callback=head_norm_callback(every=3))
    diagnostics = tracked.pop("diagnostics")
    assert tracked == plain  # the callback changes nothing else in the result
    assert [r["step"] for r in diagnostics] == [0, 3]
    assert all(r["n_envs"] == 4 for r in diagnostics)
    initial = cm.make_model(config).head.weight.norm().item()
    assert diagnostics[0]["head_norm"] == pytest.approx(initial)  # step 0: before the update
    assert diagnostics[1]["head_norm"] != pytest.approx(initial)
    assert "diagnostics" not in plain


def test_callback_sees_every_step_in_order():
    steps = []
    result = cm.train(cm.Config(algorithm="erm", **TINY), "cpu",
                      callback=lambda step, model, envs: steps.append(step))
    assert steps == list(range(TINY["steps"]))
    assert result["diagnostics"] == []  # None returned: no records


def test_diagnostics_settings_change_the_cache_key(tmp_path):
    cache = ResultsCache(cm.EXPERIMENT, tmp_path)
    plain = cm.Config(algorithm="erm", **TINY).to_dict()
    with_diagnostics = {**plain, "diagnostics": {"every": 2, "quantities": ["head_norm"]}}
    assert cache.key(plain) != cache.key(with_diagnostics)
    calls = []

    def fn(config):
        calls.append(config)
        return cm.train(config, "cpu", callback=head_norm_callback(every=2))

    record = cache.get_or_run(with_diagnostics, fn, device="cpu")
    assert record["config"]["diagnostics"] == with_diagnostics["diagnostics"]
    assert [r["step"] for r in record["result"]["diagnostics"]] == [0, 2, 4]
    assert cache.get_or_run(with_diagnostics, fn, device="cpu") == record  # read back
    assert len(calls) == 1
    assert cache.load(plain) is None  # a plain run never reads the diagnostics record


def test_bad_callback_input_is_refused():
    config = {**cm.Config(algorithm="erm", **TINY).to_dict(), "diagnostics": {"every": 2}}
    with pytest.raises(ValueError, match="no callback"):
        cm.train(config, "cpu")
    with pytest.raises(ValueError, match="not callable"):
        cm.train(cm.Config(algorithm="erm", **TINY), "cpu", callback="hessian")


def test_summarize_groups_records_with_dict_valued_settings():
    def record(restart, probes, test_acc):
        config = cm.Config("fishr", restart=restart).to_dict()
        config["diagnostics"] = {"every": 10, "probes": probes}
        return {"config": config,
                "result": {"train_acc": 0.7, "test_acc": test_acc, "gray_test_acc": 0.6}}

    table = cm.summarize([record(0, 4, 0.6), record(1, 4, 0.7), record(0, 8, 0.5)])
    assert list(table["restarts"]) == [2, 1]  # the two diagnostics settings are kept apart
    assert table["test_acc_mean"].iloc[0] == pytest.approx(65.0)

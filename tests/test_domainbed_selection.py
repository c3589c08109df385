"""Model selection on small hand-made records whose right answer is known by construction."""

import math

import pytest

from fishr_lite.domainbed.selection import (
    IIDAccuracySelectionMethod as IID,
    LeaveOneOutSelectionMethod as LOO,
    OracleSelectionMethod as Oracle,
    get_selection_method,
    group_trials,
    selected_accuracies,
)


def record(step, envs, hparams_seed=0, trial_seed=0):
    """envs: one (in_acc, out_acc, is_test) per environment."""
    r = {"args": {"test_envs": [i for i, e in enumerate(envs) if e[2]], "hparams_seed": hparams_seed,
                  "trial_seed": trial_seed, "dataset": "D", "algorithm": "A"}, "step": step}
    for i, (acc_in, acc_out, _) in enumerate(envs):
        r[f"env{i}_in_acc"], r[f"env{i}_out_acc"] = acc_in, acc_out
    return r


def test_iid_picks_checkpoint_with_best_mean_training_out_accuracy():
    run = [record(0, [(0.1, 0.9, True), (0.5, 0.6, False), (0.6, 0.7, False)]),
           record(1, [(0.3, 0.1, True), (0.6, 0.7, False), (0.7, 0.8, False)]),
           record(2, [(0.2, 0.1, True), (0.6, 0.6, False), (0.7, 0.7, False)])]
    assert IID.run_acc(run) == {"val_acc": pytest.approx(0.75), "test_acc": 0.3}
    assert IID.run_acc([]) is None


def test_oracle_takes_last_checkpoint_not_the_best():
    run = [record(1, [(0.85, 0.80, True), (0, 0, False)]), record(0, [(0.9, 0.95, True), (0, 0, False)])]
    assert Oracle.run_acc(run) == {"val_acc": 0.80, "test_acc": 0.85}
    assert Oracle.run_acc([]) is None


def test_leave_one_out_averages_held_out_in_accuracy_and_needs_every_pair():
    single = record(0, [(0.1, 0.0, True), (0.0, 0.0, False), (0.0, 0.0, False)])
    pair1 = record(0, [(0.0, 0.0, True), (0.5, 0.0, True), (0.0, 0.0, False)])
    pair2 = record(0, [(0.0, 0.0, True), (0.0, 0.0, False), (0.6, 0.0, True)])
    assert LOO.run_acc([single, pair1, pair2]) == {"val_acc": pytest.approx(0.55), "test_acc": 0.1}
    assert LOO.run_acc([single, pair1]) is None


def test_sweep_acc_takes_best_draw_and_breaks_ties_toward_larger_hparams_seed():
    a = record(0, [(0.7, 0.8, True)], hparams_seed=0)
    b = record(0, [(0.9, 0.5, True)], hparams_seed=1)
    assert Oracle.sweep_acc([a, b]) == 0.7
    c = record(0, [(0.6, 0.8, True)], hparams_seed=2)  # same val_acc as a
    assert Oracle.sweep_acc([a, b, c]) == 0.6
    nan = record(0, [(0.99, math.nan, True)], hparams_seed=3)
    assert Oracle.sweep_acc([a, nan]) == 0.7
    assert Oracle.sweep_acc([]) is None


def test_runs_with_two_test_envs_join_both_trials():
    r = record(0, [(0.1, 0.1, True), (0.2, 0.2, True), (0.3, 0.3, False)], trial_seed=4)
    assert sorted(group_trials([r])) == [(4, "D", "A", 0), (4, "D", "A", 1)]
    # ... but are never evaluated themselves: no single-test-env run, no selected model
    assert selected_accuracies([r], "iid") == []


def test_get_selection_method_names_and_bad_name():
    assert get_selection_method("oracle") is Oracle
    assert get_selection_method("training-domain validation set") is IID
    assert get_selection_method("LeaveOneOutSelectionMethod") is LOO
    with pytest.raises(ValueError, match="unknown selection method"):
        get_selection_method("best")

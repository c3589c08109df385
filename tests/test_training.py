"""FishrPenalty, the schedules and the optimizer reset (fishr_lite.training), against
transcriptions of the official codes; one default convention across every entry point."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fishr_lite.domainbed.algorithms import FishrAlgorithm
from fishr_lite.grads import loop_grads
from fishr_lite.objectives import DomainBatch, make_objective
from fishr_lite.training import (
    FishrPenalty,
    PenaltySchedule,
    colored_mnist_schedule,
    domainbed_schedule,
    reset_optimizer_state,
)
from test_penalty import TranscribedMovingAverage, binary_problem, domainbed_reference


def test_schedules_match_the_official_codes():
    cm = colored_mnist_schedule()
    assert cm(189) == 1.0 and cm(190) == pytest.approx(91257.18613115903)
    loss, penalty = torch.tensor(2.0), torch.tensor(3.0)
    torch.testing.assert_close(cm.combine(loss, penalty, 0), torch.tensor(5.0))
    torch.testing.assert_close(cm.combine(loss, penalty, 200), torch.tensor((2.0 + 91257.18613115903 * 3.0) / 91257.18613115903))
    db = domainbed_schedule(1000.0, 1500)
    assert db(1499) == 0.0 and db(1500) == 1000.0
    torch.testing.assert_close(db.combine(loss, penalty, 0), loss)
    torch.testing.assert_close(db.combine(loss, penalty, 1500), torch.tensor(3002.0))
    assert db.switches_on(1500) and not db.switches_on(1501)
    assert not PenaltySchedule(5.0, warmup_steps=0).switches_on(0)


def test_reset_optimizer_state_equals_a_fresh_adam():
    torch.manual_seed(7)
    model_a = nn.Linear(3, 1).double()
    model_b = nn.Linear(3, 1).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    opt_a = torch.optim.Adam(model_a.parameters(), lr=0.1)
    for _ in range(3):
        opt_a.zero_grad()
        model_a(x).pow(2).sum().backward()
        opt_a.step()
    model_b.load_state_dict(model_a.state_dict())
    reset_optimizer_state(opt_a)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=0.1)
    for model, opt in [(model_a, opt_a), (model_b, opt_b)]:
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb)


@pytest.mark.parametrize("engine", ["closed_form", "backpack", "torch.func"])
def test_default_penalty_is_domainbed_with_its_moving_average_over_steps(engine):
    featurizer, head, xs, ys = binary_problem(sizes=(5, 6))
    fishr = FishrPenalty(head, engine=engine, schedule=domainbed_schedule(10.0, 2))
    fired = []
    fishr.on_switch(lambda: fired.append(True))
    reference = [TranscribedMovingAverage(0.95) for _ in xs]
    for step in range(4):
        zs = [featurizer(x) for x in xs]
        penalty = fishr.penalty(zs, ys)
        grads = loop_grads(head, torch.cat(zs), torch.cat(ys))
        torch.testing.assert_close(penalty, domainbed_reference(grads, [5, 6], reference))
        total = fishr.total_loss(torch.tensor(1.0, dtype=torch.float64), penalty, step)
        torch.testing.assert_close(total, 1.0 + (10.0 if step >= 2 else 0.0) * penalty)
    assert fired == [True]


def test_concatenated_features_with_sizes_equal_per_domain_lists():
    featurizer, head, xs, ys = binary_problem()
    zs = [featurizer(x) for x in xs]
    fishr = FishrPenalty(head, convention="colored_mnist")
    got = fishr.penalty(torch.cat(zs), torch.cat(ys), [len(x) for x in xs])
    torch.testing.assert_close(got, fishr.penalty(zs, ys))
    with pytest.raises(ValueError, match="domain_sizes"):
        fishr.penalty(torch.cat(zs), torch.cat(ys))


class _Featurizer(nn.Sequential):
    n_outputs = 3

    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(4, 3), nn.Tanh())


def test_every_entry_point_gives_the_same_default_penalty():
    """FishrPenalty, the fishr objective and DomainBed's Fishr, all left at their defaults."""
    torch.manual_seed(12)
    hparams = {"lr": 0.01, "weight_decay": 0.0, "lambda": 1.0, "penalty_anneal_iters": 0, "ema": 0.95}
    algorithm = FishrAlgorithm((1, 2, 2), 3, 2, hparams, featurizer=_Featurizer()).double()
    head = copy.deepcopy(algorithm.classifier)
    featurizer = copy.deepcopy(algorithm.featurizer)
    minibatches = [(torch.randn(n, 1, 2, 2, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (6, 7)]
    zs = [featurizer(x) for x, _ in minibatches]
    ys = [y for _, y in minibatches]
    by_object = FishrPenalty(head, loss="ce").penalty(zs, ys)
    domains = [DomainBatch(z, head(z), y) for z, y in zip(zs, ys)]
    by_objective = make_objective("fishr", head, "ce").penalty(domains)
    by_algorithm = algorithm.update(minibatches)["penalty"]
    torch.testing.assert_close(by_objective, by_object)
    assert by_algorithm == pytest.approx(by_object.item(), rel=1e-12)
    # and that value is DomainBed's, transcribed (first step: the average is v_e itself)
    grads = loop_grads(head, torch.cat(zs), torch.cat(ys), loss="ce")
    expected = domainbed_reference(grads, [6, 7], [TranscribedMovingAverage(0.95) for _ in ys])
    torch.testing.assert_close(by_object, expected)


def test_a_penalty_for_logging_leaves_training_unchanged():
    featurizer, head, xs, ys = binary_problem(sizes=(6, 6))
    trained, logged = FishrPenalty(head), FishrPenalty(head)
    for step in range(3):
        zs = [featurizer(x) for x in xs]
        with torch.no_grad():
            logged.penalty([3 * z for z in zs], ys)  # a logging call between steps
        logged.penalty([z for z in zs], ys, update=False)
        torch.testing.assert_close(logged.penalty(zs, ys), trained.penalty(zs, ys))


def test_engine_names_and_the_old_alias():
    featurizer, head, xs, ys = binary_problem()
    zs = [featurizer(x) for x in xs]
    new, old = FishrPenalty(head, engine="torch.func"), FishrPenalty(head, engine="functorch")
    assert new.engine == old.engine == "torch.func"
    torch.testing.assert_close(new.penalty(zs, ys), old.penalty(zs, ys))
    with pytest.raises(ValueError, match="unknown engine"):
        FishrPenalty(head, engine="jax")


def test_deprecated_top_level_name_still_works():
    import fishr_lite

    with pytest.warns(DeprecationWarning, match="FishrPenalty"):
        assert fishr_lite.Fishr is FishrPenalty


def test_bad_input_raises_clear_errors():
    featurizer, head, xs, ys = binary_problem()
    z = featurizer(torch.cat(xs))
    y = torch.cat(ys)
    fishr = FishrPenalty(head, convention="colored_mnist")
    with pytest.raises(ValueError, match="at least 2"):
        fishr.penalty([z[:1], z[1:]], [y[:1], y[1:]])
    with pytest.raises(ValueError, match="differ"):
        fishr.penalty([z[:5], z[5:]], [y[:5], y[5:]], domain_sizes=[6, 10])
    with pytest.raises(ValueError, match="one targets tensor per domain"):
        fishr.penalty([z[:5], z[5:]], y)
    with pytest.raises(ValueError, match="NaN or Inf"):
        bad = z.detach().clone()
        bad[0, 0] = float("nan")
        fishr.penalty([bad[:5], bad[5:]], [y[:5], y[5:]])
    with pytest.raises(ValueError, match="convention"):
        FishrPenalty(head, convention="paper")

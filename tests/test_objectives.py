"""Objectives (ERM, IRM, V-REx, Fishr, IGA, CORAL) against independent formulas (float64)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fishr_lite.grads import loop_grads
from fishr_lite.objectives import OBJECTIVES, DomainBatch, make_objective
from fishr_lite.penalty import COLORED_MNIST_CONVENTION, DOMAINBED_CONVENTION, DomainMovingAverage, fishr_penalty


def batches(loss="bce", sizes=(6, 8, 7), d_in=5, d=4, classes=3, seed=0):
    torch.manual_seed(seed)
    featurizer = nn.Sequential(nn.Linear(d_in, d), nn.Tanh()).double()
    head = nn.Linear(d, 1 if loss == "bce" else classes).double()
    domains = []
    for n in sizes:
        z = featurizer(torch.randn(n, d_in, dtype=torch.float64))
        y = torch.randint(0, 2, (n,)).double() if loss == "bce" else torch.randint(0, classes, (n,))
        logits = head(z).squeeze(-1) if loss == "bce" else head(z)
        domains.append(DomainBatch(z, logits, y))
    return featurizer, head, domains


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_risks_are_mean_losses(loss):
    _, head, domains = batches(loss)
    risks = make_objective("erm", head, loss).risks(domains)
    lossfn = F.binary_cross_entropy_with_logits if loss == "bce" else F.cross_entropy
    expected = torch.stack([lossfn(d.logits, d.targets) for d in domains])
    torch.testing.assert_close(risks, expected)
    assert float(make_objective("erm", head, loss).penalty(domains).detach()) == 0.0


def test_irm_matches_closed_form_derivative():
    _, head, domains = batches("bce")
    # d/dw mean_i BCE(w s_i, y_i) at w = 1 is mean_i (sigmoid(s_i) - y_i) s_i
    expected = torch.stack(
        [((torch.sigmoid(d.logits) - d.targets) * d.logits).mean().pow(2) for d in domains]
    ).mean()
    torch.testing.assert_close(make_objective("irm", head).penalty(domains), expected)


def test_vrex_conventions():
    _, head, domains = batches("bce", sizes=(6, 8))
    r = make_objective("erm", head).risks(domains)
    torch.testing.assert_close(make_objective("vrex", head).penalty(domains), (r[0] - r[1]).pow(2))
    db = make_objective("vrex", head, convention="domainbed").penalty(domains)
    torch.testing.assert_close(db, r.var(unbiased=False))


@pytest.mark.parametrize("engine", ["closed_form", "backpack", "functorch"])
@pytest.mark.parametrize(
    "name, options", [("fishr", {}), ("fishr-notcentered", {"centered": False}), ("fishr-fullcov", {"covariance": "full"})]
)
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_fishr_objectives_match_loop_reference(engine, name, options, loss):
    _, head, domains = batches(loss)
    objective = make_objective(name, head, loss, engine=engine)
    z = torch.cat([d.features for d in domains])
    y = torch.cat([d.targets for d in domains])
    grads = loop_grads(head, z, y, loss=loss)
    expected = fishr_penalty(grads, [6, 8, 7], **options, **COLORED_MNIST_CONVENTION)
    torch.testing.assert_close(objective.penalty(domains), expected, rtol=1e-10, atol=1e-14)


def test_fishr_domainbed_convention_keeps_an_ema():
    featurizer, head, domains = batches("ce")
    objective = make_objective("fishr", head, "ce", convention="domainbed")
    reference = DomainMovingAverage(0.95)
    z = torch.cat([d.features for d in domains])
    y = torch.cat([d.targets for d in domains])
    for _ in range(3):
        expected = fishr_penalty(loop_grads(head, z, y, loss="ce"), [6, 8, 7], moving_average=reference, **DOMAINBED_CONVENTION)
        torch.testing.assert_close(objective.penalty(domains), expected)


def test_iga_matches_loop():
    _, head, domains = batches("ce")
    params = list(head.parameters())
    grads = []
    for d in domains:
        risk = F.cross_entropy(d.logits, d.targets)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(risk, params, retain_graph=True)]))
    mean = sum(grads) / len(grads)
    expected = sum((g - mean).pow(2).sum() for g in grads)
    torch.testing.assert_close(make_objective("iga", head, "ce").penalty(domains), expected)


def test_coral_matches_numpy():
    _, head, domains = batches("bce")
    feats = [d.features.detach().numpy() for d in domains]
    terms = []
    for a in range(len(feats)):
        for b in range(a + 1, len(feats)):
            mean_term = ((feats[a].mean(0) - feats[b].mean(0)) ** 2).mean()
            cov_term = ((np.cov(feats[a], rowvar=False) - np.cov(feats[b], rowvar=False)) ** 2).mean()
            terms.append(mean_term + cov_term)
    got = make_objective("coral", head).penalty(domains)
    assert float(got.detach()) == pytest.approx(float(np.mean(terms)), rel=1e-10)


@pytest.mark.parametrize("name", sorted(set(OBJECTIVES) - {"erm"}))
def test_penalty_gradient_reaches_featurizer(name):
    featurizer, head, domains = batches("bce")
    penalty = make_objective(name, head).penalty(domains)
    grad = torch.autograd.grad(penalty, featurizer[0].weight)[0]
    assert grad.abs().sum() > 0


def test_make_objective_errors():
    _, head, _ = batches("bce")
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("dro", head)
    with pytest.raises(ValueError, match="bad options"):
        make_objective("irm", head, engine="backpack")
    with pytest.raises(ValueError, match="unknown loss"):
        make_objective("erm", head, "hinge")
    with pytest.raises(ValueError, match="convention"):
        make_objective("fishr", head, convention="paper")


def test_objective_names():
    _, head, _ = batches("bce")
    for name in OBJECTIVES:
        assert make_objective(name, head).name == name

"""The two-feature toy problem of chapters 1 and 4, and its Newton logistic-regression fit."""

from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F

from fishr_lite.toy import (
    INVARIANT,
    SPURIOUS,
    accuracy,
    feature_strength,
    fit_logistic_regression,
    toy_domain,
    toy_domains,
)


def test_domains_are_reproducible_and_named():
    a, b = toy_domains(200, seed=3), toy_domains(200, seed=3)
    assert [d.name for d in a] == ["train 1", "train 2", "test"]
    for da, db in zip(a, b):
        assert torch.equal(da.features, db.features) and torch.equal(da.labels, db.labels)
    assert not torch.equal(a[0].features, toy_domains(200, seed=4)[0].features)


@pytest.mark.parametrize("p_inv, p_sp", [(0.75, 0.9), (0.6, 0.2)])
def test_sign_agreements_match_the_requested_ones(p_inv, p_sp):
    d = toy_domain(40_000, p_sp, invariant_agreement=p_inv, generator=torch.Generator().manual_seed(0))
    sign = 2 * d.labels - 1
    agree = (torch.sign(d.features) == sign.unsqueeze(1)).double().mean(dim=0)
    assert abs(agree[INVARIANT].item() - p_inv) < 0.01
    assert abs(agree[SPURIOUS].item() - p_sp) < 0.01
    assert abs(d.labels.mean().item() - 0.5) < 0.01


def test_class_means_are_the_strengths():
    sigma = 2.0
    d = toy_domain(40_000, 0.8, invariant_agreement=0.7, sigma=sigma,
                   generator=torch.Generator().manual_seed(1))
    positive = d.features[d.labels == 1].mean(dim=0)
    assert abs(positive[0].item() - sigma * NormalDist().inv_cdf(0.7)) < 0.05
    assert abs(positive[1].item() - feature_strength(0.8, sigma)) < 0.05
    assert abs(d.features[:, 1].std().item() ** 2 - (sigma**2 + feature_strength(0.8, sigma) ** 2)) < 0.1


def test_newton_fit_is_a_stationary_point_of_the_mean_bce():
    d = toy_domains(500, seed=0)[0]
    head = fit_logistic_regression(d.features, d.labels, l2=1e-3)
    loss = F.binary_cross_entropy_with_logits(head(d.features).reshape(-1), d.labels)
    loss = loss + 0.5e-3 * head.weight.pow(2).sum()
    grads = torch.autograd.grad(loss, list(head.parameters()))
    assert max(g.abs().max().item() for g in grads) < 1e-9


def test_invariant_head_recovers_the_bayes_logit():
    # P(y=1 | x_inv) = sigmoid(2 mu x_inv / sigma^2): the fitted slope is 2 mu, the bias 0
    d = toy_domain(100_000, 0.9, generator=torch.Generator().manual_seed(2))
    head = fit_logistic_regression(d.features[:, :1], d.labels)
    assert abs(head.weight.item() - 2 * feature_strength(0.75)) < 0.03
    assert abs(head.bias.item()) < 0.03
    assert abs(accuracy(head, d.features[:, :1], d.labels) - 0.75) < 0.01


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        toy_domain(10, 1.0)
    with pytest.raises(ValueError, match="at least one sample"):
        toy_domain(0, 0.9)
    with pytest.raises(ValueError, match="sigma"):
        toy_domain(10, 0.9, sigma=0.0)
    with pytest.raises(ValueError, match="train_agreements is empty"):
        toy_domains(10, train_agreements=())
    with pytest.raises(ValueError, match="labels"):
        fit_logistic_regression(torch.zeros(5, 2), torch.zeros(4))
    separable = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="separable"):
        fit_logistic_regression(separable, torch.tensor([0.0, 0, 1, 1], dtype=torch.float64), max_steps=5)

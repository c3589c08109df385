"""Objectives (ERM, IRM, V-REx, Fishr, IGA, CORAL) against independent formulas (float64)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fishr_lite.grads import loop_grads
from fishr_lite.objectives import OBJECTIVES, DomainBatch, make_objective


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


def dummy_scale_gradient(logits, targets, loss):
    """d/dw of the mean loss of w * logits at w = 1, by autograd, as both official codes."""
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    risk = (F.binary_cross_entropy_with_logits(logits * scale, targets) if loss == "bce"
            else F.cross_entropy(logits * scale, targets))
    return torch.autograd.grad(risk, [scale], create_graph=True)[0]


def test_irm_script_form_matches_closed_form_derivative():
    _, head, domains = batches("bce")
    # d/dw mean_i BCE(w s_i, y_i) at w = 1 is mean_i (sigmoid(s_i) - y_i) s_i
    expected = torch.stack(
        [((torch.sigmoid(d.logits) - d.targets) * d.logits).mean().pow(2) for d in domains]
    ).mean()
    got = make_objective("irm", head, convention="colored_mnist").penalty(domains)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_irm_domainbed_form_is_the_product_of_two_half_batch_estimates(loss):
    """DomainBed's _irm_penalty: grad on samples 0, 2, 4, ... times grad on 1, 3, 5, ...;
    summed over domains, then divided by their number."""
    _, head, domains = batches(loss)
    total = 0.0
    for d in domains:
        g1 = dummy_scale_gradient(d.logits[::2], d.targets[::2], loss)
        g2 = dummy_scale_gradient(d.logits[1::2], d.targets[1::2], loss)
        total = total + torch.sum(g1 * g2)
    expected = total / len(domains)
    torch.testing.assert_close(make_objective("irm", head, loss).penalty(domains), expected)
    script = make_objective("irm", head, loss, convention="colored_mnist").penalty(domains)
    assert not torch.allclose(script, expected)  # the two forms are different estimates


@pytest.mark.parametrize("convention", ["colored_mnist", "domainbed"])
def test_irm_under_vmap_matches_one_batch_at_a_time(convention):
    """Inside torch.func.vmap (batched restarts) IRM takes torch.func.grad: same values, and
    gradients that reach the logits."""
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)  # (batch, domain, n)
    targets = torch.randint(0, 2, (3, 2, 8)).double()
    irm = make_objective("irm", nn.Linear(1, 1), convention=convention)

    def penalty(s, y):
        return irm.penalty([DomainBatch(s[e, :, None], s[e], y[e]) for e in range(2)])

    batched = torch.func.vmap(penalty)(logits, targets)
    one_at_a_time = torch.stack([penalty(logits[b], targets[b]) for b in range(3)])
    torch.testing.assert_close(batched, one_at_a_time)
    grads = [torch.autograd.grad(p.sum(), logits)[0] for p in (batched, one_at_a_time)]
    torch.testing.assert_close(*grads)


def test_vrex_conventions():
    _, head, domains = batches("bce", sizes=(6, 8))
    r = make_objective("erm", head).risks(domains)
    torch.testing.assert_close(make_objective("vrex", head).penalty(domains),
                               ((r[0] - r[1]) / 2).pow(2))  # DomainBed: mean_e (R_e - Rbar)^2
    script = make_objective("vrex", head, convention="colored_mnist").penalty(domains)
    torch.testing.assert_close(script, (r[0] - r[1]).pow(2))


def plain_fishr(grads, sizes, reduce, centered=True, full=False):
    """Fishr written out: per-domain (co)variances of each parameter's rows, squared distance
    to their mean, ``reduce`` ("sum" or "mean") over coordinates and over domains."""
    per_domain, start = [], 0
    for n in sizes:
        parts = []
        for g in grads.values():
            rows = g[start:start + n].reshape(n, -1)
            dev = rows - rows.mean(0) if centered else rows
            if full:
                divisor = n * rows.shape[1] if reduce == "sum" else n
                parts.append((dev.T @ dev / divisor).reshape(-1))
            else:
                parts.append(sum(dev[i] ** 2 for i in range(n)) / n)
        per_domain.append(torch.cat(parts))
        start += n
    mean = sum(per_domain) / len(per_domain)
    distances = [((v - mean) ** 2).sum() if reduce == "sum" else ((v - mean) ** 2).mean() for v in per_domain]
    return sum(distances) if reduce == "sum" else sum(distances) / len(distances)


@pytest.mark.parametrize("engine", ["closed_form", "backpack", "torch.func"])
@pytest.mark.parametrize(
    "name, options", [("fishr", {}), ("fishr-notcentered", {"centered": False}), ("fishr-fullcov", {"full": True})]
)
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_fishr_objectives_match_plain_formula_on_loop_gradients(engine, name, options, loss):
    _, head, domains = batches(loss)
    objective = make_objective(name, head, loss, engine=engine, convention="colored_mnist")
    z = torch.cat([d.features for d in domains])
    y = torch.cat([d.targets for d in domains])
    expected = plain_fishr(loop_grads(head, z, y, loss=loss), [6, 8, 7], "sum", **options)
    torch.testing.assert_close(objective.penalty(domains), expected, rtol=1e-10, atol=1e-14)


def test_fishr_objective_defaults_to_domainbed_with_its_moving_average():
    featurizer, head, domains = batches("ce")
    objective = make_objective("fishr", head, "ce")
    assert objective.convention == "domainbed" and objective.moving_average.ema == 0.95
    z = torch.cat([d.features for d in domains])
    y = torch.cat([d.targets for d in domains])
    first = plain_fishr(loop_grads(head, z, y, loss="ce"), [6, 8, 7], "mean")
    torch.testing.assert_close(objective.penalty(domains), first)  # step one: the average is v_e
    # step two on the same data: m_e = 0.95 * 0.05 v_e + 0.05 v_e, divided by 0.05, is
    # 1.95 v_e, so the squared distances grow by 1.95^2
    torch.testing.assert_close(objective.penalty(domains), first * 1.95 ** 2)


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

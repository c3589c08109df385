"""Alignment measures, the inconsistency score and the Fisher / GGN / Hessian identities (float64).

Exact identities to 1e-8 (max absolute error). The statistical claim about the empirical
Fisher uses a seeded logistic regression, n = 4000, d = 3: well specified, the relative
Frobenius distance between F_emp and H at the MLE is < 0.1 (measured 0.039); misspecified
(labels 1[|x_0| > 1], not a logistic model), > 0.25 (measured 0.37).
"""

import itertools

import pytest
import torch
from torch import nn

from fishr_lite import diagnostics as dx


def random_spd(d: int, seed: int, shift: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + shift * torch.eye(d, dtype=torch.float64)


def test_relative_frobenius_cosine_trace_ratio_match_formulas():
    a, b = random_spd(5, 0), random_spd(5, 1)
    norm = lambda m: float(torch.sqrt((m * m).sum()))  # noqa: E731
    assert dx.relative_frobenius_distance(a, b) == pytest.approx(2 * norm(a - b) / (norm(a) + norm(b)), rel=1e-12)
    assert dx.relative_frobenius_distance(a, a) == 0.0
    assert dx.relative_frobenius_distance(a, -a) == pytest.approx(2.0)
    da, db = torch.diagonal(a), torch.diagonal(b)
    expected_cos = float((da * db).sum() / (da.square().sum() * db.square().sum()).sqrt())
    assert dx.cosine_similarity(a, b) == pytest.approx(expected_cos, rel=1e-12)
    assert dx.cosine_similarity(da, db) == pytest.approx(expected_cos, rel=1e-12)  # diagonals as vectors
    assert dx.cosine_similarity(da, b) == pytest.approx(expected_cos, rel=1e-12)  # mixed
    flat = float((a * b).sum() / (norm(a) * norm(b)))
    assert dx.cosine_similarity(a, b, diagonal=False) == pytest.approx(flat, rel=1e-12)
    assert dx.trace_ratio(a, b) == pytest.approx(float(da.sum() / db.sum()), rel=1e-12)


def test_pairwise_alignment_records():
    mats = [random_spd(4, s) for s in range(3)]
    rows = dx.pairwise_alignment(mats, names=["a", "b", "c"])
    assert [(r["domain_a"], r["domain_b"]) for r in rows] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert rows[1]["trace_ratio"] == pytest.approx(dx.trace_ratio(mats[0], mats[2]))


def test_alignment_shape_mismatch_raises():
    with pytest.raises(ValueError, match="cannot be compared"):
        dx.relative_frobenius_distance(random_spd(3, 0), random_spd(4, 0))
    with pytest.raises(ValueError, match="cannot be compared"):
        dx.cosine_similarity(random_spd(3, 0), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot be compared"):
        dx.relative_frobenius_distance(random_spd(3, 0), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        dx.trace_ratio(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="one name per domain"):
        dx.pairwise_alignment([random_spd(2, 0)] * 2, names=["only"])


def test_max_generalized_eigenvalue_is_the_inner_maximum():
    h_a, h_b = random_spd(4, 2), random_spd(4, 3) - 0.2 * torch.eye(4, dtype=torch.float64)
    lam = dx.max_generalized_eigenvalue(h_a, h_b)
    expected = torch.linalg.eigvals(torch.linalg.solve(h_a, h_b)).real.max()
    assert lam == pytest.approx(float(expected), rel=1e-10)
    # max of 1/2 t^T H_B t on the ellipsoid 1/2 t^T H_A t = eps: reached, never exceeded
    eps = 0.3
    g = torch.Generator().manual_seed(0)
    t = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    t = t * torch.sqrt(eps / (0.5 * ((t @ h_a) * t).sum(1, keepdim=True)))
    sampled = (0.5 * ((t @ h_b) * t).sum(1)).max()
    assert float(sampled) <= eps * lam + 1e-12 and float(sampled) > 0.9 * eps * lam
    values, vectors = torch.linalg.eig(torch.linalg.solve(h_a, h_b))
    top = vectors[:, values.real.argmax()].real
    top = top * torch.sqrt(eps / (0.5 * top @ h_a @ top))
    assert float(0.5 * top @ h_b @ top) == pytest.approx(eps * lam, rel=1e-10)
    # diagonal curvatures: max_k b_k / a_k
    assert dx.max_generalized_eigenvalue(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])) == pytest.approx(3.0)


def brute_force_score(risks, hessians, eps, damping=0.0):
    best = -float("inf")
    for a, b in itertools.permutations(range(len(risks)), 2):
        h_a = hessians[a] + damping * torch.eye(hessians[a].shape[0], dtype=torch.float64)
        lam = float(torch.linalg.eigvals(torch.linalg.solve(h_a, hessians[b])).real.max())
        best = max(best, risks[b] - risks[a] + eps * max(lam, 0.0))
    return best


def test_inconsistency_score_over_ordered_pairs():
    hessians = [random_spd(4, s) for s in (4, 5, 6)]
    risks = [0.3, 0.5, 0.2]
    result = dx.inconsistency_score(risks, hessians, 0.1, names=["x", "y", "z"])
    assert result.value == pytest.approx(brute_force_score(risks, hessians, 0.1), rel=1e-10)
    assert len(result.pairs) == 6 and result.damping == 0.0 and result.epsilon == 0.1
    best = max(result.pairs, key=lambda r: r["score"])
    assert result.pair == (best["domain_a"], best["domain_b"])
    # with eps = 0 only the risk gap is left: max_{A,B} R_B - R_A
    assert dx.inconsistency_score(risks, hessians, 0.0).value == pytest.approx(0.5 - 0.2)
    # no positive direction in H_B: the inner maximum is 0, not negative
    concave = -0.5 * torch.eye(4, dtype=torch.float64)  # damping 1 keeps it positive definite as H_A
    negative = dx.inconsistency_score([0.0, 0.0], [hessians[0], concave], 1.0, damping=1.0)
    assert negative.pairs[0]["lambda_max"] < 0 and negative.pairs[0]["curvature_term"] == 0.0


def test_inconsistency_singular_h_a_needs_damping_and_reports_it():
    singular = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))
    other = random_spd(3, 7)
    with pytest.raises(ValueError, match=r"domain 0 is not positive definite.*damping > 0"):
        dx.inconsistency_score([0.1, 0.2], [singular, other], 0.1)
    indefinite = torch.diag(torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="not positive definite"):
        dx.inconsistency_score([0.1, 0.2], [indefinite, other], 0.1)
    result = dx.inconsistency_score([0.1, 0.2], [singular, other], 0.1, damping=1e-3)
    assert result.damping == 1e-3
    assert result.value == pytest.approx(brute_force_score([0.1, 0.2], [singular, other], 0.1, 1e-3), rel=1e-10)
    with pytest.raises(ValueError, match="one of each per domain"):
        dx.inconsistency_score([0.1], [singular], 0.1)


def small_model(loss: str, seed: int = 0, mlp_head: bool = False):
    torch.manual_seed(seed)
    classes = 1 if loss == "bce" else 3
    featurizer = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()
    head = (nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, classes)) if mlp_head else nn.Linear(4, classes)).double()
    x = torch.randn(25, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (25,)).double() if loss == "bce" else torch.randint(0, classes, (25,))
    return featurizer, head, (x, y)


def test_model_inconsistency_uses_risks_and_head_hessians():
    featurizer, head, d0 = small_model("ce")
    _, _, d1 = small_model("ce", seed=1)
    result = dx.model_inconsistency(featurizer, head, [d0, d1], 0.05, loss="ce", damping=1e-6)
    risks = dx.domain_risks(featurizer, head, [d0, d1], loss="ce").tolist()
    hessians = dx.hessian(featurizer, head, [d0, d1], loss="ce")
    assert result.value == pytest.approx(brute_force_score(risks, hessians, 0.05, 1e-6), rel=1e-8)
    # CE logits are shift invariant: the head Hessian is singular without damping
    with pytest.raises(ValueError, match="not positive definite"):
        dx.model_inconsistency(featurizer, head, [d0, d1], 0.05, loss="ce")


@pytest.mark.parametrize("params", ["head", "all"])
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_exact_identities_any_model(loss, params):
    featurizer, head, domain = small_model(loss, mlp_head=True)
    for check in (
        dx.covariance_identity(featurizer, head, domain, loss=loss, params=params),
        dx.fisher_ggn_identity(featurizer, head, domain, loss=loss, params=params),
        dx.hessian_decomposition_identity(featurizer, head, domain, loss=loss, params=params),
        dx.expected_empirical_fisher_identity(featurizer, head, domain, loss=loss, params=params),
    ):
        assert check.holds(1e-8), check
        assert float(torch.linalg.norm(check.rhs)) > 1e-3  # not 0 == 0
    # a nonlinear model: H != G (the output-curvature term is not zero), so the check can fail
    gap = dx.ggn_hessian_identity(featurizer, head, domain, loss=loss, params=params)
    assert not gap.holds(1e-4)


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_linear_head_fisher_ggn_hessian_coincide(loss):
    featurizer, head, domain = small_model(loss)
    assert dx.ggn_hessian_identity(featurizer, head, domain, loss=loss).holds(1e-8)
    assert dx.fisher_ggn_identity(featurizer, head, domain, loss=loss).holds(1e-8)
    assert float(dx.output_curvature_term(featurizer, head, domain, loss=loss).abs().max()) < 1e-12


def logistic_data(n: int = 4000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y_model = torch.bernoulli(torch.sigmoid(x @ torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64) + 0.3), generator=g)
    y_other = (x[:, 0].abs() > 1.0).double()
    return x, y_model, y_other


@pytest.mark.slow
def test_logistic_regression_at_optimum():
    x, y_model, y_other = logistic_data()
    distances = {}
    for name, y in (("well", y_model), ("misspecified", y_other)):
        head = dx.fit_logistic_regression(x, y)
        domain = (x, y)
        mean = dx.gradient_moments(None, head, [domain])[0].mean
        assert float(mean.abs().max()) < 1e-12  # the optimum: gbar = 0 ...
        cov = dx.covariance_identity(None, head, domain)
        assert torch.allclose(cov.lhs, dx.empirical_fisher(None, head, [domain])[0], rtol=0, atol=1e-12)  # ... so C = F_emp
        assert dx.fisher_ggn_identity(None, head, domain).holds(1e-8)  # F = G = H: always, for a linear model
        assert dx.ggn_hessian_identity(None, head, domain).holds(1e-8)
        f_emp = dx.empirical_fisher(None, head, [domain])[0]
        distances[name] = dx.relative_frobenius_distance(f_emp, dx.hessian(None, head, [domain])[0])
    assert distances["well"] < 0.1  # labels from the model: F_emp ~ F = H
    assert distances["misspecified"] > 0.25  # the model does not fit the labels: F_emp != H


def test_fit_logistic_regression_bad_shapes():
    with pytest.raises(ValueError, match=r"expected x \(n, d\) and y \(n,\)"):
        dx.fit_logistic_regression(torch.zeros(5, 2), torch.zeros(4))

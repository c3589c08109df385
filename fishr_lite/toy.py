"""A two-feature Gaussian problem with one invariant and one spurious feature (book chapters 1, 4).

Each domain e draws n samples independently: ::

    y ~ Bernoulli(1/2),   s = 2y - 1 in {-1, +1}
    x_inv = mu      * s + sigma * eps_1          (the same in every domain)
    x_sp  = beta_e  * s + sigma * eps_2          (beta_e depends on the domain)
    eps_1, eps_2 ~ N(0, 1) independent

The strengths are set from *agreements*, the accuracy of the sign of each feature:
P(sign(x_inv) = s) = Phi(mu / sigma) = ``invariant_agreement`` in every domain and
P(sign(x_sp) = s) = Phi(beta_e / sigma) = the domain's ``spurious_agreement`` (Phi: standard
normal CDF). An agreement below 1/2 makes the spurious feature anti-correlated with the label.

Because P(y) and P(x_inv | y) are the same in every domain, so is
P(y = 1 | x_inv) = sigmoid(2 mu x_inv / sigma^2): x_inv is an invariant feature. In domain e
the Bayes classifier on both features has logit 2 (mu x_inv + beta_e x_sp) / sigma^2, whose
spurious coefficient changes with the domain.

:func:`fit_logistic_regression` fits the linear head used with it (Newton's method, float64).
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

INVARIANT, SPURIOUS = 0, 1  # columns of ToyDomain.features


@dataclass
class ToyDomain:
    """One domain: ``features`` (n, 2) = [x_inv, x_sp], ``labels`` (n,) float 0/1."""

    name: str
    features: Tensor
    labels: Tensor
    invariant_agreement: float
    spurious_agreement: float

    def __len__(self) -> int:
        return self.labels.shape[0]


def _check_agreement(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"{name}={value} must lie strictly between 0 and 1 (it is the accuracy of the "
            "feature's sign; 0.5 means uninformative, below 0.5 anti-correlated)."
        )


def feature_strength(agreement: float, sigma: float = 1.0) -> float:
    """Class-mean offset m with Phi(m / sigma) = agreement, i.e. m = sigma Phi^{-1}(agreement)."""
    _check_agreement("agreement", agreement)
    return sigma * NormalDist().inv_cdf(agreement)


def toy_domain(
    n: int,
    spurious_agreement: float,
    *,
    invariant_agreement: float = 0.75,
    sigma: float = 1.0,
    name: str = "domain",
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float64,
) -> ToyDomain:
    """Draw one domain of ``n`` samples (see the module docstring for the equations)."""
    if n < 1:
        raise ValueError(f"n={n}; ask for at least one sample per domain.")
    if sigma <= 0:
        raise ValueError(f"sigma={sigma} must be positive (it is the noise standard deviation).")
    _check_agreement("invariant_agreement", invariant_agreement)
    _check_agreement("spurious_agreement", spurious_agreement)
    mu = feature_strength(invariant_agreement, sigma)
    beta = feature_strength(spurious_agreement, sigma)
    labels = torch.randint(0, 2, (n,), generator=generator).to(dtype)
    sign = 2.0 * labels - 1.0
    noise = torch.randn(n, 2, generator=generator, dtype=dtype) * sigma
    features = torch.stack([mu * sign, beta * sign], dim=1) + noise
    return ToyDomain(name, features, labels, invariant_agreement, spurious_agreement)


def toy_domains(
    n_per_domain: int = 5000,
    *,
    train_agreements: Sequence[float] = (0.9, 0.8),
    test_agreement: float = 0.1,
    invariant_agreement: float = 0.75,
    sigma: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> list[ToyDomain]:
    """Training domains (one per entry of ``train_agreements``) then one test domain.

    The defaults mirror Colored MNIST: the invariant feature's sign is right 75% of the time
    everywhere, the spurious one's 90% and 80% in training and 10% at test.
    """
    if len(train_agreements) < 1:
        raise ValueError("train_agreements is empty; pass one spurious agreement per training domain.")
    generator = torch.Generator().manual_seed(seed)
    agreements = list(train_agreements) + [test_agreement]
    names = [f"train {k + 1}" for k in range(len(train_agreements))] + ["test"]
    return [
        toy_domain(n_per_domain, p, invariant_agreement=invariant_agreement, sigma=sigma,
                   name=name, generator=generator, dtype=dtype)
        for name, p in zip(names, agreements)
    ]


def fit_logistic_regression(
    features: Tensor,
    labels: Tensor,
    *,
    l2: float = 0.0,
    max_steps: int = 50,
    tol: float = 1e-10,
) -> nn.Linear:
    """Minimize (1/n) sum_i BCE(w^T z_i + b, y_i) + (l2/2) ||w||^2 by Newton's method.

    With p_i = sigmoid(s_i) and the augmented input a_i = [z_i, 1], each step solves
    H delta = grad, grad = (1/n) sum_i (p_i - y_i) a_i + l2 [w, 0],
    H = (1/n) sum_i p_i (1 - p_i) a_i a_i^T + l2 diag(1, ..., 1, 0). Stops when
    ||grad||_inf < tol. Returns an ``nn.Linear(d, 1)`` in the features' dtype.
    """
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(
            f"features {tuple(features.shape)} and labels {tuple(labels.shape)}: pass (n, d) "
            "features and (n,) 0/1 labels."
        )
    n, d = features.shape
    a = torch.cat([features, features.new_ones(n, 1)], dim=1).detach()
    y = labels.to(a.dtype)
    ridge = torch.full((d + 1,), l2, dtype=a.dtype)
    ridge[-1] = 0.0
    theta = a.new_zeros(d + 1)
    for _ in range(max_steps):
        p = torch.sigmoid(a @ theta)
        grad = a.T @ (p - y) / n + ridge * theta
        if grad.abs().max() < tol:
            break
        hessian = (a * (p * (1 - p)).unsqueeze(1)).T @ a / n + torch.diag(ridge)
        theta = theta - torch.linalg.solve(hessian, grad)
    else:
        raise ValueError(
            f"Newton's method did not converge in {max_steps} steps (the data may be linearly "
            "separable); pass l2 > 0 or raise max_steps."
        )
    head = nn.Linear(d, 1).to(a.dtype)
    with torch.no_grad():
        head.weight.copy_(theta[:d].unsqueeze(0))
        head.bias.copy_(theta[d:])
    return head


def accuracy(head: nn.Module, features: Tensor, labels: Tensor) -> float:
    """Fraction of samples with 1[head(z) > 0] = y."""
    with torch.no_grad():
        predictions = (head(features).reshape(-1) > 0).to(labels.dtype)
    return (predictions == labels).double().mean().item()


__all__ = [
    "INVARIANT",
    "SPURIOUS",
    "ToyDomain",
    "accuracy",
    "feature_strength",
    "fit_logistic_regression",
    "toy_domain",
    "toy_domains",
]

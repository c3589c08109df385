"""The identities between gradient covariance, Fisher, GGN and Hessian, as checkable functions.

Each ``*_identity`` function computes both sides *by different routes* and returns an
:class:`IdentityCheck` (``.max_abs_error``, ``.holds(atol)``), for one domain (x, y):

- ``covariance_identity``          C = F_emp - gbar gbar^T                          (any model)
- ``fisher_ggn_identity``          F = G     (BCE and CE have canonical links:
                                   d^2 l/ds^2 = Cov_{y~p}(dl/ds), whatever y)        (any model)
- ``hessian_decomposition_identity`` H = G + (1/n) sum_i sum_c r_ic d^2 s_ic/dtheta^2 (any model)
- ``ggn_hessian_identity``         H = G     (models linear in theta: a linear head,
                                   logistic regression)
- ``expected_empirical_fisher_identity``  E_{y ~ p_theta}[F_emp(y)] = F, by enumerating the labels

Hence, for a logistic regression (linear in theta), F = G = H at every theta. The empirical
Fisher is F_emp = (1/n) sum_i J_i^T r_i r_i^T J_i, with the *observed* residuals, while F
averages r r^T over the model's own labels: F_emp approaches F = H only when the labels come
from the model (well specified, at its optimum, n large). :func:`fit_logistic_regression`
gives that optimum for the demonstrations; at it gbar = 0, so C = F_emp too.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from fishr_lite.diagnostics.curvature import empirical_fisher, fisher, ggn, hessian
from fishr_lite.diagnostics.functional import (
    Domain,
    check_domains,
    check_full_size,
    flat_parameters,
    outputs_2d,
    select,
    unflatten,
)
from fishr_lite.diagnostics.moments import gradient_moments, per_sample_gradients
from fishr_lite.grads import summed_loss


@dataclass
class IdentityCheck:
    """Two sides of an identity, computed independently."""

    name: str
    lhs: Tensor
    rhs: Tensor

    @property
    def max_abs_error(self) -> float:
        return float((self.lhs - self.rhs).abs().max())

    @property
    def relative_error(self) -> float:
        """||lhs - rhs||_F / ||rhs||_F."""
        return float(torch.linalg.norm(self.lhs - self.rhs) / torch.linalg.norm(self.rhs).clamp_min(1e-300))

    def holds(self, atol: float = 1e-8) -> bool:
        return self.max_abs_error <= atol

    def __repr__(self) -> str:
        return f"IdentityCheck({self.name!r}, max_abs_error={self.max_abs_error:.3g})"


def _one(domain: Domain, loss: str) -> list[Domain]:
    return check_domains([domain], loss)


def covariance_identity(
    featurizer: Optional[nn.Module], head: nn.Module, domain: Domain, *, loss: str = "bce", params: str = "head"
) -> IdentityCheck:
    """(1/n) sum_i (g_i - gbar)(g_i - gbar)^T  ==  (1/n) sum_i g_i g_i^T - gbar gbar^T."""
    moments = gradient_moments(featurizer, head, _one(domain, loss), loss=loss, params=params, full=True)[0]
    second = empirical_fisher(featurizer, head, [domain], loss=loss, params=params)[0]
    return IdentityCheck("C = F_emp - gbar gbar^T", moments.covariance, second - torch.outer(moments.mean, moments.mean))


def fisher_ggn_identity(
    featurizer: Optional[nn.Module], head: nn.Module, domain: Domain, *, loss: str = "bce", params: str = "head"
) -> IdentityCheck:
    """F (predictive covariance of the residual, closed form) == G (autograd loss Hessian)."""
    f = fisher(featurizer, head, _one(domain, loss), loss=loss, params=params)[0]
    g = ggn(featurizer, head, [domain], loss=loss, params=params)[0]
    return IdentityCheck("F = G", f, g)


def ggn_hessian_identity(
    featurizer: Optional[nn.Module], head: nn.Module, domain: Domain, *, loss: str = "bce", params: str = "head"
) -> IdentityCheck:
    """H == G; exact when the logits are linear in theta (an nn.Linear head with params="head")."""
    h = hessian(featurizer, head, _one(domain, loss), loss=loss, params=params)[0]
    g = ggn(featurizer, head, [domain], loss=loss, params=params)[0]
    return IdentityCheck("H = G", h, g)


def output_curvature_term(
    featurizer: Optional[nn.Module], head: nn.Module, domain: Domain, *, loss: str = "bce", params: str = "head"
) -> Tensor:
    """H - G = d^2/dtheta^2 [(1/n) sum_i r_i . s_i(theta)] with the residuals r_i = dl_i/ds_i held fixed."""
    from torch.func import functional_call, hessian as func_hessian

    ((x, y),) = _one(domain, loss)
    module, inputs = select(featurizer, head, x, params)
    theta = flat_parameters(module)
    check_full_size(theta.numel(), "Hessian")
    with torch.enable_grad():
        s = outputs_2d(module(inputs)).detach().requires_grad_(True)
        (residuals,) = torch.autograd.grad(summed_loss(s, y, loss), [s])
    buffers = dict(module.named_buffers())

    def weighted_outputs(flat: Tensor) -> Tensor:
        logits = outputs_2d(functional_call(module, (unflatten(module, flat), buffers), (inputs,)))
        return (residuals * logits).sum() / inputs.shape[0]

    return func_hessian(weighted_outputs)(theta).detach()


def hessian_decomposition_identity(
    featurizer: Optional[nn.Module], head: nn.Module, domain: Domain, *, loss: str = "bce", params: str = "head"
) -> IdentityCheck:
    """H == G + (1/n) sum_i sum_c r_ic d^2 s_ic / dtheta^2 (Gauss-Newton decomposition, any model)."""
    h = hessian(featurizer, head, _one(domain, loss), loss=loss, params=params)[0]
    g = ggn(featurizer, head, [domain], loss=loss, params=params)[0]
    rest = output_curvature_term(featurizer, head, domain, loss=loss, params=params)
    return IdentityCheck("H = G + sum r d2s", h, g + rest)


def _label_configurations(logits: Tensor, loss: str) -> list[tuple[Tensor, Tensor]]:
    """Every label value with its probability per sample: [(labels (n, ...), p (n,))]."""
    s = outputs_2d(logits)
    n, outputs = s.shape
    if loss == "ce":
        p = torch.softmax(s, dim=1)
        return [(torch.full((n,), c, dtype=torch.long, device=s.device), p[:, c]) for c in range(outputs)]
    if outputs > 10:
        raise ValueError(f"enumerating 2^{outputs} BCE label vectors is too many; use fisher(..., mc_samples=K).")
    p = torch.sigmoid(s)
    configurations = []
    for bits in itertools.product((0.0, 1.0), repeat=outputs):
        labels = torch.tensor(bits, dtype=s.dtype, device=s.device).expand(n, outputs)
        configurations.append((labels, torch.where(labels == 1, p, 1 - p).prod(dim=1)))
    return configurations


def expected_empirical_fisher_identity(
    featurizer: Optional[nn.Module], head: nn.Module, domain: Domain, *, loss: str = "bce", params: str = "head"
) -> IdentityCheck:
    """sum_y (1/n) sum_i p_theta(y|x_i) g_i(y) g_i(y)^T (every label y enumerated) == F."""
    ((x, y),) = _one(domain, loss)
    module, inputs = select(featurizer, head, x, params)
    with torch.no_grad():
        logits = module(inputs)
    expected = None
    for labels, probability in _label_configurations(logits, loss):
        rows = per_sample_gradients(module, inputs, labels, loss) * probability.sqrt().unsqueeze(1)
        term = rows.T @ rows / inputs.shape[0]
        expected = term if expected is None else expected + term
    f = fisher(featurizer, head, [domain], loss=loss, params=params)[0]
    return IdentityCheck("E_y~p[F_emp] = F", expected, f)


def fit_logistic_regression(
    x: Tensor, y: Tensor, *, steps: int = 50, ridge: float = 0.0, tol: float = 1e-12
) -> nn.Linear:
    """Maximum-likelihood logistic regression s = w^T x + b by Newton's method (float64 advised):
    theta <- theta - (H + ridge I)^{-1} (grad R + ridge theta), until ||step|| < ``tol``."""
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"expected x (n, d) and y (n,), got {tuple(x.shape)} and {tuple(y.shape)}.")
    design = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    theta = torch.zeros(design.shape[1], dtype=x.dtype, device=x.device)
    eye = torch.eye(design.shape[1], dtype=x.dtype, device=x.device)
    for _ in range(steps):
        p = torch.sigmoid(design @ theta)
        gradient = design.T @ (p - y.to(x.dtype)) / len(y) + ridge * theta
        curvature = (design * (p * (1 - p)).unsqueeze(1)).T @ design / len(y) + ridge * eye
        step = torch.linalg.solve(curvature, gradient)
        theta = theta - step
        if step.norm() < tol:
            break
    head = nn.Linear(x.shape[1], 1).to(dtype=x.dtype, device=x.device)
    with torch.no_grad():
        head.weight.copy_(theta[:-1].unsqueeze(0))
        head.bias.copy_(theta[-1:])
    return head

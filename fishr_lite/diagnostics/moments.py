"""Per-domain moments of per-sample gradients: mean, covariance (diagonal or full), Fishr's v_e.

For domain e with per-sample gradients g_i = d l(f_theta(x_i), y_i) / d theta (``fishr_lite.grads``
convention: gradient of the per-sample loss), i = 1..n_e: ::

    gbar_e = (1/n_e) sum_i g_i                                   (= grad R_e)
    C_e    = (1/n_e) sum_i (g_i - gbar_e)(g_i - gbar_e)^T        (full, D x D)
    v_e    = diag(C_e) = (1/n_e) sum_i (g_i - gbar_e)^2          (diagonal: Fishr's variance)

with the biased 1/n_e normalization Fishr uses, computed by ``fishr_lite.penalty``'s
:func:`~fishr_lite.penalty.gradient_variance` and :func:`~fishr_lite.penalty.gradient_covariance`
(the same code as the penalty's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fishr_lite.diagnostics.functional import (
    Domain,
    check_domains,
    check_full_size,
    flatten_rows,
    select,
    trainable,
)
from fishr_lite.grads import per_sample_grads
from fishr_lite.penalty import gradient_covariance, gradient_variance


def per_sample_gradients(
    module: nn.Module, inputs: Tensor, targets: Tensor, loss: str = "bce"
) -> Tensor:
    """(n, D) detached per-sample gradients of ``module``'s trainable parameters.

    ``nn.Linear`` uses the closed-form engine of ``fishr_lite.grads``, any other module
    ``torch.func`` (``engine="torch.func"``).
    """
    engine = "closed_form" if isinstance(module, nn.Linear) else "torch.func"
    with torch.enable_grad():
        grads = per_sample_grads(module, inputs, targets, loss=loss, engine=engine)
    return flatten_rows({k: v.detach() for k, v in grads.items()}, module)


def domain_gradients(
    featurizer: Optional[nn.Module],
    head: nn.Module,
    domains: Sequence[Domain],
    *,
    loss: str = "bce",
    params: str = "head",
) -> list[Tensor]:
    """Per domain, the (n_e, D) per-sample gradients g_i with respect to ``params``."""
    rows = []
    for x, y in check_domains(domains, loss):
        module, inputs = select(featurizer, head, x, params)
        if len(trainable(module)) == 0:
            raise ValueError(f"no trainable parameter in params={params!r}; unfreeze the head or use params='all'.")
        rows.append(per_sample_gradients(module, inputs, y, loss))
    return rows


@dataclass
class GradientMoments:
    """Moments of one domain's per-sample gradients (flat, see ``parameter_names``).

    ``mean`` (D,) gbar; ``variance`` (D,) v = diag(C); ``covariance`` (D, D) C or ``None``
    when only the diagonal was asked for; ``n`` the number of samples.
    """

    mean: Tensor
    variance: Tensor
    covariance: Optional[Tensor]
    n: int

    @property
    def second_moment(self) -> Tensor:
        """Uncentered moment (diag or full empirical Fisher), C + gbar gbar^T (v + gbar^2 if diag)."""
        if self.covariance is None:
            return self.variance + self.mean.square()
        return self.covariance + torch.outer(self.mean, self.mean)


def moments_from_gradients(grads: Tensor, full: bool = True) -> GradientMoments:
    """gbar, v and (if ``full``) C of an (n, D) block of per-sample gradients."""
    if grads.dim() != 2 or grads.shape[0] == 0:
        raise ValueError(f"expected (n, D) per-sample gradients with n >= 1, got shape {tuple(grads.shape)}.")
    mean = grads.mean(dim=0)
    variance = gradient_variance(grads)
    covariance = None
    if full:
        check_full_size(grads.shape[1], "gradient covariance")
        covariance = gradient_covariance(grads)
    return GradientMoments(mean=mean, variance=variance, covariance=covariance, n=grads.shape[0])


def gradient_moments(
    featurizer: Optional[nn.Module],
    head: nn.Module,
    domains: Sequence[Domain],
    *,
    loss: str = "bce",
    params: str = "head",
    full: Optional[bool] = None,
) -> list[GradientMoments]:
    """Per-domain gradient mean and covariance (full by default for the head, diagonal for all).

    >>> moments = gradient_moments(featurizer, head, [(x0, y0), (x1, y1)], loss="bce")
    >>> moments[0].variance       # Fishr's v_e for domain 0, flat over the head's parameters
    """
    full = params == "head" if full is None else full
    return [moments_from_gradients(g, full) for g in domain_gradients(featurizer, head, domains, loss=loss, params=params)]

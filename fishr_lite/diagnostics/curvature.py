"""Per-domain curvature of the mean loss R_e: empirical Fisher, true Fisher, GGN, Hessian.

With per-sample gradients g_i, logits s_i = f_theta(x_i) (C of them), Jacobians
J_i = ds_i/dtheta (C x D) and residuals r_i = dl_i/ds_i, for one domain of n samples: ::

    empirical Fisher   F_emp = (1/n) sum_i g_i g_i^T                 (g_i = J_i^T r_i)
    true Fisher        F     = (1/n) sum_i E_{y ~ p_theta(y|x_i)}[g_i(y) g_i(y)^T]
                             = (1/n) sum_i J_i^T Lambda_i J_i,        Lambda_i = Cov_p(r)
    Monte-Carlo Fisher F_mc  = (1/(n K)) sum_i sum_k g_i(y_ik) g_i(y_ik)^T, y_ik ~ p_theta(.|x_i)
    GGN                G     = (1/n) sum_i J_i^T (d^2 l_i / ds_i^2) J_i
    Hessian            H     = d^2 R / dtheta^2 = G + (1/n) sum_i sum_c r_ic d^2 s_ic / dtheta^2

Every function takes ``(featurizer, head, domains)`` and returns one tensor per domain: a
(D, D) matrix, or its (D,) diagonal with ``diagonal=True``. ``params="head"`` (default) is
exact and full; ``params="all"`` covers the whole network (diagonals; full only for small D).
BackPACK's diagonals are in ``fishr_lite.diagnostics.backpack_curvature``, Hessian-vector
product estimators in ``fishr_lite.diagnostics.hvp``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from fishr_lite.diagnostics.functional import (
    Domain,
    check_domains,
    check_full_size,
    chunks,
    flat_parameters,
    loss_hessians,
    mean_loss_function,
    outputs_2d,
    per_sample_jacobians,
    predictive_covariance,
    select,
)
from fishr_lite.diagnostics.moments import per_sample_gradients
from fishr_lite.grads import summed_loss


def _outer_mean(rows: Tensor, diagonal: bool) -> Tensor:
    """(1/n) sum_i a_i a_i^T, or its diagonal (1/n) sum_i a_i^2, of (n, D) rows."""
    if diagonal:
        return rows.square().mean(dim=0)
    check_full_size(rows.shape[1], "curvature matrix")
    return rows.T @ rows / rows.shape[0]


def _sandwich(module: nn.Module, inputs: Tensor, middle: Tensor, diagonal: bool) -> Tensor:
    """(1/n) sum_i J_i^T M_i J_i (or its diagonal), Jacobians built chunk by chunk."""
    size = flat_parameters(module).numel()
    if not diagonal:
        check_full_size(size, "curvature matrix")
    total = inputs.new_zeros(size) if diagonal else inputs.new_zeros(size, size)
    for part in chunks(inputs.shape[0], 256):
        jac = per_sample_jacobians(module, inputs[part]).detach()  # (m, C, D)
        weighted = torch.einsum("mcd,mck->mkd", jac, middle[part])  # M_i J_i  (m, C, D)
        if diagonal:
            total += torch.einsum("mcd,mcd->d", jac, weighted)
        else:
            total += torch.einsum("mcd,mce->de", jac, weighted)
    return total / inputs.shape[0]


def empirical_fisher(
    featurizer: Optional[nn.Module],
    head: nn.Module,
    domains: Sequence[Domain],
    *,
    loss: str = "bce",
    params: str = "head",
    diagonal: bool = False,
) -> list[Tensor]:
    """F_emp,e = (1/n_e) sum_i g_i g_i^T per domain (gradients at the observed labels)."""
    out = []
    for x, y in check_domains(domains, loss):
        module, inputs = select(featurizer, head, x, params)
        out.append(_outer_mean(per_sample_gradients(module, inputs, y, loss), diagonal))
    return out


def sample_labels(logits: Tensor, loss: str, samples: int, generator: torch.Generator) -> Tensor:
    """K labels per sample from the model's predictive p_theta(y|x): (K, n, C) 0/1 floats for
    "bce" (independent Bernoulli(sigmoid(s)) per output), (K, n) class indices for "ce"."""
    s = outputs_2d(logits).detach()
    if loss == "bce":
        p = torch.sigmoid(s).expand(samples, *s.shape)
        return torch.bernoulli(p, generator=generator)
    return torch.multinomial(torch.softmax(s, dim=1), samples, replacement=True, generator=generator).T


def fisher(
    featurizer: Optional[nn.Module],
    head: nn.Module,
    domains: Sequence[Domain],
    *,
    loss: str = "bce",
    params: str = "head",
    diagonal: bool = False,
    mc_samples: Optional[int] = None,
    seed: int = 0,
) -> list[Tensor]:
    """True Fisher F_e per domain, from the model's predictive distribution (labels unused).

    Exact, F = (1/n) sum_i J_i^T Lambda_i J_i with Lambda_i = diag(p(1-p)) ("bce") or
    diag(p) - p p^T ("ce"), when ``mc_samples`` is None; otherwise the Monte-Carlo estimate
    (1/(nK)) sum_{i,k} g_i(y_ik) g_i(y_ik)^T with K = ``mc_samples`` labels y_ik ~ p_theta(.|x_i)
    drawn from a generator seeded with ``seed`` (unbiased; error ~ 1/sqrt(nK)).
    """
    if mc_samples is not None and mc_samples < 1:
        raise ValueError(f"mc_samples={mc_samples}; use a positive number of samples, or None for exact.")
    out = []
    generator = torch.Generator().manual_seed(seed)
    for x, y in check_domains(domains, loss):
        module, inputs = select(featurizer, head, x, params)
        with torch.no_grad():
            logits = module(inputs)
        if mc_samples is None:
            out.append(_sandwich(module, inputs, predictive_covariance(logits, loss), diagonal))
            continue
        labels = sample_labels(logits, loss, mc_samples, generator)
        total = None
        for label in labels:  # one label per sample at a time: (n, D) memory
            term = _outer_mean(per_sample_gradients(module, inputs, label, loss), diagonal)
            total = term if total is None else total + term
        out.append(total / mc_samples)
    return out


def ggn(
    featurizer: Optional[nn.Module],
    head: nn.Module,
    domains: Sequence[Domain],
    *,
    loss: str = "bce",
    params: str = "head",
    diagonal: bool = False,
) -> list[Tensor]:
    """Generalized Gauss-Newton G_e = (1/n) sum_i J_i^T (d^2 l_i/ds_i^2) J_i per domain.

    The loss Hessian in the logits comes from autograd (``torch.func.hessian``), not from a
    formula, so ``G == fisher(...)`` is a check (it holds for BCE and CE: canonical links).
    """
    out = []
    for x, y in check_domains(domains, loss):
        module, inputs = select(featurizer, head, x, params)
        with torch.no_grad():
            logits = module(inputs)
        out.append(_sandwich(module, inputs, loss_hessians(logits, y, loss), diagonal))
    return out


def hessian(
    featurizer: Optional[nn.Module],
    head: nn.Module,
    domains: Sequence[Domain],
    *,
    loss: str = "bce",
    params: str = "head",
    diagonal: bool = False,
) -> list[Tensor]:
    """Exact Hessian H_e = d^2 R_e / dtheta^2 per domain, by ``torch.func.hessian``.

    Forms the full D x D matrix (D <= ``MAX_FULL_SIZE``) even for ``diagonal=True``; for a
    large network use ``backpack_diagonal(..., "hessian")`` or ``hutchinson_diagonal``.
    """
    from torch.func import hessian as func_hessian

    out = []
    for x, y in check_domains(domains, loss):
        module, inputs = select(featurizer, head, x, params)
        theta = flat_parameters(module)
        check_full_size(theta.numel(), "Hessian")
        matrix = func_hessian(mean_loss_function(module, inputs, y, loss))(theta).detach()
        out.append(torch.diagonal(matrix).clone() if diagonal else matrix)
    return out


def domain_risks(
    featurizer: Optional[nn.Module], head: nn.Module, domains: Sequence[Domain], *, loss: str = "bce"
) -> Tensor:
    """(E,) tensor of the domain risks R_e = (1/n_e) sum_i l(f(x_i), y_i)."""
    values = []
    for x, y in check_domains(domains, loss):
        module, inputs = select(featurizer, head, x, "all")
        with torch.no_grad():
            values.append(summed_loss(outputs_2d(module(inputs)), y, loss) / x.shape[0])
    return torch.stack(values)


CURVATURES = {"empirical_fisher": empirical_fisher, "fisher": fisher, "ggn": ggn, "hessian": hessian}


def curvature(
    name: str,
    featurizer: Optional[nn.Module],
    head: nn.Module,
    domains: Sequence[Domain],
    **options: Any,
) -> list[Tensor]:
    """Dispatch by name: one of ``CURVATURES`` ("empirical_fisher", "fisher", "ggn", "hessian")."""
    if name not in CURVATURES:
        raise ValueError(f"unknown curvature {name!r}; use one of {sorted(CURVATURES)}.")
    return CURVATURES[name](featurizer, head, domains, **options)

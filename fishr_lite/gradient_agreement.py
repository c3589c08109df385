"""What Fish and AND-mask look at: agreement between the domains' mean gradients.

Neither method is a penalty added to the risk, so they are not in ``fishr_lite.objectives``;
this module computes the quantity each one targets, from the domain mean gradients ::

    gbar_e = (1/n_e) sum_{i in e} g_i = grad R_e            stacked as an (E, D) matrix

(``g_i`` are per-sample gradients from ``fishr_lite.grads``, flattened and concatenated over
parameters in dict order).

- Fish (Shi et al., ICLR 2022) approximates, with a first-order meta-step, gradient descent on
  the average risk minus gamma times the *gradient inner product*
  GIP = (2 / (E (E - 1))) sum_{e < e'} <gbar_e, gbar_e'>, i.e. it rewards domains whose
  gradients point the same way (:func:`gradient_inner_product`).
- AND-mask (Parascandolo et al., ICLR 2021) keeps coordinate j of the average gradient only
  when the domains agree on its sign: ``a_j = |(1/E) sum_e sign(gbar_e,j)| >= tau``
  (:func:`sign_agreement`, :func:`and_mask`, :func:`and_masked_gradient`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def flatten_per_sample(grads: dict[str, Tensor]) -> Tensor:
    """(n, D) matrix of per-sample gradients ``{name: (n, *shape)}``, parameters in dict order."""
    if not grads:
        raise ValueError("no per-sample gradients given; pass {name: (n, *param.shape)} tensors.")
    rows = {g.shape[0] for g in grads.values()}
    if len(rows) != 1:
        raise ValueError(f"per-sample gradients have different row counts {sorted(rows)}; "
                         "pass one row per sample for every parameter.")
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


def domain_mean_gradients(grads_per_domain: Sequence[dict[str, Tensor]]) -> Tensor:
    """(E, D) matrix whose row e is gbar_e = (1/n_e) sum_i g_i (= grad of domain e's mean loss)."""
    if len(grads_per_domain) == 0:
        raise ValueError("no domains given; pass one dict of per-sample gradients per domain.")
    return torch.stack([flatten_per_sample(g).mean(dim=0) for g in grads_per_domain])


def _check_mean_gradients(mean_grads: Tensor, min_domains: int) -> None:
    if mean_grads.ndim != 2:
        raise ValueError(f"mean_grads has shape {tuple(mean_grads.shape)}; pass an (E, D) matrix, "
                         "one row per domain (see domain_mean_gradients).")
    if mean_grads.shape[0] < min_domains:
        raise ValueError(f"{mean_grads.shape[0]} domain(s) given; this quantity compares domains, "
                         f"pass at least {min_domains}.")


def gradient_inner_product(mean_grads: Tensor) -> Tensor:
    """Fish's target, GIP = (2 / (E (E - 1))) sum_{e < e'} <gbar_e, gbar_e'> (larger: more aligned)."""
    _check_mean_gradients(mean_grads, 2)
    e = mean_grads.shape[0]
    gram = mean_grads @ mean_grads.T
    off_diagonal = gram.sum() - gram.diagonal().sum()  # = 2 sum_{e < e'} <gbar_e, gbar_e'>
    return off_diagonal / (e * (e - 1))


def sign_agreement(mean_grads: Tensor) -> Tensor:
    """(D,) agreement ``a_j = |(1/E) sum_e sign(gbar_e,j)|``: 1 if all domains agree, 0 if split."""
    _check_mean_gradients(mean_grads, 1)
    return torch.sign(mean_grads).mean(dim=0).abs()


def and_mask(mean_grads: Tensor, tau: float) -> Tensor:
    """(D,) 0/1 mask m_j = 1[a_j >= tau] of AND-mask (tau in [0, 1]; tau = 1: unanimity)."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau={tau} must be in [0, 1] (the fraction of sign agreement required).")
    return (sign_agreement(mean_grads) >= tau).to(mean_grads.dtype)


def and_masked_gradient(mean_grads: Tensor, tau: float, *, rescale: bool = True) -> Tensor:
    """AND-mask's update direction m * (1/E) sum_e gbar_e.

    ``rescale``: divide by the fraction of coordinates kept, m.mean() (+1e-10), as DomainBed's
    ANDMask does, so that masking does not shrink the step size.
    """
    mask = and_mask(mean_grads, tau)
    masked = mask * mean_grads.mean(dim=0)
    return masked / (mask.mean() + 1e-10) if rescale else masked


__all__ = [
    "and_mask",
    "and_masked_gradient",
    "domain_mean_gradients",
    "flatten_per_sample",
    "gradient_inner_product",
    "sign_agreement",
]

"""Feature alignment with DomainBed's update rules: CORAL and MMD.

Both add ``mmd_gamma`` times a distance between the domains' feature distributions, averaged
over the E(E-1)/2 pairs of training domains, to the mean domain risk:

    loss = (1/E) sum_e R_e + mmd_gamma * mean_{e<e'} d(z_e, z_e')

- :class:`CORAL`: d = mean_k (mu_e - mu_e')_k^2 + mean_kl (C_e - C_e')_kl^2 (means and
  unbiased covariances of the features), the penalty of :class:`fishr_lite.objectives.CORAL`.
- :class:`MMD`: d = mean K(z_e, z_e) + mean K(z_e', z_e') - 2 mean K(z_e, z_e'), with
  K(a, b) = sum_{g in GAMMAS} exp(-g ||a - b||^2) (:func:`gaussian_mmd`).

As DomainBed's ``AbstractMMD`` (facebookresearch/DomainBed ``algorithms.py``, read at commit
026d588): the featurizer runs on each domain separately; ``loss`` reports the mean risk.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fishr_lite.objectives import DomainBatch, make_objective

from .erm import ERM, Minibatches

#: Bandwidths of DomainBed's Gaussian kernel mixture.
GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``||a_i - b_j||^2 = ||a_i||^2 + ||b_j||^2 - 2 a_i.b_j``, clamped at 1e-30 (DomainBed's
    ``my_cdist``)."""
    a_norm = a.pow(2).sum(dim=-1, keepdim=True)
    b_norm = b.pow(2).sum(dim=-1, keepdim=True)
    return torch.addmm(b_norm.transpose(-2, -1), a, b.transpose(-2, -1), alpha=-2).add(a_norm).clamp_min(1e-30)


def gaussian_kernel(a: Tensor, b: Tensor, gammas: tuple[float, ...] = GAMMAS) -> Tensor:
    """K_ij = sum_g exp(-g ||a_i - b_j||^2)."""
    distances = squared_distances(a, b)
    return sum(torch.exp(distances.mul(-g)) for g in gammas)


def gaussian_mmd(a: Tensor, b: Tensor, gammas: tuple[float, ...] = GAMMAS) -> Tensor:
    """Biased MMD^2 estimate: mean K(a, a) + mean K(b, b) - 2 mean K(a, b)."""
    return (gaussian_kernel(a, a, gammas).mean() + gaussian_kernel(b, b, gammas).mean()
            - 2 * gaussian_kernel(a, b, gammas).mean())


class _PairwiseAlignment(ERM):
    """Mean risk + ``mmd_gamma`` * the pairwise penalty of :meth:`penalty`."""

    def penalty(self, domains: list[DomainBatch]) -> Tensor:
        raise NotImplementedError

    def update(self, minibatches: Minibatches, unlabeled: Optional[Minibatches] = None) -> dict[str, float]:
        self._check(minibatches)
        features = [self.featurizer(x) for x, _ in minibatches]
        domains = [DomainBatch(z, self.classifier(z), y) for z, (_, y) in zip(features, minibatches)]
        objective = torch.stack([F.cross_entropy(d.logits, d.targets) for d in domains]).mean()
        penalty = self.penalty(domains)
        self._step(objective + self.hparams["mmd_gamma"] * penalty)
        return {"loss": objective.item(), "penalty": penalty.item()}


class CORAL(_PairwiseAlignment):
    """Deep CORAL (Sun & Saenko 2016) as DomainBed trains it: match feature means and covariances."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int,
                 hparams: dict, featurizer: Optional[nn.Module] = None):
        super().__init__(input_shape, num_classes, num_domains, hparams, featurizer)
        self.objective = make_objective("coral", self.classifier, "ce")

    def penalty(self, domains: list[DomainBatch]) -> Tensor:
        return self.objective.penalty(domains)


class MMD(_PairwiseAlignment):
    """MMD-AAE's alignment (Li et al. 2018) as DomainBed trains it: a Gaussian-mixture MMD."""

    def penalty(self, domains: list[DomainBatch]) -> Tensor:
        terms = [gaussian_mmd(a.features, b.features)
                 for i, a in enumerate(domains) for b in domains[i + 1:]]
        return torch.stack(terms).mean() if terms else domains[0].features.new_zeros(())

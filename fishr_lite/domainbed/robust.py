"""Robustness across domains, with DomainBed's update rules: GroupDRO, Mixup, Fish.

- :class:`GroupDRO` (Sagawa et al. 2020, Algorithm 1): a weight q_e per domain, kept across
  steps; each step q_e <- q_e exp(eta R_e) (eta = ``groupdro_eta``, R_e detached), then
  q <- q / sum q, and loss = sum_e q_e R_e. q starts at 1 for every domain.
- :class:`Mixup` (inter-domain mixup, Yan et al. 2020; Wang et al. 2020): domains are put in a
  random cycle (``torch.randperm``); each domain i is mixed with the next one j,
  x = lam x_i + (1 - lam) x_j with lam ~ Beta(alpha, alpha) (``mixup_alpha``, ``np.random``),
  on the first min(n_i, n_j) samples, and
  loss = (1/E) sum_pairs [lam CE(f(x), y_i) + (1 - lam) CE(f(x), y_j)].
- :class:`Fish` (Shi et al. 2022): a copy of the network takes one Adam step per domain in
  turn (its Adam state carried over from step to step), then the network moves towards it,
  theta <- theta + ``meta_lr`` (theta_inner - theta). The outer optimizer is never used.

As DomainBed's ``algorithms.py`` (facebookresearch/DomainBed, read at commit 026d588), with the
global torch and NumPy generators (seeded by the runner) drawing Mixup's pairs and lambdas.
Deliberate differences that leave the update unchanged: GroupDRO's q is created at
construction (DomainBed creates it at the first step), its losses are stacked in the network's
dtype; Fish keeps one inner network and one inner Adam and copies the weights into it, where
DomainBed builds them again each step and reloads the Adam state; Fish's meta step applies to
floating-point parameters and buffers (integer buffers, such as BatchNorm's step counter,
are left alone).
"""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .erm import ERM, Minibatches


class GroupDRO(ERM):
    """Minimise the q-weighted domain risks, q tracking the worst domains; see the module docstring."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int,
                 hparams: dict, featurizer: Optional[nn.Module] = None):
        super().__init__(input_shape, num_classes, num_domains, hparams, featurizer)
        self.register_buffer("q", torch.ones(num_domains))

    def update(self, minibatches: Minibatches, unlabeled: Optional[Minibatches] = None) -> dict[str, float]:
        self._check(minibatches)
        losses = torch.stack([F.cross_entropy(self.predict(x), y) for x, y in minibatches])
        self.q *= (self.hparams["groupdro_eta"] * losses.detach()).exp().to(self.q.dtype)
        self.q /= self.q.sum()
        loss = torch.dot(losses, self.q.to(losses.dtype))
        self._step(loss)
        return {"loss": loss.item()}


def random_pairs_of_minibatches(minibatches: Minibatches) -> list:
    """Pairs (domain i, next domain in a random cycle), cut to the shorter length (DomainBed's)."""
    perm = torch.randperm(len(minibatches)).tolist()
    pairs = []
    for i in range(len(minibatches)):
        (xi, yi), (xj, yj) = minibatches[perm[i]], minibatches[perm[(i + 1) % len(minibatches)]]
        n = min(len(xi), len(xj))
        pairs.append(((xi[:n], yi[:n]), (xj[:n], yj[:n])))
    return pairs


class Mixup(ERM):
    """Train on mixtures of pairs of domains; see the module docstring."""

    def update(self, minibatches: Minibatches, unlabeled: Optional[Minibatches] = None) -> dict[str, float]:
        self._check(minibatches)
        objective = 0.0
        for (xi, yi), (xj, yj) in random_pairs_of_minibatches(minibatches):
            lam = float(np.random.beta(self.hparams["mixup_alpha"], self.hparams["mixup_alpha"]))
            predictions = self.predict(lam * xi + (1 - lam) * xj)
            objective = objective + lam * F.cross_entropy(predictions, yi)
            objective = objective + (1 - lam) * F.cross_entropy(predictions, yj)
        objective = objective / len(minibatches)
        self._step(objective)
        return {"loss": objective.item()}


class Fish(ERM):
    """Gradient matching by a Reptile-style meta step over the domains; see the module docstring."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int,
                 hparams: dict, featurizer: Optional[nn.Module] = None):
        super().__init__(input_shape, num_classes, num_domains, hparams, featurizer)
        self._inner: Optional[nn.Module] = None
        self._inner_optimizer: Optional[torch.optim.Optimizer] = None

    def _inner_network(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The inner copy, holding the network's current weights, and its (persistent) Adam."""
        if self._inner is None:
            self._inner = copy.deepcopy(self.network)
            self._inner_optimizer = torch.optim.Adam(self._inner.parameters(), lr=self.hparams["lr"],
                                                     weight_decay=self.hparams["weight_decay"])
        else:
            self._inner.load_state_dict(self.network.state_dict())
        return self._inner, self._inner_optimizer

    def update(self, minibatches: Minibatches, unlabeled: Optional[Minibatches] = None) -> dict[str, float]:
        self._check(minibatches)
        inner, optimizer = self._inner_network()
        for x, y in minibatches:
            loss = F.cross_entropy(inner(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        meta_lr = self.hparams["meta_lr"]
        with torch.no_grad():
            inner_state = inner.state_dict()
            for name, value in self.network.state_dict().items():
                if value.is_floating_point():
                    value += meta_lr * (inner_state[name] - value)
        return {"loss": loss.item()}

"""Algorithms with DomainBed's interface: ``update(minibatches) -> dict`` and ``predict(x)``.

``minibatches`` is one ``(x, y)`` per training domain. Both algorithms train
``classifier(featurizer(x))`` with Adam (``lr``, ``weight_decay``) on the cross-entropy.

- :class:`ERM`: loss = CE of all domains' samples together.
- :class:`FishrAlgorithm` (DomainBed's ``algorithms.Fishr``, registered as ``"Fishr"``):
  loss = CE + w(t) * penalty, where the
  penalty compares per-domain variances of the per-sample gradients of the *classifier only*
  (kept differentiable, so it trains the featurizer), each passed through a per-domain moving
  average (``ema``, divided by 1 - ema); squared distances to their mean are averaged over
  coordinates and domains. w(t) = 0 before ``penalty_anneal_iters`` and ``lambda`` from then
  on; at that step Adam is re-created (its moments forgotten). The penalty itself is
  :class:`fishr_lite.training.FishrPenalty` with the ``"domainbed"`` convention.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fishr_lite.training import FishrPenalty, domainbed_schedule

from .networks import Classifier, Featurizer

Minibatches = Sequence[tuple[Tensor, Tensor]]


class ERM(nn.Module):
    """Empirical risk minimisation over the pooled training domains.

    ``featurizer`` (optional) replaces DomainBed's choice from ``input_shape``; it must have an
    ``n_outputs`` attribute (the number of features).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int,
                 hparams: dict, featurizer: Optional[nn.Module] = None):
        super().__init__()
        self.hparams, self.num_domains = dict(hparams), num_domains
        self.featurizer = featurizer if featurizer is not None else Featurizer(input_shape, hparams)
        self.classifier = Classifier(self.featurizer.n_outputs, num_classes,
                                     hparams.get("nonlinear_classifier", False))
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self._init_optimizer()

    def _init_optimizer(self) -> None:
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=self.hparams["lr"],
                                          weight_decay=self.hparams["weight_decay"])

    def _check(self, minibatches: Minibatches) -> None:
        if len(minibatches) != self.num_domains:
            raise ValueError(f"got {len(minibatches)} minibatches for {self.num_domains} training "
                             "domains; pass one (x, y) per training domain.")

    def update(self, minibatches: Minibatches, unlabeled: Optional[Minibatches] = None) -> dict[str, float]:
        self._check(minibatches)
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        loss = F.cross_entropy(self.predict(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def predict(self, x: Tensor) -> Tensor:
        return self.network(x)


class FishrAlgorithm(ERM):
    """ERM + lambda * Fishr penalty after ``penalty_anneal_iters`` steps; Adam reset then."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int,
                 hparams: dict, featurizer: Optional[nn.Module] = None):
        super().__init__(input_shape, num_classes, num_domains, hparams, featurizer)
        engine = "closed_form" if isinstance(self.classifier, nn.Linear) else "torch.func"
        self.fishr = FishrPenalty(
            self.classifier, loss="ce", engine=engine, convention="domainbed", ema=hparams["ema"],
            schedule=domainbed_schedule(hparams["lambda"], int(hparams["penalty_anneal_iters"])))
        self.fishr.on_switch(self._init_optimizer)
        self.register_buffer("update_count", torch.tensor([0]))

    def update(self, minibatches: Minibatches, unlabeled: Optional[Minibatches] = None) -> dict[str, float]:
        self._check(minibatches)
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        features = self.featurizer(x)
        nll = F.cross_entropy(self.classifier(features), y)
        penalty = self.fishr.penalty(features, y, domain_sizes=[len(b) for b, _ in minibatches])
        objective = self.fishr.total_loss(nll, penalty, step=int(self.update_count))
        self.update_count += 1
        self.optimizer.zero_grad()
        objective.backward()
        self.optimizer.step()
        return {"loss": objective.item(), "nll": nll.item(), "penalty": penalty.item()}


ALGORITHM_CLASSES: dict[str, type[ERM]] = {"ERM": ERM, "Fishr": FishrAlgorithm}


def get_algorithm_class(name: str) -> type[ERM]:
    if name not in ALGORITHM_CLASSES:
        raise ValueError(f"unknown algorithm {name!r}; use one of {sorted(ALGORITHM_CLASSES)}.")
    return ALGORITHM_CLASSES[name]

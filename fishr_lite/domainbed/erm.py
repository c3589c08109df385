"""The base of every DomainBed algorithm: ERM, with DomainBed's interface.

``update(minibatches) -> dict`` takes one ``(x, y)`` per training domain and makes one optimizer
step; ``predict(x)`` returns logits. The network is ``classifier(featurizer(x))`` trained with
Adam (``lr``, ``weight_decay``) on the cross-entropy, as in DomainBed's ``algorithms.ERM``:

    loss = CE( f(x_all), y_all ),   x_all = the training domains' samples pooled.

Subclasses (IRM, VREx, Fishr, ... in :mod:`fishr_lite.domainbed.invariance`,
:mod:`fishr_lite.domainbed.alignment`, :mod:`fishr_lite.domainbed.robust`,
:mod:`fishr_lite.domainbed.masks`) change ``update`` only; the registry of names is
:mod:`fishr_lite.domainbed.algorithms`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fishr_lite.objectives import DomainBatch

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

    def _step(self, objective: Tensor) -> None:
        """One optimizer step on ``objective``."""
        self.optimizer.zero_grad()
        objective.backward()
        self.optimizer.step()

    def _domain_batches(self, minibatches: Minibatches) -> list[DomainBatch]:
        """One forward pass of the pooled samples, split back per domain (DomainBed's IRM, VREx)."""
        x = torch.cat([x for x, _ in minibatches])
        features = self.featurizer(x)
        logits = self.classifier(features)
        sizes = [len(y) for _, y in minibatches]
        return [DomainBatch(f, s, y) for f, s, (_, y) in
                zip(features.split(sizes), logits.split(sizes), minibatches)]

    def update(self, minibatches: Minibatches, unlabeled: Optional[Minibatches] = None) -> dict[str, float]:
        self._check(minibatches)
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        loss = F.cross_entropy(self.predict(x), y)
        self._step(loss)
        return {"loss": loss.item()}

    def predict(self, x: Tensor) -> Tensor:
        return self.network(x)

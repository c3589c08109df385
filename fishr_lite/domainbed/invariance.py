"""Invariance penalties with DomainBed's update rules: IRM, VREx, Fishr, IGA.

Each algorithm minimises the mean domain risk plus a weighted penalty, where R_e is the mean
cross-entropy of training domain e (E domains) and the penalties are those of
:mod:`fishr_lite.objectives` (DomainBed's convention), not written again here:

- :class:`IRM`: mean_e R_e + w(t) * mean_e (dR_e^a/ds)(dR_e^b/ds), the IRMv1 penalty as the
  product of the gradients w.r.t. a scale s = 1 on the logits, estimated on the even (a) and
  odd (b) samples of the domain. w(t) = 1 before ``irm_penalty_anneal_iters``, then
  ``irm_lambda``; Adam's state is reset at that step.
- :class:`VREx`: mean_e R_e + w(t) * mean_e (R_e - mean R)^2; the same schedule and reset with
  ``vrex_lambda`` and ``vrex_penalty_anneal_iters``.
- :class:`FishrAlgorithm` (DomainBed's ``Fishr``): CE(all) + w(t) * Fishr penalty (head-only
  per-sample gradient variances, per-domain moving average ``ema``), w(t) = 0 before
  ``penalty_anneal_iters``, then ``lambda``; Adam re-created at that step.
- :class:`IGA`: mean_e R_e + ``penalty`` * sum_e ||grad R_e - grad mean R||^2, gradients of the
  whole network kept differentiable (``create_graph``).

These follow DomainBed's ``algorithms.py`` (facebookresearch/DomainBed, main branch as of
2023-2024; read at commit 026d588). Deliberate differences, which leave the update unchanged:
VREx stacks the domain risks in the network's dtype (DomainBed copies them into a float32
tensor) and reports ``nll`` as the mean risk (DomainBed reports the last domain's); the Adam
reset forgets the optimizer's state instead of re-creating it (the same thing).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fishr_lite.objectives import DomainBatch, make_objective
from fishr_lite.training import FishrPenalty, PenaltySchedule, domainbed_schedule, reset_optimizer_state

from .erm import ERM, Minibatches


class _AnnealedPenalty(ERM):
    """ERM + w(t) * penalty of an objective of :mod:`fishr_lite.objectives` (IRM, VREx).

    w(t) = 1 for t < anneal_iters, then lambda; Adam's state is reset at t = anneal_iters.
    """

    objective_name = ""
    lambda_key = anneal_key = ""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int,
                 hparams: dict, featurizer: Optional[nn.Module] = None):
        super().__init__(input_shape, num_classes, num_domains, hparams, featurizer)
        self.objective = make_objective(self.objective_name, self.classifier, "ce", convention="domainbed")
        self.schedule = PenaltySchedule(float(hparams[self.lambda_key]), int(hparams[self.anneal_key]),
                                        warmup_weight=1.0)
        self.register_buffer("update_count", torch.tensor([0]))

    def update(self, minibatches: Minibatches, unlabeled: Optional[Minibatches] = None) -> dict[str, float]:
        self._check(minibatches)
        domains = self._domain_batches(minibatches)
        nll = self.objective.risks(domains).mean()
        penalty = self.objective.penalty(domains)
        step = int(self.update_count)
        loss = self.schedule.combine(nll, penalty, step)
        if self.schedule.switches_on(step):
            reset_optimizer_state(self.optimizer)  # DomainBed re-creates Adam here
        self._step(loss)
        self.update_count += 1
        return {"loss": loss.item(), "nll": nll.item(), "penalty": penalty.item()}


class IRM(_AnnealedPenalty):
    """IRMv1 (Arjovsky et al. 2019) as DomainBed trains it; see the module docstring."""

    objective_name, lambda_key, anneal_key = "irm", "irm_lambda", "irm_penalty_anneal_iters"


class VREx(_AnnealedPenalty):
    """V-REx (Krueger et al. 2021) as DomainBed trains it; see the module docstring."""

    objective_name, lambda_key, anneal_key = "vrex", "vrex_lambda", "vrex_penalty_anneal_iters"


class FishrAlgorithm(ERM):
    """ERM + lambda * Fishr penalty after ``penalty_anneal_iters`` steps; Adam reset then.

    The penalty compares per-domain variances of the per-sample gradients of the *classifier
    only* (kept differentiable, so it trains the featurizer), each passed through a per-domain
    moving average (``ema``, divided by 1 - ema); squared distances to their mean are averaged
    over coordinates and domains. It is :class:`fishr_lite.training.FishrPenalty` with the
    ``"domainbed"`` convention.
    """

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
        self._step(objective)
        return {"loss": objective.item(), "nll": nll.item(), "penalty": penalty.item()}


class IGA(ERM):
    """Inter-environmental gradient alignment (Koyama & Yamaguchi 2020) on the whole network.

    loss = mean_e R_e + ``penalty`` * sum_e ||grad_theta R_e - mean_e' grad_theta R_e'||^2, the
    penalty of :class:`fishr_lite.objectives.IGA` with theta = all parameters. DomainBed takes
    the mean gradient without ``create_graph``; the gradient of the penalty is the same either
    way (the deviations sum to zero), so the update is DomainBed's. Each domain goes through
    the network separately, as in DomainBed.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int,
                 hparams: dict, featurizer: Optional[nn.Module] = None):
        super().__init__(input_shape, num_classes, num_domains, hparams, featurizer)
        self.objective = make_objective("iga", self.network, "ce")

    def update(self, minibatches: Minibatches, unlabeled: Optional[Minibatches] = None) -> dict[str, float]:
        self._check(minibatches)
        domains = [DomainBatch(x, self.network(x), y) for x, y in minibatches]
        mean_loss = self.objective.risks(domains).mean()
        penalty = self.objective.penalty(domains)
        self._step(mean_loss + self.hparams["penalty"] * penalty)
        return {"loss": mean_loss.item(), "penalty": penalty.item()}

"""Domain-generalization objectives over per-domain batches: ERM, IRM, V-REx, Fishr, IGA, CORAL.

Each objective is a small class with ``risks(domains) -> (E,)`` (mean loss per domain) and
``penalty(domains) -> scalar``; the training loop combines them, e.g. (Colored MNIST)::

    loss = objective.risks(batches).mean() + l2 * weight_norm + w * objective.penalty(batches)

``convention`` picks the form of a penalty where the paper's two official codes differ (IRM,
V-REx, Fishr): ``"domainbed"`` (the default, as everywhere in fishr_lite) or
``"colored_mnist"`` (the Colored MNIST script's), see ``fishr_lite.penalty``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from fishr_lite.blocked import under_torch_func
from fishr_lite.grads import LOSSES, summed_loss
from fishr_lite.penalty import CONVENTIONS, DEFAULT_CONVENTION, DomainMovingAverage, check_choice
from fishr_lite.training import FishrPenalty


@dataclass
class DomainBatch:
    """One domain's batch: head input (attached to the graph), head output, targets."""

    features: Tensor  # (n, d)
    logits: Tensor  # (n,) for binary BCE-with-logits, (n, C) for cross-entropy
    targets: Tensor  # (n,) float 0/1 for "bce", long class indices for "ce"


def mean_loss(logits: Tensor, targets: Tensor, loss: str) -> Tensor:
    """R = (1/n) sum_i l(s_i, y_i)."""
    return summed_loss(logits, targets, loss) / logits.shape[0]


class Objective:
    """Base class: ERM risks and no penalty.

    ``convention`` names the form of the penalty where the official codes differ (IRM, V-REx,
    Fishr); objectives with one form accept it and ignore it.
    """

    name = "erm"

    def __init__(self, head: nn.Module, loss: str = "bce", convention: str = DEFAULT_CONVENTION) -> None:
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}.")
        check_choice("convention", convention, tuple(CONVENTIONS))
        self.head, self.loss, self.convention = head, loss, convention

    def risks(self, domains: Sequence[DomainBatch]) -> Tensor:
        """(E,) tensor of R_e = mean loss of domain e."""
        if len(domains) == 0:
            raise ValueError("no domains given; pass one DomainBatch per training domain.")
        return torch.stack([mean_loss(d.logits, d.targets, self.loss) for d in domains])

    def penalty(self, domains: Sequence[DomainBatch]) -> Tensor:
        return domains[0].logits.new_zeros(())


class ERM(Objective):
    name = "erm"


def _scale_gradient(logits: Tensor, targets: Tensor, loss: str) -> Tensor:
    """d R(w * s) / dw at w = 1, with R the mean loss of ``logits`` s (kept differentiable);
    by ``torch.func.grad`` inside ``torch.func`` transforms, where ``autograd.grad`` cannot go."""
    if under_torch_func(logits):
        return torch.func.grad(lambda w: mean_loss(logits * w, targets, loss))(logits.new_ones(()))
    scale = torch.ones((), dtype=logits.dtype, device=logits.device, requires_grad=True)
    (grad,) = torch.autograd.grad(mean_loss(logits * scale, targets, loss), [scale], create_graph=True)
    return grad


class IRM(Objective):
    """IRMv1, the squared gradient of each domain's risk w.r.t. a dummy scale w on the logits.

    "colored_mnist" (the IRM / Fishr script): mean_e (dR_e/dw)^2 on each domain's whole batch.
    "domainbed": mean_e (dR_e^a/dw)(dR_e^b/dw), the product of the estimates on the even and
    odd samples of the batch (an unbiased estimate of the square).
    """

    name = "irm"

    def penalty(self, domains: Sequence[DomainBatch]) -> Tensor:
        terms = []
        for d in domains:
            if self.convention == "colored_mnist":
                terms.append(_scale_gradient(d.logits, d.targets, self.loss).pow(2))
            else:
                even = _scale_gradient(d.logits[0::2], d.targets[0::2], self.loss)
                odd = _scale_gradient(d.logits[1::2], d.targets[1::2], self.loss)
                terms.append(even * odd)
        return torch.stack(terms).mean()


class VREx(Objective):
    """V-REx: variance of the domain risks.

    "domainbed": mean_e (R_e - Rbar)^2. "colored_mnist": sum_{e<e'} (R_e - R_e')^2, which
    is (R_0 - R_1)^2 for the script's two domains (= E^2 times the variance).
    """

    name = "vrex"

    def penalty(self, domains: Sequence[DomainBatch]) -> Tensor:
        risks = self.risks(domains)
        variance = (risks - risks.mean()).pow(2).mean()
        return variance * len(domains) ** 2 if self.convention == "colored_mnist" else variance


class FishrObjective(Objective):
    """Fishr: distance between per-domain variances of the head's per-sample gradients.

    The penalty is that of :class:`fishr_lite.training.FishrPenalty`, with the same options:
    ``engine`` (see ``fishr_lite.grads.ENGINES``), ``convention`` (reductions and scaling, see
    ``fishr_lite.penalty``; DomainBed's by default), ``ema`` (per-domain moving average;
    defaults to DomainBed's 0.95 under "domainbed", none under "colored_mnist"). A penalty
    computed with gradients recorded advances the moving average, so call it once per
    training step (under ``torch.no_grad()``, or with ``update=False``, it does not).
    """

    name = "fishr"

    def __init__(
        self,
        head: nn.Module,
        loss: str = "bce",
        *,
        engine: str = "closed_form",
        convention: str = DEFAULT_CONVENTION,
        ema: Optional[float] = None,
        centered: bool = True,
        covariance: str = "diagonal",
    ) -> None:
        super().__init__(head, loss, convention)
        self.fishr = FishrPenalty(head, loss=loss, engine=engine, convention=convention, ema=ema,
                                  centered=centered, covariance=covariance)

    @property
    def options(self) -> dict:
        """The reductions and scaling of the convention in force (see ``fishr_lite.penalty``)."""
        return self.fishr.options

    @property
    def moving_average(self) -> Optional[DomainMovingAverage]:
        return self.fishr.moving_average

    def penalty(self, domains: Sequence[DomainBatch], *, update: Optional[bool] = None) -> Tensor:
        return self.fishr.penalty([d.features for d in domains], [d.targets for d in domains],
                                  logits=[d.logits for d in domains], update=update)

    def logits_and_penalty(self, features: Sequence[Tensor], targets: Sequence[Tensor], *,
                           update: Optional[bool] = None) -> tuple[list[Tensor], Tensor]:
        """``([head(z_e)], penalty)``, the head applied here: see
        :meth:`fishr_lite.training.FishrPenalty.logits_and_penalty`."""
        return self.fishr.logits_and_penalty(list(features), list(targets), update=update)


class IGA(Objective):
    """IGA (inter-domain gradient alignment) on the head: sum_e ||grad R_e - mean_e' grad R_e'||^2."""

    name = "iga"

    def penalty(self, domains: Sequence[DomainBatch]) -> Tensor:
        params = [p for p in self.head.parameters() if p.requires_grad]
        grads = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(r, params, create_graph=True)])
            for r in self.risks(domains)
        ]
        stacked = torch.stack(grads)
        return (stacked - stacked.mean(dim=0, keepdim=True)).pow(2).sum()


class CORAL(Objective):
    """CORAL on features: mean over domain pairs of mean (mu_a - mu_b)^2 + mean (C_a - C_b)^2."""

    name = "coral"

    def penalty(self, domains: Sequence[DomainBatch]) -> Tensor:
        def moments(z: Tensor) -> tuple[Tensor, Tensor]:
            centered = z - z.mean(dim=0, keepdim=True)
            return z.mean(dim=0), centered.T @ centered / (z.shape[0] - 1)

        stats = [moments(d.features) for d in domains]
        pairs = list(itertools.combinations(stats, 2))
        if not pairs:
            return domains[0].features.new_zeros(())
        terms = [(ma - mb).pow(2).mean() + (ca - cb).pow(2).mean() for (ma, ca), (mb, cb) in pairs]
        return torch.stack(terms).mean()


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "erm": ERM,
    "irm": IRM,
    "vrex": VREx,
    "fishr": FishrObjective,
    "fishr-notcentered": lambda head, loss="bce", **kw: FishrObjective(head, loss, centered=False, **kw),
    "fishr-fullcov": lambda head, loss="bce", **kw: FishrObjective(head, loss, covariance="full", **kw),
    "iga": IGA,
    "coral": CORAL,
}


def make_objective(name: str, head: nn.Module, loss: str = "bce", **options: Any) -> Objective:
    """Build the objective called ``name`` (a key of ``OBJECTIVES``) for ``head``."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; use one of {sorted(OBJECTIVES)}.")
    try:
        objective = OBJECTIVES[name](head, loss, **options)
    except TypeError as error:
        raise ValueError(f"bad options {options} for objective {name!r}: {error}.") from error
    objective.name = name
    return objective

"""Fishr in a training loop: the penalty weight over steps, the optimizer reset, and
:class:`FishrPenalty`, the object that keeps the moving average between steps.

The maths (variances, distance, moving average) is :mod:`fishr_lite.penalty`; this module
is the policy around it. A training step with DomainBed's recipe::

    fishr = FishrPenalty(head, schedule=domainbed_schedule(1000.0, warmup_steps=1500))
    fishr.on_switch(lambda: reset_optimizer_state(optimizer))  # DomainBed re-creates Adam
    penalty = fishr.penalty([z0, z1], [y0, y1])                # features/targets per domain
    loss = fishr.total_loss(risk, penalty, step)               # risk + w(step) * penalty
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fishr_lite.grads import engine_name
from fishr_lite.penalty import (
    CONVENTION_EMA,
    CONVENTIONS,
    DEFAULT_CONVENTION,
    DomainMovingAverage,
    averaged_distance,
    check_choice,
    check_rows_per_domain,
    head_scores_and_variances,
    head_variances,
    split_domains,
)


@dataclass
class PenaltySchedule:
    """Penalty weight per step: w(t) = ``warmup_weight`` for t < ``warmup_steps``, then ``weight``.

    ``rescale``: divide the whole loss by w(t) when w(t) > 1 (the Colored MNIST script).
    """

    weight: float
    warmup_steps: int = 0
    warmup_weight: float = 0.0
    rescale: bool = False

    def __call__(self, step: int) -> float:
        return self.weight if step >= self.warmup_steps else self.warmup_weight

    def switches_on(self, step: int) -> bool:
        """True at the step the weight jumps to ``weight`` (never when there is no warm-up)."""
        return step == self.warmup_steps and self.warmup_steps > 0

    def combine(self, loss: Tensor, penalty: Tensor, step: int) -> Tensor:
        """loss + w(step) * penalty, divided by w(step) if ``rescale`` and w(step) > 1."""
        w = self(step)
        if w == 0.0:
            return loss
        total = loss + w * penalty
        return total / w if self.rescale and w > 1.0 else total


def colored_mnist_schedule(weight: float = 91257.18613115903, warmup_steps: int = 190) -> PenaltySchedule:
    """The Colored MNIST script: weight 1 until step 190, then 91257.19, loss divided by it."""
    return PenaltySchedule(weight, warmup_steps, warmup_weight=1.0, rescale=True)


def domainbed_schedule(weight: float = 1000.0, warmup_steps: int = 1500) -> PenaltySchedule:
    """DomainBed: weight 0 until ``penalty_anneal_iters``, then lambda (Adam re-created then)."""
    return PenaltySchedule(weight, warmup_steps, warmup_weight=0.0, rescale=False)


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Forget the optimizer's running state (Adam moments, step counts): equivalent to
    re-creating it with the same parameter groups, as DomainBed does when the penalty starts."""
    optimizer.state.clear()


class FishrPenalty:
    """The Fishr penalty of a head, with its moving average and schedule, for a training loop.

    ``convention``: ``"domainbed"`` (default: means over coordinates and domains, a moving
    average with ``ema`` = 0.95) or ``"colored_mnist"`` (the script's sums, no moving average);
    see :mod:`fishr_lite.penalty`. ``ema=0`` turns the moving average off. ``engine``: how the
    per-sample gradients are computed (``fishr_lite.grads.ENGINES``; an ``nn.Linear`` head with
    ``"closed_form"`` never forms them).

    >>> fishr = FishrPenalty(head)
    >>> loss = risk + 100.0 * fishr.penalty([z0, z1], [y0, y1])
    """

    def __init__(
        self,
        head: nn.Module,
        *,
        loss: str = "bce",
        engine: str = "closed_form",
        convention: str = DEFAULT_CONVENTION,
        ema: Optional[float] = None,
        centered: bool = True,
        covariance: str = "diagonal",
        schedule: Optional[PenaltySchedule] = None,
    ) -> None:
        check_choice("convention", convention, tuple(CONVENTIONS))
        self.head, self.loss, self.engine = head, loss, engine_name(engine)
        self.convention = convention
        self.options = dict(CONVENTIONS[convention], centered=centered, covariance=covariance)
        ema = CONVENTION_EMA[convention] if ema is None else ema
        self.moving_average = DomainMovingAverage(ema) if ema else None  # 0: no average
        self.schedule = schedule or PenaltySchedule(weight=1.0)
        self._switch_hooks: list[Callable[[], None]] = []

    def penalty(
        self,
        features: Union[Tensor, Sequence[Tensor]],
        targets: Union[Tensor, Sequence[Tensor]],
        domain_sizes: Optional[Sequence[int]] = None,
        logits: Optional[Sequence[Tensor]] = None,
        *,
        update: Optional[bool] = None,
    ) -> Tensor:
        """The penalty for features/targets given per domain (lists), or concatenated with
        ``domain_sizes``. ``logits``: optional per-domain ``head(features)`` the training loop
        already computed. ``update``: advance the moving average (default: only when gradients
        are recorded; a call under ``torch.no_grad()`` leaves it where it was)."""
        features, targets = self._per_domain(features, targets, domain_sizes)
        variances = head_variances(self.head, features, targets, loss=self.loss, engine=self.engine,
                                   logits=logits, **self._variance_options())
        return self._distance(variances, update)

    __call__ = penalty

    def logits_and_penalty(
        self,
        features: Union[Tensor, Sequence[Tensor]],
        targets: Union[Tensor, Sequence[Tensor]],
        domain_sizes: Optional[Sequence[int]] = None,
        *,
        update: Optional[bool] = None,
    ) -> tuple[list[Tensor], Tensor]:
        """``([head(z_e)], penalty)``: the head applied to each domain's features here, and the
        penalty of :meth:`penalty` for them (same arguments, less ``logits``), for a loop whose
        model stops at the features::

            logits, penalty = fishr.logits_and_penalty([featurizer(x) for x in xs], ys)

        The head runs once per domain, where :meth:`penalty` without ``logits`` runs it again:
        with ``engine="backpack"`` the scores are those of the forward BackPACK's hooks record,
        and the closed form computes each domain's head and variances in one autograd node
        (``fishr_lite.fused_head``: one pass over the features forward, one backward, which
        writes their gradient once)."""
        features, targets = self._per_domain(features, targets, domain_sizes)
        logits, variances = head_scores_and_variances(self.head, features, targets, loss=self.loss,
                                                      engine=self.engine, **self._variance_options())
        return logits, self._distance(variances, update)

    @staticmethod
    def _per_domain(features, targets, domain_sizes) -> tuple[list[Tensor], list[Tensor]]:
        """Lists of per-domain features and targets, split by ``domain_sizes`` if concatenated."""
        if isinstance(features, Tensor):
            features = split_domains(features, domain_sizes)
            targets = split_domains(targets if isinstance(targets, Tensor) else torch.cat(list(targets)),
                                    domain_sizes)
            domain_sizes = None
        elif isinstance(targets, Tensor):
            raise ValueError("pass one targets tensor per domain, matching the list of features.")
        check_rows_per_domain([len(z) for z in features], domain_sizes)
        return list(features), list(targets)

    def _variance_options(self) -> dict:
        return {k: v for k, v in self.options.items() if k not in ("coordinate_reduction", "domain_reduction")}

    def _distance(self, variances, update: Optional[bool]) -> Tensor:
        return averaged_distance(variances, moving_average=self.moving_average, update=update,
                                 coordinate_reduction=self.options["coordinate_reduction"],
                                 domain_reduction=self.options["domain_reduction"])

    __call__ = penalty

    def weight(self, step: int) -> float:
        """The schedule's weight at ``step``."""
        return self.schedule(step)

    def on_switch(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` at the step the penalty weight switches on (e.g. reset Adam)."""
        self._switch_hooks.append(hook)

    def total_loss(self, loss: Tensor, penalty: Tensor, step: int) -> Tensor:
        """loss + weight(step) * penalty (rescaled as the schedule says); fires switch hooks."""
        if self.schedule.switches_on(step):
            for hook in self._switch_hooks:
                hook()
        return self.schedule.combine(loss, penalty, step)


__all__ = [
    "FishrPenalty",
    "PenaltySchedule",
    "colored_mnist_schedule",
    "domainbed_schedule",
    "reset_optimizer_state",
]

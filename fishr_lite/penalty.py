"""The Fishr penalty: match the per-domain variances of per-sample gradients.

For domain e with per-sample gradients g_i (i in e, n_e of them, scaled by ``grad_scale``) ::

    gbar_e = (1/n_e) sum_i g_i
    v_e    = (1/n_e) sum_i (g_i - gbar_e)^2                  (covariance="diagonal")
    V_e    = (1/n_e) sum_i (g_i - gbar_e)(g_i - gbar_e)^T    (covariance="full", per parameter)
    vbar   = (1/E) sum_e v_e
    penalty = R_e [ C_k (v_e - vbar)_k^2 ]

with R (``domain_reduction``) the sum or mean over the E domains and C
(``coordinate_reduction``) the sum or mean over all coordinates of all parameters.
``centered=False`` drops gbar_e (the "notcentered" variant).

The two official conventions, as presets of keyword arguments:

- ``COLORED_MNIST_CONVENTION`` (the paper's Colored MNIST script): sums over coordinates and
  domains; full covariance divided by n_e * (block size). Gradients are those of the mean
  loss times the batch size, which is what ``fishr_lite.grads`` returns (``grad_scale=1``).
- ``DOMAINBED_CONVENTION``: means over coordinates and domains; each v_e goes through a
  per-domain exponential moving average (``DomainMovingAverage(DOMAINBED_EMA)``). ::

    fishr_penalty(grads, sizes, **COLORED_MNIST_CONVENTION)
    fishr_penalty(grads, sizes, moving_average=ema, **DOMAINBED_CONVENTION)
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fishr_lite.grads import per_sample_grads
from fishr_lite.blocked import column_variances
from fishr_lite.head_variance import linear_head_variances

Variances = list[dict[str, Tensor]]

COLORED_MNIST_CONVENTION = MappingProxyType(
    {
        "coordinate_reduction": "sum",
        "domain_reduction": "sum",
        "grad_scale": 1.0,
        "full_covariance_divisor": "samples_times_block_size",
    }
)
DOMAINBED_CONVENTION = MappingProxyType(
    {
        "coordinate_reduction": "mean",
        "domain_reduction": "mean",
        "grad_scale": 1.0,
        "full_covariance_divisor": "samples",
    }
)
DOMAINBED_EMA = 0.95
CONVENTIONS = {"colored_mnist": COLORED_MNIST_CONVENTION, "domainbed": DOMAINBED_CONVENTION}


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {tuple(choices)}.")


def check_domain_sizes(domain_sizes: Sequence[int], n: int) -> list[int]:
    """Validate that every domain has >= 2 samples and that the sizes add up to ``n``."""
    sizes = [int(s) for s in domain_sizes]
    if len(sizes) < 1:
        raise ValueError("domain_sizes is empty; pass the number of samples of each domain.")
    for e, size in enumerate(sizes):
        if size < 2:
            raise ValueError(
                f"domain {e} has {size} sample(s); a gradient variance needs at least 2 per "
                "domain: use larger batches or drop that domain from this step."
            )
    if sum(sizes) != n:
        raise ValueError(
            f"domain_sizes {sizes} add up to {sum(sizes)} but the gradients have {n} rows; "
            "pass the sizes of the domains in the order they were concatenated."
        )
    return sizes


def _split_domains(
    grads: Union[dict[str, Tensor], Sequence[dict[str, Tensor]]], domain_sizes: Optional[Sequence[int]]
) -> list[dict[str, Tensor]]:
    """Per-domain dicts, from one dict of concatenated rows + sizes, or from per-domain dicts."""
    if isinstance(grads, dict):
        if not grads:
            raise ValueError("no per-sample gradients given; pass {name: (n, *param.shape)} tensors.")
        if domain_sizes is None:
            raise ValueError("concatenated gradients need domain_sizes; or pass one dict per domain.")
        n = next(iter(grads.values())).shape[0]
        sizes = check_domain_sizes(domain_sizes, n)
        for name, g in grads.items():
            if g.shape[0] != n:
                raise ValueError(f"grads[{name!r}] has {g.shape[0]} rows, others {n}; pass one row per sample.")
        split = {name: torch.split(g, sizes) for name, g in grads.items()}
        return [{name: parts[e] for name, parts in split.items()} for e in range(len(sizes))]
    domains = list(grads)
    check_rows_per_domain([next(iter(d.values())).shape[0] if d else 0 for d in domains], domain_sizes)
    return domains


def check_rows_per_domain(rows: Sequence[int], domain_sizes: Optional[Sequence[int]]) -> None:
    """Validate per-domain row counts (>= 2 each), and that ``domain_sizes``, if given, equals them."""
    sizes = [int(r) for r in rows]
    check_domain_sizes(sizes, sum(sizes) if domain_sizes is None else sum(int(s) for s in domain_sizes))
    if domain_sizes is not None and [int(s) for s in domain_sizes] != sizes:
        raise ValueError(f"domain_sizes {list(domain_sizes)} differ from the per-domain row counts {sizes}.")


def domain_variances(
    grads: Union[dict[str, Tensor], Sequence[dict[str, Tensor]]],
    domain_sizes: Optional[Sequence[int]] = None,
    *,
    centered: bool = True,
    covariance: str = "diagonal",
    grad_scale: float = 1.0,
    full_covariance_divisor: str = "samples",
) -> Variances:
    """Per-domain gradient variances ``[{name: v_e}]`` from per-sample gradients ``(n, *shape)``.

    ``grads``: one dict whose rows are the domains' samples concatenated in order (then pass
    ``domain_sizes``), or one dict per domain. Diagonal: v_e has the parameter's shape
    (computed by :func:`fishr_lite.blocked.column_variances`, in cache-sized row blocks). Full:
    one (D, D) covariance per parameter tensor of D coordinates, divided by n_e
    (``"samples"``) or n_e * D (``"samples_times_block_size"``, the Colored MNIST script's).
    """
    _check_choice("covariance", covariance, ("diagonal", "full"))
    _check_choice("full_covariance_divisor", full_covariance_divisor, ("samples", "samples_times_block_size"))
    variances: Variances = []
    for domain in _split_domains(grads, domain_sizes):
        out = {}
        for name, g in domain.items():
            block = g.reshape(g.shape[0], -1)
            if grad_scale != 1.0:
                block = block * grad_scale
            if covariance == "diagonal":
                v = column_variances(block, centered).reshape(g.shape[1:])
            else:
                if centered:
                    block = block - block.mean(dim=0, keepdim=True)
                divisor = block.shape[0] * (block.shape[1] if full_covariance_divisor != "samples" else 1)
                v = block.T @ block / divisor
            out[name] = _check_finite(name, v)
        variances.append(out)
    return variances


def _check_finite(name: str, v: Tensor) -> Tensor:
    # a NaN/Inf in any g_i makes its coordinate of v non-finite: checking v is cheap
    if not bool(torch.isfinite(v).all()):
        raise ValueError(
            f"per-sample gradients of {name!r} contain NaN or Inf (or overflow); lower the "
            "learning rate, check the inputs/targets, or clip the logits."
        )
    return v


def variance_distance(
    variances: Variances, *, coordinate_reduction: str = "mean", domain_reduction: str = "mean"
) -> Tensor:
    """R_e C_k (v_e - vbar)_k^2 with vbar the mean of the v_e over domains (see module doc)."""
    _check_choice("coordinate_reduction", coordinate_reduction, ("mean", "sum"))
    _check_choice("domain_reduction", domain_reduction, ("mean", "sum"))
    names = list(variances[0])
    flat = torch.stack([torch.cat([v[name].reshape(-1) for name in names]) for v in variances])
    squared = (flat - flat.mean(dim=0, keepdim=True)).pow(2)
    per_domain = squared.mean(dim=1) if coordinate_reduction == "mean" else squared.sum(dim=1)
    return per_domain.mean() if domain_reduction == "mean" else per_domain.sum()


class DomainMovingAverage:
    """Per-domain EMA of the variances, as DomainBed's Fishr.

    m_e <- ema * m_e_old + (1 - ema) * v_e   (m_e_old = 0 at the first update, kept detached)
    returns m_e / (1 - ema), so the gradient reaching v_e has the same size for every ema.
    """

    def __init__(self, ema: float = DOMAINBED_EMA) -> None:
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema={ema} must be in [0, 1); DomainBed uses {DOMAINBED_EMA}.")
        self.ema = ema
        self.state: Optional[Variances] = None

    def reset(self) -> None:
        self.state = None

    def _check(self, variances: Variances) -> None:
        if self.state is None:
            return
        if len(variances) != len(self.state):
            raise ValueError(
                f"the moving average holds {len(self.state)} domains but got {len(variances)}; "
                "use one DomainMovingAverage per set of domains, or call reset()."
            )
        for e, (new, old) in enumerate(zip(variances, self.state)):
            shapes_new = {k: tuple(v.shape) for k, v in new.items()}
            shapes_old = {k: tuple(v.shape) for k, v in old.items()}
            if shapes_new != shapes_old:
                raise ValueError(
                    f"domain {e}: variance shapes {shapes_new} differ from the moving average's "
                    f"{shapes_old}; call reset() after changing the head or the covariance type."
                )

    def update(self, variances: Variances) -> Variances:
        self._check(variances)
        averaged: Variances = []
        for e, domain in enumerate(variances):
            out = {}
            for name, v in domain.items():
                old = self.state[e][name] if self.state is not None else torch.zeros_like(v)
                out[name] = self.ema * old + (1.0 - self.ema) * v
            averaged.append(out)
        self.state = [{k: v.detach().clone() for k, v in d.items()} for d in averaged]
        return [{k: v / (1.0 - self.ema) for k, v in d.items()} for d in averaged]


def fishr_penalty(
    grads: Union[dict[str, Tensor], Sequence[dict[str, Tensor]]],
    domain_sizes: Optional[Sequence[int]] = None,
    *,
    centered: bool = True,
    covariance: str = "diagonal",
    coordinate_reduction: str = "mean",
    domain_reduction: str = "mean",
    grad_scale: float = 1.0,
    full_covariance_divisor: str = "samples",
    moving_average: Optional[DomainMovingAverage] = None,
) -> Tensor:
    """Fishr penalty from per-sample gradients ``{name: (n, *shape)}`` of concatenated domains
    (with ``domain_sizes``) or from a list of such dicts, one per domain."""
    variances = domain_variances(
        grads,
        domain_sizes,
        centered=centered,
        covariance=covariance,
        grad_scale=grad_scale,
        full_covariance_divisor=full_covariance_divisor,
    )
    return _averaged_distance(variances, moving_average, coordinate_reduction, domain_reduction)


def _averaged_distance(
    variances: Variances,
    moving_average: Optional[DomainMovingAverage],
    coordinate_reduction: str,
    domain_reduction: str,
) -> Tensor:
    """The last two steps of the penalty: the moving average (if any), then the distance."""
    if moving_average is not None:
        variances = moving_average.update(variances)
    return variance_distance(
        variances, coordinate_reduction=coordinate_reduction, domain_reduction=domain_reduction
    )


@dataclass
class PenaltySchedule:
    """Penalty weight per step: ``warmup_weight`` before ``warmup_steps``, then ``weight``.

    ``rescale``: divide the whole loss by the weight when it exceeds 1 (Colored MNIST script).
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
        w = self(step)
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


class Fishr:
    """Stateful Fishr for a training loop: engine + convention + EMA + schedule + switch hooks.

    >>> fishr = Fishr(head, convention="domainbed", schedule=domainbed_schedule(1000., 1500))
    >>> fishr.on_switch(lambda: reset_optimizer_state(optimizer))
    >>> penalty = fishr.penalty([z0, z1], [y0, y1])           # features/targets per domain
    >>> loss = fishr.total_loss(risk, penalty, step)           # applies the weight, fires hooks
    """

    def __init__(
        self,
        head: nn.Module,
        *,
        loss: str = "bce",
        engine: str = "closed_form",
        convention: str = "domainbed",
        ema: Optional[float] = None,
        centered: bool = True,
        covariance: str = "diagonal",
        schedule: Optional[PenaltySchedule] = None,
    ) -> None:
        _check_choice("convention", convention, tuple(CONVENTIONS))
        self.head, self.loss, self.engine = head, loss, engine
        self.options = dict(CONVENTIONS[convention], centered=centered, covariance=covariance)
        if ema is None and convention == "domainbed":
            ema = DOMAINBED_EMA
        self.moving_average = DomainMovingAverage(ema) if ema else None  # 0: no average
        self.schedule = schedule or PenaltySchedule(weight=1.0)
        # closed form + diagonal + linear head: skip the (n, C, d) per-sample gradients
        self._fused = engine == "closed_form" and covariance == "diagonal" and isinstance(head, nn.Linear)
        self._switch_hooks: list[Callable[[], None]] = []

    def penalty(
        self,
        features: Union[Tensor, Sequence[Tensor]],
        targets: Union[Tensor, Sequence[Tensor]],
        domain_sizes: Optional[Sequence[int]] = None,
        logits: Optional[Sequence[Tensor]] = None,
    ) -> Tensor:
        """Penalty for features/targets given per domain (lists) or concatenated + sizes.

        ``logits``: optional per-domain ``head(features)`` already computed by the training
        loop, which the closed-form engine reuses instead of a second forward of the head.
        """
        if isinstance(features, Tensor):
            if domain_sizes is None:
                raise ValueError("concatenated features need domain_sizes; or pass one tensor per domain.")
            y = targets if isinstance(targets, Tensor) else torch.cat(list(targets))
            grads = per_sample_grads(self.head, features, y, loss=self.loss, engine=self.engine)
        else:
            if isinstance(targets, Tensor) or len(targets) != len(features):
                raise ValueError("pass one targets tensor per domain, matching the list of features.")
            scores = [None] * len(features) if logits is None else list(logits)
            if self._fused:
                return self._fused_penalty(features, targets, scores, domain_sizes)
            grads = [  # per domain: no concatenation of the (n, d) features
                per_sample_grads(self.head, z, y, loss=self.loss, engine=self.engine, logits=s)
                for z, y, s in zip(features, targets, scores)
            ]
        return fishr_penalty(grads, domain_sizes, moving_average=self.moving_average, **self.options)

    __call__ = penalty

    def _fused_penalty(self, features, targets, scores, domain_sizes) -> Tensor:
        """The closed-form path: variances straight from residuals and features."""
        check_rows_per_domain([len(z) for z in features], domain_sizes)
        scale, centered = self.options["grad_scale"] ** 2, self.options["centered"]
        variances = []
        for z, y, s in zip(features, targets, scores):
            v = linear_head_variances(self.head, z, y, self.loss, centered=centered, logits=s)
            variances.append({k: _check_finite(k, x * scale if scale != 1.0 else x) for k, x in v.items()})
        return _averaged_distance(variances, self.moving_average, self.options["coordinate_reduction"],
                                  self.options["domain_reduction"])

    def weight(self, step: int) -> float:
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
    "COLORED_MNIST_CONVENTION",
    "DOMAINBED_CONVENTION",
    "DOMAINBED_EMA",
    "DomainMovingAverage",
    "Fishr",
    "PenaltySchedule",
    "check_domain_sizes",
    "colored_mnist_schedule",
    "domain_variances",
    "domainbed_schedule",
    "fishr_penalty",
    "reset_optimizer_state",
    "variance_distance",
]

"""The Fishr penalty: match the per-domain variances of per-sample gradients.

For domain e with n_e per-sample gradients g_i (the rows of an (n_e, D) matrix) ::

    gbar_e  = (1/n_e) sum_i g_i
    v_e     = (1/n_e) sum_i (g_i - gbar_e)^2                  covariance="diagonal"
    V_e     = (1/n_e) sum_i (g_i - gbar_e)(g_i - gbar_e)^T    covariance="full", per tensor
    m_e    <- ema m_e + (1 - ema) v_e,   v_e <- m_e / (1 - ema)  (optional moving average)
    vbar    = (1/E) sum_e v_e
    penalty = R_e C_k (v_e - vbar)_k^2

with R the mean (or sum) over the E domains and C the mean (or sum) over the D coordinates
of all parameters. ``centered=False`` drops gbar_e (the "notcentered" variant).

The two official implementations differ in R, C and the moving average (``CONVENTIONS``):

- ``"domainbed"`` (the default everywhere in fishr_lite; minibatch training): means over
  coordinates and domains, a moving average with ema = 0.95, full covariance divided by n_e.
- ``"colored_mnist"`` (the paper's Colored MNIST script; full-batch): sums over coordinates
  and domains, no moving average, full covariance divided by n_e * D.

Without a moving average (or at its first update, which returns v_e itself) the two differ by
a constant factor: colored_mnist = E * D * domainbed.

This module is the maths, in order: the plain reference variance, its fast path, the
per-domain variances (from per-sample gradients or straight from a linear head), the
distance, the moving average, and :func:`fishr_penalty` which chains them. The stateful
object for a training loop (schedule, warm-up, optimizer reset) is
:class:`fishr_lite.training.FishrPenalty`.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fishr_lite.blocked import column_variances, under_torch_func
from fishr_lite.fused_head import linear_head_with_variances
from fishr_lite.grads import backpack_scores_and_grads, engine_name, per_sample_grads
from fishr_lite.head_variance import linear_head_variances

Variances = list[dict[str, Tensor]]
Gradients = Union[dict[str, Tensor], Sequence[dict[str, Tensor]]]

# --- conventions -------------------------------------------------------------------------

DOMAINBED_CONVENTION = MappingProxyType(
    {"coordinate_reduction": "mean", "domain_reduction": "mean", "grad_scale": 1.0,
     "full_covariance_divisor": "samples"}
)
COLORED_MNIST_CONVENTION = MappingProxyType(
    {"coordinate_reduction": "sum", "domain_reduction": "sum", "grad_scale": 1.0,
     "full_covariance_divisor": "samples_times_block_size"}
)
#: Keyword arguments of :func:`fishr_penalty` for each convention (the default is the first).
CONVENTIONS: Mapping[str, Mapping] = MappingProxyType(
    {"domainbed": DOMAINBED_CONVENTION, "colored_mnist": COLORED_MNIST_CONVENTION}
)
DEFAULT_CONVENTION = "domainbed"
DOMAINBED_EMA = 0.95
#: The moving average each convention uses when none is named, None for no moving average.
CONVENTION_EMA: Mapping[str, Optional[float]] = MappingProxyType(
    {"domainbed": DOMAINBED_EMA, "colored_mnist": None}
)


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise a ValueError naming the allowed values unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {tuple(choices)}.")


def convention_factor(num_domains: int, num_coordinates: int) -> int:
    """colored_mnist / domainbed = E * D, for the same variances without a moving average."""
    return num_domains * num_coordinates


# --- one domain: variance and covariance of per-sample gradients -------------------------

def reference_variance(g: Tensor, centered: bool = True) -> Tensor:
    """v = (1/n) sum_i (g_i - gbar)^2 per column of the (n, D) matrix ``g``, written plainly.

    The reference every fast path is tested against; also the path taken where the fast one
    cannot go (inside ``torch.func`` transforms).
    """
    deviation = g - g.mean(dim=0, keepdim=True) if centered else g
    return deviation.square().mean(dim=0)


def gradient_variance(g: Tensor, centered: bool = True) -> Tensor:
    """:func:`reference_variance`, computed by the row-blocked fast path
    (:func:`fishr_lite.blocked.column_variances`, float32 accumulation for half precision)
    except inside ``torch.func`` transforms."""
    if under_torch_func(g):
        return reference_variance(g, centered)
    return column_variances(g, centered)


def gradient_covariance(g: Tensor, centered: bool = True, divisor: str = "samples") -> Tensor:
    """V = sum_i (g_i - gbar)(g_i - gbar)^T / n (``"samples"``) or / (n D)
    (``"samples_times_block_size"``, the Colored MNIST script's) of the (n, D) matrix ``g``;
    accumulated in float32 for half precision."""
    check_choice("full_covariance_divisor", divisor, ("samples", "samples_times_block_size"))
    with torch.autocast(g.device.type, enabled=False):
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        deviation = g - g.mean(dim=0, keepdim=True) if centered else g
        n, size = g.shape
        return deviation.T @ deviation / (n * (size if divisor != "samples" else 1))


# --- every domain ------------------------------------------------------------------------

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


def check_rows_per_domain(rows: Sequence[int], domain_sizes: Optional[Sequence[int]]) -> None:
    """Validate per-domain row counts (>= 2 each), and that ``domain_sizes``, if given, equals them."""
    sizes = [int(r) for r in rows]
    check_domain_sizes(sizes, sum(sizes))
    if domain_sizes is not None and [int(s) for s in domain_sizes] != sizes:
        raise ValueError(f"domain_sizes {list(domain_sizes)} differ from the per-domain row counts {sizes}.")


def split_domains(rows: Tensor, domain_sizes: Optional[Sequence[int]]) -> list[Tensor]:
    """The rows of concatenated domains, one tensor per domain."""
    if domain_sizes is None:
        raise ValueError("concatenated rows need domain_sizes; or pass one tensor (or dict) per domain.")
    return list(torch.split(rows, check_domain_sizes(domain_sizes, rows.shape[0])))


def _per_domain(grads: Gradients, domain_sizes: Optional[Sequence[int]]) -> list[dict[str, Tensor]]:
    """Per-domain dicts, from one dict of concatenated rows + sizes, or from per-domain dicts."""
    if isinstance(grads, dict):
        if not grads:
            raise ValueError("no per-sample gradients given; pass {name: (n, *param.shape)} tensors.")
        n = next(iter(grads.values())).shape[0]
        for name, g in grads.items():
            if g.shape[0] != n:
                raise ValueError(f"grads[{name!r}] has {g.shape[0]} rows, others {n}; pass one row per sample.")
        split = {name: split_domains(g, domain_sizes) for name, g in grads.items()}
        return [{name: parts[e] for name, parts in split.items()} for e in range(len(domain_sizes))]
    domains = list(grads)
    check_rows_per_domain([next(iter(d.values())).shape[0] if d else 0 for d in domains], domain_sizes)
    return domains


def domain_variances(
    grads: Gradients,
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
    (:func:`gradient_variance`). Full: one (D, D) covariance per parameter tensor of D
    coordinates (:func:`gradient_covariance`). ``grad_scale`` multiplies every g_i first.
    """
    check_choice("covariance", covariance, ("diagonal", "full"))
    check_choice("full_covariance_divisor", full_covariance_divisor, ("samples", "samples_times_block_size"))
    variances: Variances = []
    for domain in _per_domain(grads, domain_sizes):
        out = {}
        for name, g in domain.items():
            rows = g.reshape(g.shape[0], -1)
            if grad_scale != 1.0:
                rows = rows * grad_scale
            if covariance == "diagonal":
                out[name] = gradient_variance(rows, centered).reshape(g.shape[1:])
            else:
                out[name] = gradient_covariance(rows, centered, full_covariance_divisor)
        variances.append(out)
    return variances


def head_variances(
    head: nn.Module,
    features: Sequence[Tensor],
    targets: Sequence[Tensor],
    *,
    loss: str = "bce",
    engine: str = "closed_form",
    logits: Optional[Sequence[Optional[Tensor]]] = None,
    centered: bool = True,
    covariance: str = "diagonal",
    grad_scale: float = 1.0,
    full_covariance_divisor: str = "samples",
) -> Variances:
    """Per-domain variances of the per-sample gradients of ``loss(head(z_i), y_i)`` w.r.t. the
    head's parameters, for ``features`` and ``targets`` given one tensor per domain.

    An ``nn.Linear`` head with ``engine="closed_form"`` and a diagonal covariance takes the
    fused path (:func:`fishr_lite.head_variance.linear_head_variances`: no (n, C, d)
    per-sample gradients); every other case computes the per-sample gradients with
    ``engine`` and passes them to :func:`domain_variances`. ``logits``: optional per-domain
    ``head(features)`` already computed, reused by the closed form.
    """
    _check_domains(features, targets)
    engine = engine_name(engine)
    scores = [None] * len(features) if logits is None else list(logits)
    if _takes_closed_form(head, features, engine, covariance):
        return [_scaled(linear_head_variances(head, z, y, loss, centered=centered, logits=s), grad_scale)
                for z, y, s in zip(features, targets, scores)]
    grads = [per_sample_grads(head, z, y, loss=loss, engine=engine, logits=s)
             for z, y, s in zip(features, targets, scores)]
    return domain_variances(grads, centered=centered, covariance=covariance, grad_scale=grad_scale,
                            full_covariance_divisor=full_covariance_divisor)


def _check_domains(features: Sequence[Tensor], targets: Sequence[Tensor]) -> None:
    """One targets tensor per domain, and at least two rows in each."""
    if len(targets) != len(features):
        raise ValueError(f"{len(features)} feature tensors but {len(targets)} target tensors; "
                         "pass one targets tensor per domain.")
    check_rows_per_domain([len(z) for z in features], None)


def _scaled(variances: dict[str, Tensor], grad_scale: float) -> dict[str, Tensor]:
    """The closed form's variances of g_i, as those of ``grad_scale * g_i``."""
    return variances if grad_scale == 1.0 else {name: v * grad_scale ** 2 for name, v in variances.items()}


def _takes_closed_form(head: nn.Module, features: Sequence[Tensor], engine: str, covariance: str) -> bool:
    """Whether the variances come from ``fishr_lite.head_variance`` (no per-sample gradients)."""
    return (engine == "closed_form" and covariance == "diagonal" and isinstance(head, nn.Linear)
            and not any(under_torch_func(z) for z in features))


def head_scores_and_variances(
    head: nn.Module,
    features: Sequence[Tensor],
    targets: Sequence[Tensor],
    **options: Any,
) -> tuple[list[Tensor], Variances]:
    """``([head(z_e)], head_variances(...))``: each domain's scores, computed here, and the
    variances of :func:`head_variances` (same ``options``) for them. The head runs once per
    domain: with the closed form on an ``nn.Linear`` head and a diagonal covariance, head and
    variances are one autograd node where ``fishr_lite.fused_head.takes_fused_path`` (float32
    or float64, no autocast); with BackPACK, the scores are those of the forward its hooks record."""
    _check_domains(features, targets)
    engine, loss = engine_name(options.pop("engine", "closed_form")), options.pop("loss", "bce")
    if _takes_closed_form(head, features, engine, options.get("covariance", "diagonal")):
        centered, grad_scale = options.get("centered", True), options.get("grad_scale", 1.0)
        scores, variances = zip(*(linear_head_with_variances(head, z, y, loss, centered=centered)
                                  for z, y in zip(features, targets)))
        return list(scores), [_scaled(v, grad_scale) for v in variances]
    if engine == "backpack" and not any(under_torch_func(z) for z in features):
        scores, grads = zip(*(backpack_scores_and_grads(head, z, y, loss) for z, y in zip(features, targets)))
        return list(scores), domain_variances(list(grads), **options)
    scores = [head(z) for z in features]
    return scores, head_variances(head, features, targets, loss=loss, engine=engine, logits=scores, **options)


# --- between domains ---------------------------------------------------------------------

def variance_distance(
    variances: Variances, *, coordinate_reduction: str = "mean", domain_reduction: str = "mean"
) -> Tensor:
    """R_e C_k (v_e - vbar)_k^2 with vbar the mean of the v_e over domains (see module doc)."""
    check_choice("coordinate_reduction", coordinate_reduction, ("mean", "sum"))
    check_choice("domain_reduction", domain_reduction, ("mean", "sum"))
    names = list(variances[0])
    flat = torch.stack([torch.cat([v[name].reshape(-1) for name in names]) for v in variances])
    squared = (flat - flat.mean(dim=0, keepdim=True)).pow(2)
    per_domain = squared.mean(dim=1) if coordinate_reduction == "mean" else squared.sum(dim=1)
    return per_domain.mean() if domain_reduction == "mean" else per_domain.sum()


class DomainMovingAverage:
    """Per-domain exponential moving average of the variances, as DomainBed's Fishr.

    m_e <- ema * m_e_old + (1 - ema) * v_e   (m_e_old = 0 at the first update, kept detached)
    returns m_e / (1 - ema), so the gradient reaching v_e has the same size for every ema.

    The state advances only in a training step: a call under ``torch.no_grad()`` or
    ``torch.inference_mode()``, or with ``update=False``, returns the same average without
    storing it (for logging and evaluation).
    """

    def __init__(self, ema: float = DOMAINBED_EMA) -> None:
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema={ema} must be in [0, 1); DomainBed uses {DOMAINBED_EMA}.")
        self.ema = ema
        self.state: Optional[Variances] = None

    def reset(self) -> None:
        """Forget the average (the next update starts from zero)."""
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

    def __call__(self, variances: Variances, *, update: Optional[bool] = None) -> Variances:
        """The averaged variances m_e / (1 - ema); stores m_e if ``update`` (default: only
        when gradients are being recorded, i.e. not under no_grad / inference_mode)."""
        if update is None:
            update = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        self._check(variances)
        averaged: Variances = []
        for e, domain in enumerate(variances):
            out = {}
            for name, v in domain.items():
                old = self.state[e][name] if self.state is not None else torch.zeros_like(v)
                out[name] = self.ema * old + (1.0 - self.ema) * v
            averaged.append(out)
        if update:
            self.state = [{k: v.detach().clone() for k, v in d.items()} for d in averaged]
        return [{k: v / (1.0 - self.ema) for k, v in d.items()} for d in averaged]


# --- the penalty -------------------------------------------------------------------------

def check_finite(penalty: Tensor, variances: Variances) -> Tensor:
    """Raise if ``penalty`` is NaN or Inf, naming the parameter whose variance is not finite.

    One device synchronisation per call (the bool of one scalar); the per-parameter search
    runs only on the failure path. Skipped inside ``torch.func`` transforms (no data-dependent
    control flow there).
    """
    if under_torch_func(penalty) or bool(torch.isfinite(penalty)):
        return penalty
    culprits = sorted({name for domain in variances for name, v in domain.items()
                       if not bool(torch.isfinite(v).all())})
    where = f"the per-sample gradients of {culprits}" if culprits else "the penalty"
    raise ValueError(
        f"{where} contain NaN or Inf (or overflow); lower the learning rate, check the "
        "inputs/targets, or clip the logits."
    )


def averaged_distance(
    variances: Variances,
    *,
    moving_average: Optional[DomainMovingAverage] = None,
    update: Optional[bool] = None,
    coordinate_reduction: str = "mean",
    domain_reduction: str = "mean",
) -> Tensor:
    """The last steps of the penalty: the moving average (if any), the distance, the check."""
    averaged = variances if moving_average is None else moving_average(variances, update=update)
    penalty = variance_distance(
        averaged, coordinate_reduction=coordinate_reduction, domain_reduction=domain_reduction
    )
    return check_finite(penalty, variances)


def fishr_penalty(
    grads: Gradients,
    domain_sizes: Optional[Sequence[int]] = None,
    *,
    centered: bool = True,
    covariance: str = "diagonal",
    coordinate_reduction: str = "mean",
    domain_reduction: str = "mean",
    grad_scale: float = 1.0,
    full_covariance_divisor: str = "samples",
    moving_average: Optional[DomainMovingAverage] = None,
    update: Optional[bool] = None,
) -> Tensor:
    """Fishr penalty from per-sample gradients ``{name: (n, *shape)}`` of concatenated domains
    (with ``domain_sizes``) or from a list of such dicts, one per domain.

    The keyword defaults are DomainBed's reductions; ``**COLORED_MNIST_CONVENTION`` gives the
    script's. ``update`` is passed to the moving average (see :class:`DomainMovingAverage`).
    """
    variances = domain_variances(
        grads, domain_sizes, centered=centered, covariance=covariance, grad_scale=grad_scale,
        full_covariance_divisor=full_covariance_divisor,
    )
    return averaged_distance(variances, moving_average=moving_average, update=update,
                             coordinate_reduction=coordinate_reduction,
                             domain_reduction=domain_reduction)


__all__ = [
    "COLORED_MNIST_CONVENTION",
    "CONVENTIONS",
    "CONVENTION_EMA",
    "DEFAULT_CONVENTION",
    "DOMAINBED_CONVENTION",
    "DOMAINBED_EMA",
    "DomainMovingAverage",
    "averaged_distance",
    "check_domain_sizes",
    "convention_factor",
    "domain_variances",
    "fishr_penalty",
    "gradient_covariance",
    "gradient_variance",
    "head_scores_and_variances",
    "head_variances",
    "reference_variance",
    "variance_distance",
]

"""fishr_lite: Fishr (Rame, Dancette & Cord, ICML 2022) on current PyTorch and BackPACK.

The library is layered; lower layers never import upper ones::

    grads (per-sample gradients) -> penalty (the maths of Fishr) -> training (FishrPenalty,
    schedules) -> objectives (ERM, IRM, V-REx, Fishr, ...)
    grads -> diagnostics (gradient moments, Fisher, GGN, Hessian, alignment)
    data, toy, gradient_agreement, results, profiles, plotting: leaves
    experiments.coloredmnist, domainbed: experiments built on the layers above

Quick use: ``from fishr_lite import FishrPenalty`` (see the README), ``from fishr_lite import
diagnostics``, ``python -m fishr_lite.experiments.coloredmnist --help``,
``python -m fishr_lite.domainbed.report --help``.

Three things carry Fishr's name, one per layer: :class:`~fishr_lite.training.FishrPenalty`
(the penalty of a head, for any training loop), :class:`fishr_lite.objectives.FishrObjective`
(the same penalty as an objective over per-domain batches) and
:class:`~fishr_lite.domainbed.invariance.FishrAlgorithm` (DomainBed's ``Fishr`` algorithm,
also ``fishr_lite.domainbed.algorithms.FishrAlgorithm``). ``fishr_lite.Fishr`` is the former
name of ``FishrPenalty``, kept with a DeprecationWarning.
"""

from __future__ import annotations

import warnings
from typing import Any

__version__ = "0.1.0"

from fishr_lite.grads import ENGINES, per_sample_grads  # noqa: E402
from fishr_lite.objectives import DomainBatch, FishrObjective, Objective, make_objective  # noqa: E402
from fishr_lite.penalty import (  # noqa: E402
    COLORED_MNIST_CONVENTION,
    CONVENTIONS,
    DOMAINBED_CONVENTION,
    DomainMovingAverage,
    domain_variances,
    fishr_penalty,
    variance_distance,
)
from fishr_lite.training import (  # noqa: E402
    FishrPenalty,
    PenaltySchedule,
    colored_mnist_schedule,
    domainbed_schedule,
    reset_optimizer_state,
)

__all__ = [
    "COLORED_MNIST_CONVENTION",
    "CONVENTIONS",
    "DOMAINBED_CONVENTION",
    "DomainBatch",
    "DomainMovingAverage",
    "ENGINES",
    "FishrObjective",
    "FishrPenalty",
    "Objective",
    "PenaltySchedule",
    "colored_mnist_schedule",
    "domain_variances",
    "domainbed_schedule",
    "fishr_penalty",
    "make_objective",
    "per_sample_grads",
    "reset_optimizer_state",
    "variance_distance",
]


def __getattr__(name: str) -> Any:
    if name == "Fishr":
        warnings.warn("fishr_lite.Fishr is now fishr_lite.FishrPenalty (same class and "
                      "arguments); import FishrPenalty instead.", DeprecationWarning, stacklevel=2)
        return FishrPenalty
    raise AttributeError(f"module 'fishr_lite' has no attribute {name!r}")

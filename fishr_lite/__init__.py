"""fishr_lite: Fishr (Rame, Dancette & Cord, ICML 2022) on current PyTorch and BackPACK.

The library is layered; lower layers never import upper ones::

    grads (per-sample gradients) -> penalty (Fishr) -> objectives (ERM, IRM, V-REx, Fishr, ...)
    grads -> diagnostics (gradient moments, Fisher, GGN, Hessian, alignment)
    data, toy, gradient_agreement, results, profiles, plotting: leaves
    experiments.coloredmnist, domainbed: experiments built on the layers above

Quick use: ``from fishr_lite import Fishr`` (see the README), ``from fishr_lite import
diagnostics``, ``python -m fishr_lite.experiments.coloredmnist --help``,
``python -m fishr_lite.domainbed.report --help``.
"""

__version__ = "0.1.0"

from fishr_lite.grads import ENGINES, per_sample_grads  # noqa: E402
from fishr_lite.objectives import DomainBatch, Objective, make_objective  # noqa: E402
from fishr_lite.penalty import (  # noqa: E402
    COLORED_MNIST_CONVENTION,
    DOMAINBED_CONVENTION,
    DomainMovingAverage,
    Fishr,
    PenaltySchedule,
    fishr_penalty,
    reset_optimizer_state,
)

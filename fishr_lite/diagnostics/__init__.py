"""Diagnostics: per-domain gradient moments, Fisher, GGN and Hessian, and domain alignment.

A model is ``featurizer`` + ``head`` (``featurizer=None`` for a model that is only a head);
data is a list of per-domain ``(x, y)`` batches; ``loss`` is "bce" or "ce" as in
``fishr_lite.grads``. Every function returns one result per domain, for the mean loss
R_e = (1/n_e) sum_i l_i of that domain, flat over ``params`` ("head" or "all"; label the
coordinates with ``parameter_names``)::

    from fishr_lite import diagnostics as dx
    domains = [(x0, y0), (x1, y1)]
    dx.gradient_moments(featurizer, head, domains)         # gbar_e, v_e, C_e   (moments.py)
    dx.fisher(featurizer, head, domains)                   # F_e, exact or mc   (curvature.py)
    dx.hessian(featurizer, head, domains)                  # H_e                (curvature.py)
    dx.backpack_diagonal(featurizer, head, domains, "ggn") # whole network      (backpack_curvature.py)
    dx.top_eigenvalues(featurizer, head, domains, k=3)     # whole network      (hvp.py)
    dx.model_inconsistency(featurizer, head, domains, epsilon=0.1, damping=1e-4)   (alignment.py)
    dx.covariance_identity(featurizer, head, (x0, y0))     # checks            (identities.py)
    dx.CurvatureTracker(featurizer, head, domains, every=50)                       (tracker.py)
"""

from fishr_lite.diagnostics.alignment import (
    InconsistencyScore,
    cosine_similarity,
    inconsistency_score,
    max_generalized_eigenvalue,
    model_inconsistency,
    pairwise_alignment,
    relative_frobenius_distance,
    trace_ratio,
)
from fishr_lite.diagnostics.backpack_curvature import BACKPACK_QUANTITIES, backpack_diagonal
from fishr_lite.diagnostics.curvature import (
    CURVATURES,
    curvature,
    domain_risks,
    empirical_fisher,
    fisher,
    ggn,
    hessian,
)
from fishr_lite.diagnostics.functional import Network, parameter_names
from fishr_lite.diagnostics.hvp import (
    hessian_vector_product,
    hutchinson_diagonal,
    hutchinson_trace,
    lanczos,
    power_iteration,
    top_eigenvalues,
)
from fishr_lite.diagnostics.identities import (
    IdentityCheck,
    covariance_identity,
    expected_empirical_fisher_identity,
    fisher_ggn_identity,
    fit_logistic_regression,
    ggn_hessian_identity,
    hessian_decomposition_identity,
    output_curvature_term,
)
from fishr_lite.diagnostics.moments import GradientMoments, domain_gradients, gradient_moments
from fishr_lite.diagnostics.tracker import DEFAULT_QUANTITIES, TRACKED_QUANTITIES, CurvatureTracker

__all__ = [
    "BACKPACK_QUANTITIES",
    "CURVATURES",
    "CurvatureTracker",
    "DEFAULT_QUANTITIES",
    "GradientMoments",
    "IdentityCheck",
    "InconsistencyScore",
    "Network",
    "TRACKED_QUANTITIES",
    "backpack_diagonal",
    "cosine_similarity",
    "covariance_identity",
    "curvature",
    "domain_gradients",
    "domain_risks",
    "empirical_fisher",
    "expected_empirical_fisher_identity",
    "fisher",
    "fisher_ggn_identity",
    "fit_logistic_regression",
    "ggn",
    "ggn_hessian_identity",
    "gradient_moments",
    "hessian",
    "hessian_decomposition_identity",
    "hessian_vector_product",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "inconsistency_score",
    "lanczos",
    "max_generalized_eigenvalue",
    "model_inconsistency",
    "output_curvature_term",
    "pairwise_alignment",
    "parameter_names",
    "power_iteration",
    "relative_frobenius_distance",
    "top_eigenvalues",
    "trace_ratio",
]

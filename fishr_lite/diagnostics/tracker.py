"""Track the diagnostics during training: tidy records (step, domain, quantity, value). ::

    tracker = CurvatureTracker(featurizer, head, [(x0, y0), (x1, y1)], names=["e=0.2", "e=0.1"], every=50)
    for step in range(steps):
        ...                                  # one training step
        tracker(step)                        # measures when step % every == 0
    frame = tracker.to_frame()               # pandas: seaborn.lineplot(frame, x="step", y="value", hue="domain")

Per-domain quantities (head parameters, full matrices) have ``domain`` = the domain's name;
pairwise ones ``"A vs B"``; cross-domain ones ``"all"``. The tracker only reads the model
(no ``.grad`` is written, nothing is trained); it measures the model in its current mode, so
call ``model.eval()`` first if it has dropout. Add a quantity with
``TRACKED_QUANTITIES["name"] = lambda snapshot: {domain: value}``.
"""

from __future__ import annotations

import itertools
from functools import cached_property
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from fishr_lite.diagnostics.alignment import cosine_similarity, inconsistency_score, relative_frobenius_distance
from fishr_lite.diagnostics.curvature import domain_risks, empirical_fisher, fisher, hessian
from fishr_lite.diagnostics.functional import Domain, check_domains
from fishr_lite.diagnostics.hvp import hutchinson_trace, top_eigenvalues
from fishr_lite.diagnostics.moments import GradientMoments, gradient_moments
from fishr_lite.penalty import variance_distance


class Snapshot:
    """The model's diagnostics at one step, each computed at most once (lazily)."""

    def __init__(self, tracker: "CurvatureTracker") -> None:
        self.tracker = tracker
        self.names = tracker.names
        self._args = (tracker.featurizer, tracker.head, tracker.domains)
        self.loss = tracker.loss

    @cached_property
    def risks(self) -> Tensor:
        return domain_risks(*self._args, loss=self.loss)

    @cached_property
    def moments(self) -> list[GradientMoments]:
        return gradient_moments(*self._args, loss=self.loss, params="head", full=True)

    @cached_property
    def empirical_fisher(self) -> list[Tensor]:
        return empirical_fisher(*self._args, loss=self.loss)

    @cached_property
    def fisher(self) -> list[Tensor]:
        return fisher(*self._args, loss=self.loss)

    @cached_property
    def hessian(self) -> list[Tensor]:
        return hessian(*self._args, loss=self.loss)

    def per_domain(self, values: Sequence[float]) -> dict[str, float]:
        return {name: float(v) for name, v in zip(self.names, values)}

    def per_pair(self, measure: Callable[[Tensor, Tensor], float], matrices: Sequence[Tensor]) -> dict[str, float]:
        pairs = itertools.combinations(range(len(matrices)), 2)
        return {f"{self.names[a]} vs {self.names[b]}": measure(matrices[a], matrices[b]) for a, b in pairs}


def _inconsistency(snapshot: Snapshot) -> dict[str, float]:
    tracker = snapshot.tracker
    score = inconsistency_score(snapshot.risks, snapshot.hessian, tracker.epsilon, damping=tracker.damping,
                                names=snapshot.names)
    return {"all": score.value}


TRACKED_QUANTITIES: dict[str, Callable[[Snapshot], dict[str, float]]] = {
    "risk": lambda s: s.per_domain(s.risks),
    "grad_mean_norm": lambda s: s.per_domain([m.mean.norm() for m in s.moments]),
    "grad_variance_trace": lambda s: s.per_domain([m.variance.sum() for m in s.moments]),
    "empirical_fisher_trace": lambda s: s.per_domain([torch.trace(f) for f in s.empirical_fisher]),
    "fisher_trace": lambda s: s.per_domain([torch.trace(f) for f in s.fisher]),
    "hessian_trace": lambda s: s.per_domain([torch.trace(h) for h in s.hessian]),
    "hessian_max_eigenvalue": lambda s: s.per_domain([torch.linalg.eigvalsh(h)[-1] for h in s.hessian]),
    "variance_hessian_cosine": lambda s: s.per_domain(
        [cosine_similarity(m.variance, torch.diagonal(h)) for m, h in zip(s.moments, s.hessian)]
    ),
    "fishr_penalty": lambda s: {"all": float(variance_distance([{"v": m.variance} for m in s.moments]))},
    "hessian_relative_distance": lambda s: s.per_pair(relative_frobenius_distance, s.hessian),
    "hessian_cosine_similarity": lambda s: s.per_pair(cosine_similarity, s.hessian),
    "inconsistency": _inconsistency,
    # whole network, by Hessian-vector products (slower; not in the defaults)
    "network_hessian_trace": lambda s: s.per_domain(
        hutchinson_trace(*s._args, loss=s.loss, params="all", samples=s.tracker.hvp_samples)
    ),
    "network_hessian_top_eigenvalue": lambda s: s.per_domain(
        [v[0] for v in top_eigenvalues(*s._args, loss=s.loss, params="all", iterations=s.tracker.hvp_samples)]
    ),
}
DEFAULT_QUANTITIES = tuple(q for q in TRACKED_QUANTITIES if not q.startswith("network_"))


class CurvatureTracker:
    """Measure ``quantities`` (keys of ``TRACKED_QUANTITIES``) every ``every`` steps.

    ``epsilon``, ``damping``: of the inconsistency score (damping delta adds delta I to each
    head Hessian H_A; a dead ReLU unit makes H_A singular, hence the small default).
    ``hvp_samples``: Hutchinson samples / Lanczos steps of the ``network_*`` quantities.
    """

    def __init__(
        self,
        featurizer: Optional[nn.Module],
        head: nn.Module,
        domains: Sequence[Domain],
        *,
        loss: str = "bce",
        every: int = 1,
        quantities: Sequence[str] = DEFAULT_QUANTITIES,
        names: Optional[Sequence[str]] = None,
        epsilon: float = 0.1,
        damping: float = 1e-4,
        hvp_samples: int = 20,
    ) -> None:
        self.domains = check_domains(domains, loss)
        unknown = [q for q in quantities if q not in TRACKED_QUANTITIES]
        if unknown:
            raise ValueError(f"unknown quantities {unknown}; use keys of TRACKED_QUANTITIES: {sorted(TRACKED_QUANTITIES)}.")
        if every < 1:
            raise ValueError(f"every={every}; measure every k >= 1 steps.")
        self.names = [str(e) for e in range(len(self.domains))] if names is None else [str(n) for n in names]
        if len(self.names) != len(self.domains):
            raise ValueError(f"{len(self.names)} names for {len(self.domains)} domains; pass one name per domain.")
        self.featurizer, self.head, self.loss = featurizer, head, loss
        self.every, self.quantities = every, list(quantities)
        self.epsilon, self.damping, self.hvp_samples = epsilon, damping, hvp_samples
        self.records: list[dict] = []

    def measure(self, step: int) -> list[dict]:
        """Measure now (whatever the step); append and return the new records."""
        snapshot = Snapshot(self)
        new = [
            {"step": int(step), "domain": domain, "quantity": quantity, "value": value}
            for quantity in self.quantities
            for domain, value in TRACKED_QUANTITIES[quantity](snapshot).items()
        ]
        self.records.extend(new)
        return new

    def __call__(self, step: int) -> list[dict]:
        """Records of this step if ``step % every == 0``, else ``[]``."""
        return self.measure(step) if step % self.every == 0 else []

    def to_frame(self) -> "pandas.DataFrame":
        """The records as a pandas DataFrame with columns step, domain, quantity, value."""
        try:
            import pandas as pd
        except ImportError as error:  # pragma: no cover - pandas ships with the book extra
            raise ValueError("to_frame needs pandas: `pip install pandas`, or use tracker.records.") from error
        return pd.DataFrame(self.records, columns=["step", "domain", "quantity", "value"])

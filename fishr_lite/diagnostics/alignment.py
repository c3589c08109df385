"""How aligned are the domains' curvatures? Distances, similarities, and the inconsistency score.

Curvatures are per-domain tensors: (D, D) matrices or (D,) diagonals (as returned by
``fishr_lite.diagnostics.curvature`` / ``moments``). For two of them A, B: ::

    relative Frobenius distance  2 ||A - B||_F / (||A||_F + ||B||_F)      in [0, 2], symmetric
    cosine similarity            <a, b> / (||a|| ||b||), a, b the diagonals (or flattened)
    trace ratio                  tr(A) / tr(B)

The paper's inconsistency score (Rame et al., 2022, Sec. 3 and App. C) around a stationary
theta*, with the second-order expansion R_e(theta* + theta) ~ R_e + 1/2 theta^T H_e theta: ::

    I^eps = max_{A != B} [ R_B - R_A + max_{1/2 theta^T H_A theta <= eps} 1/2 theta^T H_B theta ]
          = max_{A != B} [ R_B - R_A + eps * max(lambda_max(H_A^{-1} H_B), 0) ]

for positive definite H_A (the inner maximum is 0 when H_B has no positive direction). A
singular or indefinite H_A makes the inner maximum infinite; ``damping`` = delta replaces
H_A by H_A + delta I, and the result records the delta used.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fishr_lite.diagnostics.curvature import curvature, domain_risks
from fishr_lite.diagnostics.functional import Domain


def _check_square(m: Tensor) -> None:
    if m.dim() not in (1, 2) or (m.dim() == 2 and m.shape[0] != m.shape[1]):
        raise ValueError(f"expected a (D,) diagonal or a square (D, D) matrix, got shape {tuple(m.shape)}.")


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"curvatures of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be compared; pass "
            "two (D, D) matrices or two (D,) diagonals over the same parameters."
        )
    _check_square(a)


def relative_frobenius_distance(a: Tensor, b: Tensor) -> float:
    """2 ||A - B||_F / (||A||_F + ||B||_F): 0 when equal, 2 when B = -A (0 if both are 0)."""
    _check_pair(a, b)
    scale = torch.linalg.norm(a) + torch.linalg.norm(b)
    return 0.0 if scale == 0 else float(2 * torch.linalg.norm(a - b) / scale)


def _diagonal(m: Tensor) -> Tensor:
    return m if m.dim() == 1 else torch.diagonal(m)


def cosine_similarity(a: Tensor, b: Tensor, *, diagonal: bool = True) -> float:
    """<a, b> / (||a|| ||b||) of the diagonals (``diagonal=True``; a (D,) diagonal and a (D, D)
    matrix may be mixed, e.g. Fishr's v_e against diag(H_e)) or of the flattened matrices."""
    if diagonal:
        _check_square(a), _check_square(b)
        u, v = _diagonal(a), _diagonal(b)
        _check_pair(u, v)
    else:
        _check_pair(a, b)
        u, v = a.reshape(-1), b.reshape(-1)
    norms = torch.linalg.norm(u) * torch.linalg.norm(v)
    if norms == 0:
        raise ValueError("cosine similarity of a zero curvature is undefined; check that the domain has samples.")
    return float(torch.dot(u, v) / norms)


def trace_ratio(a: Tensor, b: Tensor) -> float:
    """tr(A) / tr(B) (sum of the diagonal; diagonals and matrices may be mixed)."""
    _check_square(a), _check_square(b)
    _check_pair(_diagonal(a), _diagonal(b))
    denominator = _diagonal(b).sum()
    if denominator == 0:
        raise ValueError("tr(B) = 0, the trace ratio is undefined; swap A and B or use trace differences.")
    return float(_diagonal(a).sum() / denominator)


def pairwise_alignment(curvatures: Sequence[Tensor], names: Optional[Sequence[str]] = None) -> list[dict]:
    """Tidy records, one per unordered pair of domains: relative Frobenius distance, cosine
    similarity of diagonals, trace ratio (first over second)."""
    names = [str(e) for e in range(len(curvatures))] if names is None else [str(n) for n in names]
    if len(names) != len(curvatures):
        raise ValueError(f"{len(names)} names for {len(curvatures)} curvatures; pass one name per domain.")
    rows = []
    for (i, a), (j, b) in itertools.combinations(enumerate(curvatures), 2):
        rows.append({
            "domain_a": names[i],
            "domain_b": names[j],
            "relative_frobenius_distance": relative_frobenius_distance(a, b),
            "cosine_similarity": cosine_similarity(a, b),
            "trace_ratio": trace_ratio(a, b),
        })
    return rows


def max_generalized_eigenvalue(h_a: Tensor, h_b: Tensor, *, damping: float = 0.0, name_a: str = "A") -> float:
    """lambda_max(H_A^{-1} H_B) = lambda_max(H_A^{-1/2} H_B H_A^{-1/2}) for symmetric H_A + delta I > 0.

    Diagonals are treated as diagonal matrices: max_k b_k / a_k.
    """
    _check_pair(h_a, h_b)
    if damping < 0:
        raise ValueError(f"damping={damping} must be >= 0.")
    if h_a.dim() == 1:
        a = h_a + damping
        _check_positive_definite(a.min(), a.abs().max(), name_a, damping)
        return float((h_b / a).max())
    sym_a = (h_a + h_a.T) / 2 + damping * torch.eye(h_a.shape[0], dtype=h_a.dtype, device=h_a.device)
    values, vectors = torch.linalg.eigh(sym_a)
    _check_positive_definite(values[0], values.abs().max(), name_a, damping)
    inverse_root = vectors * values.rsqrt()  # V diag(lambda^-1/2): whitening by H_A
    whitened = inverse_root.T @ ((h_b + h_b.T) / 2) @ inverse_root
    return float(torch.linalg.eigvalsh(whitened)[-1])


def _check_positive_definite(smallest: Tensor, largest: Tensor, name: str, damping: float) -> None:
    if smallest <= 1e-12 * max(float(largest), 1e-300):
        raise ValueError(
            f"H_A of domain {name} is not positive definite (smallest eigenvalue {float(smallest):.3g} "
            f"with damping {damping}); the inner maximum over {{1/2 theta^T H_A theta <= eps}} is "
            "infinite. Pass damping > 0 (H_A + damping * I, e.g. 1e-3 times its largest eigenvalue), "
            "which the result reports."
        )


@dataclass
class InconsistencyScore:
    """``value`` = I^eps, reached at ``pair`` = (A, B); ``pairs`` one record per ordered pair."""

    value: float
    pair: tuple[str, str]
    epsilon: float
    damping: float
    pairs: list[dict] = field(default_factory=list)


def inconsistency_score(
    risks: Sequence[float] | Tensor,
    curvatures: Sequence[Tensor],
    epsilon: float,
    *,
    damping: float = 0.0,
    names: Optional[Sequence[str]] = None,
) -> InconsistencyScore:
    """I^eps = max over ordered pairs (A, B), A != B, of R_B - R_A + eps * max(lambda_max(H_A^{-1} H_B), 0).

    ``risks``: (E,) R_e; ``curvatures``: E Hessians (or diagonals); ``damping`` = delta adds
    delta I to each H_A (0: H_A must be positive definite, else a ValueError).
    """
    values = [float(r) for r in (risks.tolist() if isinstance(risks, Tensor) else risks)]
    if len(values) != len(curvatures) or len(values) < 2:
        raise ValueError(
            f"{len(values)} risks and {len(curvatures)} curvatures; pass one of each per domain, at least two domains."
        )
    if epsilon < 0:
        raise ValueError(f"epsilon={epsilon} must be >= 0.")
    names = [str(e) for e in range(len(values))] if names is None else [str(n) for n in names]
    rows = []
    for a, b in itertools.permutations(range(len(values)), 2):
        lam = max_generalized_eigenvalue(curvatures[a], curvatures[b], damping=damping, name_a=names[a])
        rows.append({
            "domain_a": names[a],
            "domain_b": names[b],
            "risk_gap": values[b] - values[a],
            "lambda_max": lam,
            "curvature_term": epsilon * max(lam, 0.0),
            "score": values[b] - values[a] + epsilon * max(lam, 0.0),
        })
    best = max(rows, key=lambda row: row["score"])
    return InconsistencyScore(best["score"], (best["domain_a"], best["domain_b"]), epsilon, damping, rows)


def model_inconsistency(
    featurizer: Optional[nn.Module],
    head: nn.Module,
    domains: Sequence[Domain],
    epsilon: float,
    *,
    loss: str = "bce",
    params: str = "head",
    kind: str = "hessian",
    damping: float = 0.0,
    names: Optional[Sequence[str]] = None,
) -> InconsistencyScore:
    """:func:`inconsistency_score` of a model: domain risks and full ``kind`` curvatures
    ("hessian", "ggn", "fisher", "empirical_fisher") over ``params`` (default the head)."""
    curvatures = curvature(kind, featurizer, head, domains, loss=loss, params=params)
    return inconsistency_score(domain_risks(featurizer, head, domains, loss=loss), curvatures, epsilon,
                               damping=damping, names=names)

"""Hessian-vector products for the whole network: Hutchinson's diagonal and trace, top eigenvalues.

Nothing here forms the D x D Hessian H = d^2 R_e / dtheta^2; each product ::

    H v = d/dtheta (grad R_e(theta) . v)           (double backward, graph of grad R_e reused)

costs about two backward passes, so these scale to the full network (``params="all"``, the
default here). Estimators are seeded (``seed``) and deterministic.

- Hutchinson:  diag(H) ~ (1/K) sum_k v_k * (H v_k),   tr(H) ~ (1/K) sum_k v_k^T H v_k,
  v_k with i.i.d. Rademacher (+-1) entries: unbiased, since E[v v^T] = I.
- Power iteration: v <- H v / ||H v||, converges to the eigenvalue of largest ``|lambda|``.
- Lanczos (full reorthogonalization): m steps build a tridiagonal T = Q^T H Q whose largest
  eigenvalues (Ritz values) approach H's largest (algebraic) ones; exact when m = D.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from fishr_lite.diagnostics.functional import (
    Domain,
    check_domains,
    flat_parameters,
    mean_loss_function,
    select,
)

HVP = Callable[[Tensor], Tensor]


def hessian_vector_product(module: nn.Module, inputs: Tensor, targets: Tensor, loss: str = "bce") -> tuple[HVP, int]:
    """A function v -> H v for the mean loss of one domain, and D (the length of v).

    ``v`` may be a (K, D) batch of vectors: one vmapped backward gives the (K, D) products.
    """
    theta = flat_parameters(module).requires_grad_(True)
    with torch.enable_grad():
        risk = mean_loss_function(module, inputs, targets, loss)(theta)
        (gradient,) = torch.autograd.grad(risk, [theta], create_graph=True)

    def single(v: Tensor) -> Tensor:
        with torch.enable_grad():
            (hv,) = torch.autograd.grad(gradient, [theta], grad_outputs=v, retain_graph=True)
        return hv.detach()

    def product(v: Tensor) -> Tensor:
        if v.dim() == 1:
            return single(v)
        try:  # vmapped backward; some layers' backward (e.g. GroupNorm) cannot be vmapped
            with torch.enable_grad():
                (hv,) = torch.autograd.grad(gradient, [theta], grad_outputs=v, retain_graph=True, is_grads_batched=True)
            return hv.detach()
        except RuntimeError:
            return torch.stack([single(row) for row in v])

    return product, theta.numel()


def _domain_hvps(featurizer, head, domains, loss: str, params: str) -> list[tuple[HVP, int, Tensor]]:
    out = []
    for x, y in check_domains(domains, loss):
        module, inputs = select(featurizer, head, x, params)
        product, size = hessian_vector_product(module, inputs, y, loss)
        out.append((product, size, inputs))
    return out


def _rademacher_batches(samples: int, size: int, dtype: torch.dtype, seed: int, device, batch: int = 64):
    """``samples`` vectors with i.i.d. +-1 entries, in (<= batch, D) blocks, from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, samples, batch):
        count = min(batch, samples - start)
        yield (2 * torch.randint(0, 2, (count, size), generator=generator) - 1).to(dtype=dtype, device=device)


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name}={value}; use a positive integer.")


def hutchinson_diagonal(
    featurizer: Optional[nn.Module],
    head: nn.Module,
    domains: Sequence[Domain],
    *,
    loss: str = "bce",
    params: str = "all",
    samples: int = 100,
    seed: int = 0,
) -> list[Tensor]:
    """Hutchinson's estimate diag(H_e) ~ (1/K) sum_k v_k * (H_e v_k), K = ``samples``, per domain.

    Unbiased; the variance of coordinate d is (1/K) sum_{j != d} H_dj^2.
    """
    _check_positive("samples", samples)
    out = []
    dtype = flat_parameters(head).dtype
    for product, size, inputs in _domain_hvps(featurizer, head, domains, loss, params):
        total = torch.zeros(size, dtype=dtype, device=inputs.device)
        for v in _rademacher_batches(samples, size, dtype, seed, inputs.device):
            total += (v * product(v)).sum(dim=0)
        out.append(total / samples)
    return out


def hutchinson_trace(
    featurizer: Optional[nn.Module],
    head: nn.Module,
    domains: Sequence[Domain],
    *,
    loss: str = "bce",
    params: str = "all",
    samples: int = 100,
    seed: int = 0,
) -> Tensor:
    """(E,) Hutchinson estimates tr(H_e) ~ (1/K) sum_k v_k^T H_e v_k (Rademacher v_k)."""
    _check_positive("samples", samples)
    values = []
    dtype = flat_parameters(head).dtype
    for product, size, inputs in _domain_hvps(featurizer, head, domains, loss, params):
        total = torch.zeros((), dtype=dtype, device=inputs.device)
        for v in _rademacher_batches(samples, size, dtype, seed, inputs.device):
            total += (v * product(v)).sum()
        values.append(total / samples)
    return torch.stack(values)


def power_iteration(product: HVP, size: int, *, dtype: torch.dtype, iterations: int = 100,
                    tol: float = 1e-6, seed: int = 0, device: Optional[torch.device] = None) -> Tensor:
    """Eigenvalue of largest magnitude of the symmetric operator ``product``: Rayleigh quotient
    v^T H v of v <- H v / ||H v||, stopped when it changes by less than ``tol`` (relative)."""
    _check_positive("iterations", iterations)
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(size, generator=generator, dtype=dtype).to(device)
    v /= v.norm()
    value = torch.zeros((), dtype=dtype, device=device)
    for _ in range(iterations):
        hv = product(v)
        new_value = torch.dot(v, hv)
        norm = hv.norm()
        if norm == 0:
            return new_value
        v = hv / norm
        if (new_value - value).abs() <= tol * new_value.abs():
            return new_value
        value = new_value
    return value


def lanczos(product: HVP, size: int, *, dtype: torch.dtype, steps: int = 30, seed: int = 0,
            device: Optional[torch.device] = None) -> Tensor:
    """Ritz values (ascending) of ``steps`` Lanczos iterations with full reorthogonalization:
    H Q_m = Q_m T_m + beta_m q_{m+1} e_m^T; returns eigvalsh(T_m). Stops early when the Krylov
    space is exhausted (beta = 0): its Ritz values are then exact, one per *distinct*
    eigenvalue reachable from the start vector (a single start vector cannot see multiplicity)."""
    _check_positive("steps", steps)
    steps = min(steps, size)
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(size, generator=generator, dtype=dtype).to(device)
    basis = [q / q.norm()]
    alphas, betas = [], []
    for j in range(steps):
        w = product(basis[j])
        alphas.append(torch.dot(w, basis[j]))
        stacked = torch.stack(basis)
        for _ in range(2):  # full reorthogonalization, twice for stability
            w = w - stacked.T @ (stacked @ w)
        beta = w.norm()
        if j == steps - 1 or beta <= 1e-12 * alphas[0].abs().clamp_min(1e-300):
            break
        betas.append(beta)
        basis.append(w / beta)
    m = len(alphas)
    tridiagonal = torch.diag(torch.stack(alphas))
    if m > 1:
        off = torch.stack(betas[: m - 1])
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(tridiagonal)


def top_eigenvalues(
    featurizer: Optional[nn.Module],
    head: nn.Module,
    domains: Sequence[Domain],
    *,
    loss: str = "bce",
    params: str = "all",
    k: int = 1,
    method: str = "lanczos",
    iterations: int = 30,
    seed: int = 0,
) -> list[Tensor]:
    """Per domain, the top eigenvalues of H_e by Hessian-vector products, descending.

    ``method="lanczos"``: the ``k`` largest Ritz values after ``iterations`` steps (largest
    algebraic eigenvalues; fewer than ``k`` if the Krylov space is exhausted first). ``method="power"``: ``k`` must be 1; the eigenvalue of largest
    magnitude after at most ``iterations`` steps (equal to the largest one when H is PSD).
    """
    _check_positive("k", k)
    if method not in ("lanczos", "power"):
        raise ValueError(f"method={method!r}; use 'lanczos' or 'power'.")
    if method == "power" and k != 1:
        raise ValueError(f"power iteration finds one eigenvalue, k={k}; use method='lanczos' for k > 1.")
    dtype = flat_parameters(head).dtype
    out = []
    for product, size, inputs in _domain_hvps(featurizer, head, domains, loss, params):
        where = dict(dtype=dtype, seed=seed, device=inputs.device)
        if method == "power":
            out.append(power_iteration(product, size, iterations=iterations, **where).reshape(1))
        else:
            ritz = lanczos(product, size, steps=max(iterations, k), **where)
            out.append(ritz.flip(0)[:k])
    return out

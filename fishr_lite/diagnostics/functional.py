"""A model as a function of one flat parameter vector, and the checks every diagnostic shares.

A model is a ``featurizer`` (any module, or ``None`` for the identity) followed by a
``head``; data is a list of per-domain ``(x, y)`` batches. Every diagnostic is computed for
one parameter set, ``params``:

- ``"head"``: theta = the head's parameters, the featurizer frozen (its output z = phi(x) is
  the head's input). Full D x D matrices are cheap here (D = head size).
- ``"all"``: theta = every parameter of ``Network(featurizer, head)``, names prefixed
  ``featurizer.`` / ``head.``. Use diagonals and Hessian-vector products here.

The flat vector concatenates the trainable parameters in ``named_parameters()`` order, each
flattened row-major; :func:`parameter_names` labels its coordinates. The per-sample loss is
``fishr_lite.grads.summed_loss`` on one sample, and the domain risk is their mean, ::

    R_e(theta) = (1/n_e) sum_i l(f_theta(x_i), y_i),

so every curvature below (Fisher, GGN, Hessian) is that of the *mean* loss of a domain.
"""

from __future__ import annotations

import itertools
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from fishr_lite.grads import LOSSES, summed_loss

Domain = tuple[Tensor, Tensor]
PARAM_SETS = ("head", "all")
MAX_FULL_SIZE = 4096  # largest D for which a D x D matrix is formed


class Network(nn.Sequential):
    """``head(featurizer(x))`` with parameter names ``featurizer.*`` and ``head.*``.

    A ``Sequential`` so BackPACK can extend it; ``featurizer=None`` means the identity.
    """

    def __init__(self, featurizer: Optional[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.add_module("featurizer", featurizer if featurizer is not None else nn.Identity())
        self.add_module("head", head)


def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}.")


def check_params(params: str) -> None:
    if params not in PARAM_SETS:
        raise ValueError(f"params={params!r} is not supported; use one of {PARAM_SETS}.")


def check_domains(domains: Sequence[Domain], loss: str = "bce") -> list[Domain]:
    """Validate a list of per-domain ``(x, y)`` batches: non-empty, one target per sample."""
    check_loss(loss)
    if isinstance(domains, Tensor) or (isinstance(domains, tuple) and domains and isinstance(domains[0], Tensor)):
        raise ValueError("domains must be a list of (x, y) pairs, one per domain; wrap one domain as [(x, y)].")
    domains = list(domains)
    if not domains:
        raise ValueError("no domains given; pass a list of (x, y) pairs, one per domain.")
    for e, pair in enumerate(domains):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"domain {e} is not an (x, y) pair; pass a list of (x, y) tensor pairs.")
        x, y = pair
        if x.shape[0] == 0:
            raise ValueError(f"domain {e} is empty (0 samples); drop it or give it at least one sample.")
        if y.shape[0] != x.shape[0]:
            raise ValueError(
                f"domain {e}: {x.shape[0]} inputs but {y.shape[0]} targets; pass one target per sample."
            )
        if loss == "ce" and (y.dim() != 1 or y.dtype not in (torch.int64, torch.int32)):
            raise ValueError(f"domain {e}: 'ce' needs (n,) integer class indices, got {y.dtype} {tuple(y.shape)}.")
    return domains


def select(featurizer: Optional[nn.Module], head: nn.Module, x: Tensor, params: str) -> tuple[nn.Module, Tensor]:
    """The module whose parameters are theta, and its (detached) input for this domain."""
    check_params(params)
    if params == "all":
        return Network(featurizer, head), x
    if featurizer is None:
        return head, x
    with torch.no_grad():
        return head, featurizer(x)


def trainable(module: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def parameter_names(featurizer: Optional[nn.Module], head: nn.Module, params: str = "head") -> list[str]:
    """A label per coordinate of the flat theta, e.g. ``head.weight[0, 3]``."""
    check_params(params)
    module = Network(featurizer, head) if params == "all" else head
    prefix = "" if params == "all" else "head."
    labels = []
    for name, p in trainable(module).items():
        for index in itertools.product(*[range(size) for size in p.shape]):
            labels.append(f"{prefix}{name}[{', '.join(map(str, index))}]" if index else f"{prefix}{name}")
    return labels


def flat_parameters(module: nn.Module) -> Tensor:
    """theta: the trainable parameters, detached, concatenated in ``named_parameters()`` order."""
    return torch.cat([p.detach().reshape(-1) for p in trainable(module).values()])


def unflatten(module: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    """Inverse of :func:`flat_parameters` (differentiable; works under ``torch.func``)."""
    shapes = {name: p.shape for name, p in trainable(module).items()}
    chunks = torch.split(flat, [int(torch.Size(s).numel()) for s in shapes.values()])
    return {name: chunk.view(shape) for (name, shape), chunk in zip(shapes.items(), chunks)}


def flatten_rows(grads: dict[str, Tensor], module: nn.Module) -> Tensor:
    """``{name: (n, *shape)}`` -> ``(n, D)`` in the order of :func:`flat_parameters`."""
    names = list(trainable(module))
    return torch.cat([grads[name].reshape(grads[name].shape[0], -1) for name in names], dim=1)


def outputs_2d(logits: Tensor) -> Tensor:
    """Logits as (n, C): a head with one output may return (n,)."""
    return logits.reshape(logits.shape[0], -1)


def mean_loss_function(module: nn.Module, inputs: Tensor, targets: Tensor, loss: str) -> Callable[[Tensor], Tensor]:
    """theta -> R(theta) = (1/n) sum_i l(f_theta(x_i), y_i), for ``torch.func`` transforms."""
    from torch.func import functional_call

    buffers = dict(module.named_buffers())

    def risk(flat: Tensor) -> Tensor:
        logits = functional_call(module, (unflatten(module, flat), buffers), (inputs,))
        return summed_loss(outputs_2d(logits), targets, loss) / inputs.shape[0]

    return risk


def per_sample_jacobians(module: nn.Module, inputs: Tensor) -> Tensor:
    """J_i = d f_theta(x_i) / d theta, shape (n, C, D), by ``vmap(jacrev(...))``."""
    from torch.func import functional_call, jacrev, vmap

    buffers = dict(module.named_buffers())
    flat = flat_parameters(module)

    def output(theta: Tensor, x: Tensor) -> Tensor:
        logits = functional_call(module, (unflatten(module, theta), buffers), (x.unsqueeze(0),))
        return logits.reshape(-1)

    return vmap(jacrev(output), in_dims=(None, 0))(flat, inputs)


def predictive_covariance(logits: Tensor, loss: str) -> Tensor:
    """Lambda_i = E_{y ~ p(y|x_i)}[r r^T], r = dl/ds, (n, C, C): the true Fisher of the logits.

    "bce" (independent Bernoulli outputs, p = sigmoid(s)): diag(p (1 - p)).
    "ce" (categorical, p = softmax(s)): diag(p) - p p^T.
    For these canonical losses Lambda_i also equals the Hessian d^2 l / ds^2, for any y.
    """
    s = outputs_2d(logits)
    if loss == "bce":
        p = torch.sigmoid(s)
        return torch.diag_embed(p * (1 - p))
    p = torch.softmax(s, dim=1)
    return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)


def loss_hessians(logits: Tensor, targets: Tensor, loss: str) -> Tensor:
    """d^2 l(s_i, y_i) / ds_i^2, (n, C, C), by autograd (``torch.func.hessian``) per sample."""
    from torch.func import hessian, vmap

    s = outputs_2d(logits).detach()
    y = targets.reshape(s.shape) if loss == "bce" else targets

    def sample_loss(si: Tensor, yi: Tensor) -> Tensor:
        return summed_loss(si.unsqueeze(0), yi.unsqueeze(0), loss)

    return vmap(hessian(sample_loss))(s, y)


def check_full_size(size: int, what: str) -> None:
    if size > MAX_FULL_SIZE:
        raise ValueError(
            f"a full {what} over {size} parameters needs a {size} x {size} matrix; use params='head', "
            "diagonal=True, or the Hessian-vector-product tools (hutchinson_diagonal, top_eigenvalues)."
        )


def chunks(n: int, size: int = 512) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]

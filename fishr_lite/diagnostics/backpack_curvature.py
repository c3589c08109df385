"""Curvature diagonals of the whole network from BackPACK's second-order extensions. ::

    "hessian"  DiagHessian    diag(H_e)                       exact
    "ggn"      DiagGGNExact   diag(G_e) = diag(F_e)           exact (BCE, CE: GGN = Fisher)
    "ggn_mc"   DiagGGNMC      Monte-Carlo diag of G_e         ``mc_samples`` labels per sample

all for the mean loss R_e of each domain (BackPACK's ``reduction="mean"``). BackPACK
backpropagates these quantities layer by layer, so every layer between the loss and the
parameters must be one it knows (``nn.Sequential`` of Linear, Conv, ReLU, Tanh, Sigmoid,
Flatten, pooling, ...), and the model must be a chain of modules (no functional ops between
them). An unsupported layer (GroupNorm, BatchNorm for DiagHessian, LayerNorm, ...) raises a
ValueError naming it. As for ``fishr_lite.grads``' engine, BackPACK extends a *copy* of the
model that shares its parameters, so the user's modules keep no hooks, and no ``.grad`` is
written.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fishr_lite.diagnostics.functional import (
    Domain,
    Network,
    check_domains,
    check_params,
    outputs_2d,
    trainable,
)

BACKPACK_QUANTITIES = {
    "hessian": ("DiagHessian", "diag_h"),
    "ggn": ("DiagGGNExact", "diag_ggn_exact"),
    "ggn_mc": ("DiagGGNMC", "diag_ggn_mc"),
}


def _extension(quantity: str, mc_samples: int):
    import backpack.extensions as extensions

    class_name, _ = BACKPACK_QUANTITIES[quantity]
    cls = getattr(extensions, class_name)
    return cls(mc_samples=mc_samples) if quantity == "ggn_mc" else cls()


def unsupported_layers(module: nn.Module, extension: object) -> list[str]:
    """Names ``"path (Class)"`` of the leaf modules of ``module`` that ``extension`` cannot handle."""
    known = getattr(extension, "_BackpropExtension__module_extensions", None)
    if known is None:  # private BackPACK attribute moved: rely on BackPACK's own error
        return []
    bad = []
    for name, leaf in module.named_modules():
        if next(leaf.children(), None) is None and type(leaf) not in known and not isinstance(leaf, nn.Identity):
            bad.append(f"{name or '<model>'} ({type(leaf).__name__})")
    return bad


def _unsupported_error(extension_name: str, layers: Sequence[str], params: str) -> ValueError:
    return ValueError(
        f"BackPACK's {extension_name} does not support the layer(s) {', '.join(layers)} "
        f"(params={params!r}). Alternatives: the exact head curvature with torch.func "
        "(hessian / ggn / fisher(featurizer, head, domains, params='head')), or for the whole "
        "network hutchinson_diagonal / top_eigenvalues (Hessian-vector products) and "
        "fisher(..., params='all', diagonal=True)."
    )


def _shadow(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that shares its parameters and buffers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return copy.deepcopy(module, memo={id(t): t for t in tensors})


def backpack_diagonal(
    featurizer: Optional[nn.Module],
    head: nn.Module,
    domains: Sequence[Domain],
    quantity: str = "hessian",
    *,
    loss: str = "bce",
    params: str = "all",
    mc_samples: int = 1,
    seed: int = 0,
) -> list[Tensor]:
    """Per domain, the (D,) BackPACK diagonal ``quantity`` ("hessian", "ggn", "ggn_mc") of R_e.

    Flat in ``named_parameters()`` order of ``Network(featurizer, head)`` (params="all") or of
    the head (params="head", featurizer output as a constant input), as every diagnostic.
    ``seed`` seeds the labels DiagGGNMC samples (the global RNG is restored afterwards).
    """
    from backpack import backpack, extend

    if quantity not in BACKPACK_QUANTITIES:
        raise ValueError(f"unknown BackPACK quantity {quantity!r}; use one of {sorted(BACKPACK_QUANTITIES)}.")
    check_params(params)
    domains = check_domains(domains, loss)
    model = Network(featurizer, head) if params == "all" else head
    extension = _extension(quantity, mc_samples)
    bad = unsupported_layers(model, extension)
    if bad:
        raise _unsupported_error(BACKPACK_QUANTITIES[quantity][0], bad, params)
    shadow = extend(_shadow(model))
    loss_module = extend(nn.BCEWithLogitsLoss() if loss == "bce" else nn.CrossEntropyLoss())
    savefield = BACKPACK_QUANTITIES[quantity][1]
    parameters = trainable(model)
    out = []
    for x, y in domains:
        if params == "head" and featurizer is not None:
            with torch.no_grad():
                x = featurizer(x)
        leaf = x.detach().requires_grad_(True)  # grad w.r.t. the input fires every module hook
        with torch.random.fork_rng(), torch.enable_grad():
            torch.manual_seed(seed)
            logits = outputs_2d(shadow(leaf))
            targets = y.reshape(logits.shape).to(logits.dtype) if loss == "bce" else y
            try:
                with backpack(extension):
                    torch.autograd.grad(loss_module(logits, targets), [leaf])
            except NotImplementedError as error:
                raise _unsupported_error(BACKPACK_QUANTITIES[quantity][0], [str(error)], params) from error
        values = []
        for param in parameters.values():
            values.append(getattr(param, savefield).detach().reshape(-1).clone())
            delattr(param, savefield)
        out.append(torch.cat(values))
    return out

"""Per-sample gradients of a loss with respect to a module's parameters.

Convention (all engines): for samples ``(x_i, y_i)``, ``i = 1..n``, the engine returns, for
every parameter ``theta`` of ``module``, ::

    g_i = d l(module(x_i), y_i) / d theta          shape (n, *theta.shape)

the gradient of the *per-sample* loss ``l`` (a sum over the sample's outputs, no division by
``n``). This equals "gradient of the mean-reduced batch loss times the batch size", the
quantity the official Colored MNIST script feeds to Fishr, and the ``reduction='none'`` /
``.sum()`` gradient DomainBed uses. Any other scaling is applied by ``fishr_lite.penalty``.

The result keeps its graph (``create_graph``): it is differentiable with respect to the
module's parameters *and* its inputs, so a penalty built on it trains the featurizer that
produced the inputs.

Engines (``ENGINES`` registry, ``engine=`` argument of :func:`per_sample_grads`):

- ``"closed_form"``: ``nn.Linear`` head only, exact formulas, no extra backward pass.
- ``"backpack"``: BackPACK ``BatchGrad`` (backpack-for-pytorch >= 1.7) on any head BackPACK
  supports; backpropagates only through the head (see :func:`backpack_grads`).
- ``"torch.func"``: ``torch.func.vmap(grad(...))`` over ``functional_call``; any module,
  including a whole network (no BatchNorm in train mode: it mixes samples). ``"functorch"``
  is an alias of it (``ENGINE_ALIASES``).
"""

from __future__ import annotations

import copy
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSSES = ("bce", "ce")

GradEngine = Callable[[nn.Module, Tensor, Tensor, str, Optional[Tensor]], dict[str, Tensor]]
ENGINES: dict[str, GradEngine] = {}
#: Older names still accepted by :func:`engine_name`.
ENGINE_ALIASES = {"functorch": "torch.func"}


def engine_name(engine: str) -> str:
    """The registered name of ``engine`` (an alias such as ``"functorch"`` resolved)."""
    name = ENGINE_ALIASES.get(engine, engine)
    if name not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {sorted(ENGINES)}.")
    return name


def register_engine(name: str) -> Callable[[GradEngine], GradEngine]:
    """Add a per-sample gradient engine to ``ENGINES`` under ``name``."""

    def decorator(engine: GradEngine) -> GradEngine:
        ENGINES[name] = engine
        return engine

    return decorator


def bce_targets(targets: Tensor, logits: Tensor) -> Tensor:
    """0/1 ``targets`` reshaped to the logits' shape and dtype (one target per logit)."""
    if targets.numel() != logits.numel():
        raise ValueError(
            f"bce targets of shape {tuple(targets.shape)} do not match logits of shape "
            f"{tuple(logits.shape)}; pass one 0/1 target per logit."
        )
    return targets.reshape(logits.shape).to(logits.dtype)


def ce_targets(targets: Tensor, logits: Tensor) -> Tensor:
    """Integer class indices ``targets`` (n,) for (n, C) logits with C >= 2 (one logit has a
    constant softmax: zero loss, zero gradients, zero penalty, without a word)."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"loss 'ce' needs (n, C) logits with C >= 2 classes, got shape {tuple(logits.shape)}: "
            "the softmax of one logit is always 1, so its loss and gradients are zero; for a "
            "binary head with one output use loss 'bce'."
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.numel() != logits.shape[0]:
        raise ValueError(
            f"ce targets of dtype {targets.dtype} and shape {tuple(targets.shape)} for logits of shape "
            f"{tuple(logits.shape)}; pass one integer class index per sample (torch.long)."
        )
    return targets.reshape(logits.shape[0])


def summed_loss(logits: Tensor, targets: Tensor, loss: str) -> Tensor:
    """Sum over samples (and outputs) of the per-sample loss.

    ``"bce"``: l_i = sum_k [softplus(s_ik) - y_ik s_ik] (BCE with logits), targets float,
    reshaped to the logits' shape (so ``(n,)`` targets match ``(n, 1)`` logits).
    ``"ce"``: l_i = logsumexp(s_i) - s_{i, y_i} (cross-entropy), targets long class indices.
    """
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, bce_targets(targets, logits), reduction="sum")
    if loss == "ce":
        return F.cross_entropy(logits, ce_targets(targets, logits), reduction="sum")
    raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}.")


def per_sample_grads(
    module: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss: str = "bce",
    engine: str = "closed_form",
    logits: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: (n, *param.shape)}`` of ``loss(module(x_i), y_i)``.

    Args:
        module: the head (or, with ``engine="torch.func"``, any network).
        inputs: ``(n, ...)`` inputs of ``module`` (for a head: the featurizer's output,
            still attached to its graph so the penalty trains the featurizer).
        targets: ``(n,)`` 0/1 floats for ``"bce"``, class indices for ``"ce"``.
        loss: ``"bce"`` (BCE with logits) or ``"ce"`` (cross-entropy).
        engine: a key of ``ENGINES`` (or of ``ENGINE_ALIASES``).
        logits: optional ``module(inputs)`` already computed (used by ``"closed_form"`` to
            skip the head's forward; the other engines recompute what they need).
    """
    engine = engine_name(engine)
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}.")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{inputs.shape[0]} inputs but {targets.shape[0]} targets; pass one target per sample."
        )
    return ENGINES[engine](module, inputs, targets, loss, logits)


def head_residuals(
    head: nn.Module, features: Tensor, targets: Tensor, loss: str, logits: Optional[Tensor] = None
) -> Tensor:
    """Residuals r_i = dl_i/ds_i ``(n, C)`` of a head's scores s_i (``logits`` if given); see
    :func:`score_residuals`."""
    scores = head(features) if logits is None else logits.reshape(features.shape[0], -1)
    return score_residuals(scores, targets, loss)


def score_residuals(scores: Tensor, targets: Tensor, loss: str, out: Optional[Tensor] = None) -> Tensor:
    """r_i = dl_i/ds_i ``(n, C)`` for scores s ``(n, C)``: sigmoid(s_i) - y_i (BCE with logits),
    softmax(s_i) - onehot(y_i) (cross-entropy). Half-precision scores give float32 residuals.
    ``out``: a float32/64 tensor of the scores' shape to write them into."""
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if loss == "bce":
        if out is None:
            return torch.sigmoid(scores) - bce_targets(targets, scores)
        return torch.sigmoid(scores, out=out).sub_(bce_targets(targets, scores))
    if loss == "ce":
        classes = F.one_hot(ce_targets(targets, scores), scores.shape[1]).to(scores.dtype)
        residual = torch.softmax(scores, dim=1) - classes
        return residual if out is None else out.copy_(residual)
    raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}.")


def residual_vjp(scores: Tensor, grad_residual: Tensor, loss: str) -> Tensor:
    """dL/ds_i = J_i^T dL/dr_i for the residuals r = :func:`score_residuals` of scores s:
    J_i = p_i (1 - p_i) with p_i = sigmoid(s_i) (BCE), J_i = diag(p_i) - p_i p_i^T with
    p_i = softmax(s_i) (cross-entropy; J_i is symmetric)."""
    if loss == "bce":
        p = torch.sigmoid(scores)
        return grad_residual * p * (1 - p)
    p = torch.softmax(scores, dim=1)
    return p * (grad_residual - (p * grad_residual).sum(dim=1, keepdim=True))


def check_closed_form_inputs(head: nn.Module, features: Tensor) -> None:
    """The closed form's inputs: an ``nn.Linear`` head and (n, d) features, one row per sample."""
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"engine 'closed_form' needs an nn.Linear head, got {type(head).__name__}; "
            "use engine='backpack' or engine='torch.func' for other heads."
        )
    if features.dim() != 2:
        raise ValueError(
            f"engine 'closed_form' needs (n, d) features, one row per sample, got shape {tuple(features.shape)}; "
            "reshape them to (n, d), or use engine='torch.func', which differentiates a head "
            "applied to any input shape."
        )


@register_engine("closed_form")
def closed_form_grads(
    head: nn.Module, features: Tensor, targets: Tensor, loss: str, logits: Optional[Tensor] = None
) -> dict[str, Tensor]:
    """Exact per-sample gradients of an ``nn.Linear`` head, s_i = W z_i + b.

    With the residual r_i = dl_i/ds_i, i.e. r_i = sigmoid(s_i) - y_i (BCE with logits) or
    r_i = softmax(s_i) - onehot(y_i) (cross-entropy): ::

        dl_i/dW = r_i z_i^T   (n, C, d)        dl_i/db = r_i   (n, C)
    """
    check_closed_form_inputs(head, features)
    residual = head_residuals(head, features, targets, loss, logits)
    if residual.shape[1] == 1:  # one output: (n, 1) * (n, d) avoids a size-1 reduction in backward
        grads = {"weight": (residual * features).unsqueeze(1)}
    else:
        grads = {"weight": residual.unsqueeze(2) * features.unsqueeze(1)}
    if head.bias is not None:
        grads["bias"] = residual
    return grads


_SHADOWS: "weakref.WeakKeyDictionary[nn.Module, tuple[list[int], nn.Module]]" = weakref.WeakKeyDictionary()


def _backpack_shadow(head: nn.Module, extend: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """A BackPACK-extended copy of ``head`` sharing its parameters and buffers (cached)."""
    tensors = list(head.parameters()) + list(head.buffers())
    key = [id(t) for t in tensors]
    cached = _SHADOWS.get(head)
    if cached is not None and cached[0] == key:
        return cached[1]
    shadow = extend(copy.deepcopy(head, memo={id(t): t for t in tensors}))
    _SHADOWS[head] = (key, shadow)
    return shadow


@register_engine("backpack")
def backpack_grads(
    head: nn.Module, features: Tensor, targets: Tensor, loss: str, logits: Optional[Tensor] = None
) -> dict[str, Tensor]:
    """Per-sample gradients from BackPACK's ``BatchGrad``, backpropagating through the head only.

    BackPACK computes ``grad_batch`` inside the head's *full backward hooks*, which PyTorch
    fires when it computes the gradient with respect to the head's input. ``backward(inputs=
    <head params>)`` never asks for that gradient (so the hooks stay silent with current
    torch/BackPACK), and a plain ``backward(create_graph=True)`` walks the whole network.
    This engine instead runs the head on ``features`` and asks only for the gradient of the
    summed loss with respect to ``features``::

        with backpack(BatchGrad()):
            torch.autograd.grad(summed_loss(head(features), y), [features], create_graph=True)

    Autograd stops at ``features`` (no featurizer parameter gets a gradient from this pass),
    the hooks fire, and ``grad_batch`` stays differentiable with respect to the featurizer
    through the saved input and the graph of dl/ds.

    Side effects: none on the user's model. BackPACK extends a *shadow* of the head (a copy
    that shares the very same ``Parameter`` objects, built once and cached), so the user's
    head keeps no BackPACK hooks (hooks would, e.g., break ``torch.func`` on it) and nothing
    outside the head is extended. ``torch.autograd.grad`` writes no ``.grad``; the
    ``grad_batch`` attributes are removed from the parameters before returning, so nothing
    stale reaches the user's optimizer. BatchGrad is first-order, so the loss needs no
    BackPACK extension.
    """
    return backpack_scores_and_grads(head, features, targets, loss)[1]


def backpack_scores_and_grads(
    head: nn.Module, features: Tensor, targets: Tensor, loss: str
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(head(features), grads)``: the scores of the head's forward that BackPACK's hooks
    record, and the per-sample gradients of :func:`backpack_grads`. A training loop that uses
    these scores for its risk runs the head once (``FishrPenalty.logits_and_penalty``), and the
    penalty's gradient through the residuals joins the risk's before the head's backward."""
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad
    except ImportError as error:  # pragma: no cover - backpack is a dependency
        raise ValueError(
            "engine 'backpack' needs backpack-for-pytorch; `pip install backpack-for-pytorch` "
            "or use engine='closed_form' / 'torch.func'."
        ) from error
    shadow = _backpack_shadow(head, extend)
    leaf = features if features.requires_grad else features.detach().requires_grad_(True)
    params = {name: p for name, p in head.named_parameters() if p.requires_grad}
    with backpack(BatchGrad()):
        scores = shadow(leaf)
        torch.autograd.grad(summed_loss(scores, targets, loss), [leaf], create_graph=True)
    grads = {}
    for name, param in params.items():
        grads[name] = param.grad_batch
        del param.grad_batch
    return scores, grads


@register_engine("torch.func")
def torch_func_grads(
    module: nn.Module, inputs: Tensor, targets: Tensor, loss: str, logits: Optional[Tensor] = None
) -> dict[str, Tensor]:
    """Per-sample gradients by ``torch.func``: vmap over i of grad_theta l(f(theta, x_i), y_i).

    ``f`` is ``functional_call(module, (params, buffers), x_i[None])``; works for any module
    whose forward treats samples independently (GroupNorm yes, train-mode BatchNorm no).
    The result is differentiable with respect to ``inputs`` and the parameters, because
    ``torch.func`` transforms compose with ordinary autograd.
    """
    from torch.func import functional_call, grad, vmap

    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    buffers = dict(module.named_buffers())

    def sample_loss(theta: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(module, (theta, buffers), (x.unsqueeze(0),))
        return summed_loss(out, y.unsqueeze(0), loss)

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, inputs, targets)


def loop_grads(
    module: nn.Module, inputs: Tensor, targets: Tensor, *, loss: str = "bce", create_graph: bool = True
) -> dict[str, Tensor]:
    """Reference: one ``torch.autograd.grad`` call per sample (slow; for tests and benchmarks)."""
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    rows = []
    for i in range(inputs.shape[0]):
        value = summed_loss(module(inputs[i : i + 1]), targets[i : i + 1], loss)
        rows.append(torch.autograd.grad(value, list(params.values()), create_graph=create_graph))
    return {name: torch.stack([row[k] for row in rows]) for k, name in enumerate(params)}

"""A linear head and the variances of its per-sample gradients, computed in one autograd node.

In a training step with the closed-form penalty, the head's scores s = z W^T + b and the
variances v^W of ``fishr_lite.head_variance`` both read the (n, d) features z, and both send
a gradient back to them: computed one after the other, that is a pass over z for the scores,
one for the variances, and in the backward one for each gradient plus the pass in which
autograd adds them. :func:`linear_head_with_variances` computes s, the residuals r = dl/ds
and v^W in one node, whose backward writes dL/dz once: ::

    dL/ds_i <- dL/ds_i + J_i^T dL/dr_i    (J_i = dr_i/ds_i: p_i (1 - p_i) for BCE,
                                           diag(p_i) - p_i p_i^T for cross-entropy)
    dL/dz_i  = W^T dL/ds_i + sum_c r_ic (G'∘D_i)_c     (the second term: head_variance's)
    dL/dW    = sum_i dL/ds_i z_i^T,     dL/db = sum_i dL/ds_i

By default the node runs in row blocks that stay in cache (``head_variance``'s
``blocked_head_forward`` and ``blocked_head_backward``): one pass over z forward, one
backward, the same memory traffic as the head alone. Inside ``with compiled_closed_form():``
it runs as the compiled kernels of ``fishr_lite.compiled_variance`` instead. The node is
taken for float32/64 features and head outside autocast and ``torch.func``, and a plain
``nn.Linear`` without hooks (:func:`takes_fused_path`); everywhere else, or inside
``with fuse_head_and_variances(False):``, the function returns ``head(features)`` and
``linear_head_variances(...)`` of those scores: the same values up to float rounding. A
second derivative through the node (``create_graph=True``) recomputes the head and the
variance with plain operations.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fishr_lite.compiled_variance as compiled_variance
from fishr_lite.blocked import same_float_kind, under_torch_func
from fishr_lite.grads import check_closed_form_inputs, score_residuals
from fishr_lite.head_variance import (bias_variance, blocked_head_backward, blocked_head_forward,
                                     linear_head_variances)
from fishr_lite.switches import Switch

FUSED = Switch(True)  # read by takes_fused_path; changed by fuse_head_and_variances


class _HeadWithVariance(torch.autograd.Function):
    """(s, r, v^W) of the module docstring, by the blocked or the compiled kernels."""

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, loss: str,
                centered: bool):
        ctx.compiled = compiled_variance.takes_compiled_path(features, weight)
        if ctx.compiled:
            outputs = compiled_variance.run("head_forward", features, weight, bias, targets, loss, centered)
        else:
            outputs = blocked_head_forward(features, weight, bias, targets, loss, centered)
        scores, residual, variance, mean = outputs
        ctx.loss, ctx.centered, ctx.has_bias = loss, centered, bias is not None
        ctx.save_for_backward(features, weight, bias, targets, scores, residual, mean)
        return scores, residual, variance

    @staticmethod
    def backward(ctx, grad_s: Tensor, grad_r: Tensor, grad_v: Tensor):
        features, weight, bias, targets, scores, residual, mean = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: plain operations, differentiable again
            grads = _plain_gradients(features, weight, bias, targets, ctx.loss, ctx.centered,
                                     (grad_s, grad_r, grad_v))
        else:
            arguments = (features, weight, scores, residual, mean, grad_s, grad_r, grad_v, ctx.loss)
            grads = (compiled_variance.run("head_backward", *arguments) if ctx.compiled
                     else blocked_head_backward(*arguments))
        grad_z, grad_w, grad_b = grads
        return grad_z, grad_w, grad_b if ctx.has_bias else None, None, None, None


def _plain_gradients(features: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, loss: str,
                     centered: bool, grad_outputs: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, ...]:
    """The node's backward by autograd through the plain head, residuals and variance."""
    with torch.enable_grad():
        inputs = [t if t.requires_grad else t.detach().requires_grad_() for t in (features, weight)]
        if bias is not None:
            inputs.append(bias if bias.requires_grad else bias.detach().requires_grad_())
        scores = F.linear(inputs[0], inputs[1], inputs[2] if bias is not None else None)
        residual = score_residuals(scores, targets, loss)
        variance, _ = compiled_variance.variance_forward(residual, inputs[0], centered)
        grads = torch.autograd.grad((scores, residual, variance), inputs, grad_outputs, create_graph=True,
                                    allow_unused=True)
    return (*grads, None) if bias is None else tuple(grads)


def takes_fused_path(head: nn.Module, features: Tensor) -> bool:
    """Whether :func:`linear_head_with_variances` computes the head inside the fused node."""
    return (FUSED.on and type(head) is nn.Linear and same_float_kind(features, head.weight)
            and not _autocast_enabled(features.device.type) and not under_torch_func(features)
            and not (head._forward_hooks or head._forward_pre_hooks))


def _autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (torch < 2.4 has no argument here)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch 2.2, 2.3
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def fuse_head_and_variances(enabled: bool) -> contextlib.AbstractContextManager:
    """``with fuse_head_and_variances(False):`` makes :func:`linear_head_with_variances` run
    the head, then the variances (to compare timings)."""
    return FUSED.turned(enabled)


def linear_head_with_variances(
    head: nn.Linear, features: Tensor, targets: Tensor, loss: str = "bce", *, centered: bool = True
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(head(features), {"weight": v^W, "bias": v^b})`` for one domain: the scores (n, C)
    and the variances of ``fishr_lite.head_variance.linear_head_variances``, in one node where
    :func:`takes_fused_path` (see the module docstring), else computed one after the other."""
    if not takes_fused_path(head, features):  # linear_head_variances checks the inputs
        scores = head(features)
        return scores, linear_head_variances(head, features, targets, loss, centered=centered, logits=scores)
    check_closed_form_inputs(head, features)
    scores, residual, variance = _HeadWithVariance.apply(features, head.weight, head.bias, targets, loss, centered)
    variances = {"weight": variance}
    if head.bias is not None:
        variances["bias"] = bias_variance(residual, centered)
    return scores, variances


__all__ = ["fuse_head_and_variances", "linear_head_with_variances", "takes_fused_path"]

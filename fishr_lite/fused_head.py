"""A linear head and the variances of its per-sample gradients, computed in one autograd node.

In a training step with the closed-form penalty, the head's scores s = z W^T + b and the
variances v^W of ``fishr_lite.head_variance`` both read the (n, d) features z, and both send
a gradient back to them: autograd then adds the penalty's dL/dz to the head's, one more pass
over an (n, d) tensor per domain. :func:`linear_head_with_variances` computes s, the
residuals r = dl/ds and v^W in one node, whose backward writes dL/dz once: ::

    dL/ds_i <- dL/ds_i + J_i^T dL/dr_i    (J_i = dr_i/ds_i: p_i (1 - p_i) for BCE,
                                           diag(p_i) - p_i p_i^T for cross-entropy)
    dL/dz_i  = W^T dL/ds_i + sum_c r_ic (G'∘D_i)_c     (the second term: head_variance's)
    dL/dW    = sum_i dL/ds_i z_i^T,     dL/db = sum_i dL/ds_i

The node runs as the compiled kernels of ``fishr_lite.compiled_variance``, so it is taken
inside ``with compiled_closed_form():`` only, for float32/64 features outside autocast and
``torch.func``, and a plain ``nn.Linear`` without hooks. Everywhere else the function returns
``head(features)`` and ``linear_head_variances(...)`` of those scores: the same values, from
the eager path. A second derivative through the node (``create_graph=True``) recomputes the
head and the variance with plain operations.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fishr_lite.compiled_variance as compiled_variance
from fishr_lite.blocked import under_torch_func
from fishr_lite.grads import score_residuals
from fishr_lite.head_variance import bias_variance, linear_head_variances


class _HeadWithVariance(torch.autograd.Function):
    """(s, r, v^W) of the module docstring, by the compiled kernels."""

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, loss: str,
                centered: bool):
        scores, residual, variance, mean = compiled_variance.run(
            "head_forward", features, weight, bias, targets, loss, centered)
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
            grads = compiled_variance.run("head_backward", features, weight, scores, residual, mean,
                                          grad_s, grad_r, grad_v, ctx.loss)
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
    return (type(head) is nn.Linear and compiled_variance.takes_compiled_path(features, head.weight)
            and not torch.is_autocast_enabled(features.device.type) and not under_torch_func(features)
            and not (head._forward_hooks or head._forward_pre_hooks))


def linear_head_with_variances(
    head: nn.Linear, features: Tensor, targets: Tensor, loss: str = "bce", *, centered: bool = True
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(head(features), {"weight": v^W, "bias": v^b})`` for one domain: the scores (n, C)
    and the variances of ``fishr_lite.head_variance.linear_head_variances``, in one node where
    :func:`takes_fused_path` (see the module docstring), else computed one after the other."""
    if not takes_fused_path(head, features):
        scores = head(features)
        return scores, linear_head_variances(head, features, targets, loss, centered=centered, logits=scores)
    scores, residual, variance = _HeadWithVariance.apply(features, head.weight, head.bias, targets, loss, centered)
    variances = {"weight": variance}
    if head.bias is not None:
        variances["bias"] = bias_variance(residual, centered)
    return scores, variances


__all__ = ["linear_head_with_variances", "takes_fused_path"]

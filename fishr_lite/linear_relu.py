"""One hidden layer, relu(x W^T + b), as a single oneDNN call on a CPU.

PyTorch's ``relu(linear(x))`` on a CPU is three passes over the (n, out) output: the bias
copied into it, the matrix product added to it, then the ReLU written to a new tensor.
oneDNN (``torch.ops.mkldnn._linear_pointwise``, the kernel ``torch.compile`` uses for the
same pattern) adds the bias and applies the ReLU while the product's tiles are still in
cache. The backward is the usual one, written out:

    g = dL/dy * 1[y > 0],   dL/dx = g W,   dL/dW = g^T x,   dL/db = sum_i g_i

and dL/dx = g W = g (W^T)^T is the same oneDNN linear map without bias (on a 2-core AMD EPYC,
37 ms for a 25,000 x 390 by 390 x 390 product against 67 ms through ``@``, PyTorch's BLAS);
under ``create_graph=True`` it is ``g @ W``, so that the backward itself can be differentiated.
:func:`onednn_input_gradient` switches that off for a block.

:func:`linear_relu` takes the fused kernel where it applies (float32 CPU tensors, oneDNN
built in, no ``torch.func`` transform active: ``vmap`` and friends get the plain ops) and
``relu(linear(x))`` everywhere else, so a model that calls it runs on any device and under
any transform. Both give the same values up to float32 rounding; the backward is written
with differentiable operations, so ``create_graph=True`` works through it.
:func:`fused_linear_relu` switches the fused kernel off for a block (to compare timings).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fishr_lite.switches import Switch

FUSED = Switch(True)  # read by takes_fused_path; changed by fused_linear_relu
ONEDNN_INPUT_GRADIENT = Switch(True)  # read by the backward; changed by onednn_input_gradient


def _onednn_linear_pointwise():
    """The oneDNN kernel, or None where this build of PyTorch lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_KERNEL = _onednn_linear_pointwise()


class _FusedLinearReLU(torch.autograd.Function):
    """y = relu(x W^T + b) by oneDNN; the backward of the formula above."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return _KERNEL(x, weight, bias, "relu", [], "")

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, weight, output = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(grad_output, output, 0.0)  # dL/dy * 1[y > 0]
        grad_x = None
        if ctx.needs_input_grad[0]:  # oneDNN for g W too, unless create_graph records this backward
            by_onednn = ONEDNN_INPUT_GRADIENT.on and not torch.is_grad_enabled()
            grad_x = _KERNEL(g, weight.t(), None, "none", [], "") if by_onednn else g @ weight
        grad_weight = g.t() @ x if ctx.needs_input_grad[1] else None
        grad_bias = g.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def takes_fused_path(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether :func:`linear_relu` uses the oneDNN kernel for these tensors here."""
    return (
        FUSED.on
        and _KERNEL is not None
        and bias is not None
        and x.dim() == 2
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, weight, bias))
        and torch._C._functorch.peek_interpreter_stack() is None  # no vmap / grad / jvp active
    )


def linear_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """relu(x W^T + b) for x of shape (n, in), W (out, in), b (out,): one fused kernel on a
    CPU where it applies, ``F.relu(F.linear(x, W, b))`` otherwise."""
    if takes_fused_path(x, weight, bias):
        return _FusedLinearReLU.apply(x, weight, bias)
    return F.relu(F.linear(x, weight, bias))


def fused_linear_relu(enabled: bool) -> contextlib.AbstractContextManager:
    """``with fused_linear_relu(False):`` makes :func:`linear_relu` take the plain ops."""
    return FUSED.turned(enabled)


def onednn_input_gradient(enabled: bool) -> contextlib.AbstractContextManager:
    """``with onednn_input_gradient(False):`` makes the fused layer's backward compute
    dL/dx = g W by ``@`` (PyTorch's BLAS) instead of the oneDNN kernel (to compare timings)."""
    return ONEDNN_INPUT_GRADIENT.turned(enabled)


__all__ = ["fused_linear_relu", "linear_relu", "onednn_input_gradient", "takes_fused_path"]

"""The closed form's per-domain work fused by ``torch.compile`` (opt-in).

For residuals r (n, C) and features z (n, d) of one domain, ``fishr_lite.head_variance``
computes with eager operations over row blocks, a few passes over each block while it is in
cache ::

    forward : m = r^T z / n,   v = (1/n) sum_i (r_i z_i^T - m)^2           (m = 0 if not centered)
    backward: W_i = G' o (r_i z_i^T - m),  G' = (2/n) dL/dv,
              dL/dz_i = sum_c r_ic W_ic,   dL/dr_ic = W_ic . z_i

Compiled by inductor, the forward is one matrix product and one fused loop, and the backward
one loop that writes dL/dz and dL/dr together; the (n, C, d) per-sample gradients are never
stored. ``head_forward`` and ``head_backward`` add the linear head s = z W^T + b and
its residuals to those kernels, for ``fishr_lite.fused_head``: one node per domain computes
the scores and the variances, and its backward writes dL/dz once. On the Colored MNIST step
(2 x 25,000 x 390 features, ``benchmarks/bench_step.py``, case ``fishr_closed_form_compiled``)
the two together took the closed form's extra time in the step from 25-35 ms to 6-14 ms on
2 CPU cores of an Intel Xeon (1.09-1.12x the ERM step to 1.02-1.05x, in the six records of
2026-12-03 from 19:10 on). The eager node of ``fishr_lite.fused_head``, in row blocks, has
since come as close (``benchmarks/README.md``).

It is off by default: on a CPU inductor needs a C++ compiler, and the first call for each
shape compiles for a few seconds (the kernels are then cached on disk). Turn it on for a block
with ``with compiled_closed_form():``. Only float32 and float64 tensors take it (half precision
and ``create_graph=True`` keep the eager path); the values equal the eager ones up to float
rounding (tested against the formula in float64).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor

from fishr_lite.blocked import same_float_kind
from fishr_lite.grads import residual_vjp, score_residuals
from fishr_lite.switches import Switch

COMPILED = Switch(False)  # read by takes_compiled_path; changed by compiled_closed_form
_compiled: dict[str, Callable] = {}


ROWS_PER_GROUP = 64  # rows summed together first by column_sum


def column_sum(x: Tensor) -> Tensor:
    """sum_i x_i over the first dimension, in groups of ``ROWS_PER_GROUP`` consecutive rows
    first: compiled for a CPU, a plain ``sum(dim=0)`` over 25,000 rows walks each column down
    the whole matrix, which took 2.5 times as long as this in the same process."""
    n = x.shape[0]
    whole = n - n % ROWS_PER_GROUP
    if whole == 0:
        return x.sum(dim=0)
    groups = x[:whole].reshape(whole // ROWS_PER_GROUP, ROWS_PER_GROUP, *x.shape[1:]).sum(dim=1)
    return groups.sum(dim=0) + x[whole:].sum(dim=0)


def variance_forward(r: Tensor, z: Tensor, centered: bool) -> tuple[Tensor, Optional[Tensor]]:
    """(v, m) of the module docstring; m is None if not centered."""
    n = z.shape[0]
    outer = r.unsqueeze(2) * z.unsqueeze(1)  # (n, C, d), fused away by the compiler
    if not centered:
        return column_sum(outer.square()) / n, None
    mean = r.T @ z / n
    return column_sum((outer - mean).square()) / n, mean


def variance_backward(r: Tensor, z: Tensor, mean: Optional[Tensor], grad_v: Tensor) -> tuple[Tensor, Tensor]:
    """(dL/dr, dL/dz) of the module docstring."""
    outer = r.unsqueeze(2) * z.unsqueeze(1)
    weighted = (outer if mean is None else outer - mean) * (grad_v * (2.0 / z.shape[0]))
    return (weighted * z.unsqueeze(1)).sum(dim=2), (weighted * r.unsqueeze(2)).sum(dim=1)


def head_forward(features: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, loss: str,
                 centered: bool) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """(s, r, v, m) of a linear head s = z W^T + b, its residuals r = dl/ds and v, m above
    (``fishr_lite.fused_head``)."""
    scores = features @ weight.T if bias is None else torch.addmm(bias, features, weight.T)
    residual = score_residuals(scores, targets, loss)
    return (scores, residual, *variance_forward(residual, features, centered))


def head_backward(features: Tensor, weight: Tensor, scores: Tensor, residual: Tensor, mean: Optional[Tensor],
                  grad_s: Tensor, grad_r: Tensor, grad_v: Tensor, loss: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dz, dL/dW, dL/db) of :func:`head_forward`: dL/dr (given + the variance's) goes
    back through r = p - y, p = sigmoid(s) or softmax(s), and joins dL/ds; then
    dL/dz = dL/ds W + the variance's dL/dz, dL/dW = dL/ds^T z, dL/db = sum_i dL/ds_i."""
    grad_r_variance, grad_z_variance = variance_backward(residual, features, mean, grad_v)
    grad_s = grad_s + residual_vjp(scores, grad_r + grad_r_variance, loss)
    # one output: dL/ds W is an outer product, fused into the same loop as the variance's dL/dz
    grad_z = grad_s * weight if weight.shape[0] == 1 else grad_s @ weight
    return grad_z + grad_z_variance, grad_s.T @ features, grad_s.sum(dim=0)


def takes_compiled_path(*tensors: Tensor) -> bool:
    """Whether the compiled kernels take these tensors (``fishr_lite.head_variance``: the
    residuals and the features; ``fishr_lite.fused_head``: the features and the head's
    weight): switched on, and all float32 or all float64 on one device."""
    return COMPILED.on and same_float_kind(*tensors)


def compiled(name: str) -> Callable:
    """``torch.compile`` of the kernel ``name``, built once: ``"forward"`` or ``"backward"``
    (:func:`variance_forward`, :func:`variance_backward`), ``"head_forward"`` or
    ``"head_backward"`` (:func:`head_forward`, :func:`head_backward`)."""
    if name not in _compiled:
        kernels = {"forward": variance_forward, "backward": variance_backward,
                   "head_forward": head_forward, "head_backward": head_backward}
        _compiled[name] = torch.compile(kernels[name])
    return _compiled[name]


def run(name: str, *args: Optional[Tensor] | bool | str) -> tuple[Optional[Tensor], ...]:
    """Call the compiled ``name`` on ``args``; a kernel inductor cannot build says what to do."""
    from torch._dynamo.exc import BackendCompilerFailed

    try:
        return compiled(name)(*args)
    except BackendCompilerFailed as error:
        raise RuntimeError(
            "compiled_closed_form(): torch.compile could not build the closed form's kernels "
            f"({error.inner_exception!r}). On a CPU it needs a C++ compiler (e.g. `apt-get install "
            "g++`), on a GPU the triton package (`pip install triton`); or leave compiled_closed_form "
            "off: the eager closed form gives the same values."
        ) from error


def compiled_closed_form(enabled: bool = True) -> contextlib.AbstractContextManager:
    """``with compiled_closed_form():`` makes the closed form use the compiled kernels."""
    return COMPILED.turned(enabled)


__all__ = ["compiled_closed_form", "head_backward", "head_forward", "takes_compiled_path", "variance_backward",
           "variance_forward"]

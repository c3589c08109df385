"""Column variances of a tall matrix, computed in row blocks that stay in cache.

For an (n, D) matrix g whose rows g_i are n per-sample gradients of D coordinates ::

    gbar = (1/n) sum_i g_i
    v    = (1/n) sum_i (g_i - gbar)^2        (D,)   (gbar = 0 if not centered)

The mean is one matrix-vector product; the deviations g_i - gbar are then formed
``ROWS_PER_BLOCK`` rows at a time in one reused buffer, so no (n, D) temporary is allocated
in the forward pass, and the hand-written backward writes its result in one pass. On a GPU
a block holds up to 2^24 numbers instead (:func:`rows_per_block`), all the rows of a
Colored MNIST domain: one kernel launch per operation.
Half-precision input (float16, bfloat16, e.g. under ``torch.autocast``) is accumulated in
float32 and v is returned in float32.

The backward is differentiable again (``create_graph=True``: it then switches to plain
autograd operations). ``torch.func`` transforms cannot see inside a custom Function:
:func:`column_variances` refuses wrapped tensors with an error naming the plain formula,
``fishr_lite.penalty.reference_variance``, which the penalty uses there instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ROWS_PER_BLOCK = 1024  # 1024 x 390 float32 = 1.6 MB: a block fits in a 2 MB L2 cache
GPU_BLOCK_NUMEL = 1 << 24  # numbers in a block on a GPU: 64 MB of float32


def rows_per_block(n: int, device: torch.device, row_numel: int) -> int:
    """Rows in a block of an n-row tensor whose rows hold ``row_numel`` numbers each:
    ``ROWS_PER_BLOCK`` on a CPU; on a GPU as many as ``GPU_BLOCK_NUMEL`` numbers allow (all
    25,000 rows of a Colored MNIST domain), since there each operation on a block is one
    kernel launch, and the launches of small blocks would cost more than a cache saves: the
    closed-form penalty of a two-domain Colored MNIST step, forward and backward, dispatches
    963 operations in blocks of 1,024 rows, 147 in one block."""
    size = ROWS_PER_BLOCK if device.type == "cpu" else GPU_BLOCK_NUMEL // max(row_numel, 1)
    return max(1, min(size, n))


def row_blocks(n: int, rows: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of ``rows`` rows covering ``range(n)``."""
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


def block_buffer(like: Tensor, n: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """One uninitialized block of :func:`rows_per_block` rows of ``shape``, on ``like``'s
    device, to be written with ``out=`` block after block (``buffer[:b - a]``, for ``a, b`` in
    ``row_blocks(n, len(buffer))``)."""
    rows = rows_per_block(n, like.device, math.prod(shape))
    return like.new_empty((rows, *shape), dtype=dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16 / bfloat16 (and float32), float64 for float64: sums of squares
    over thousands of rows lose every digit in a 8-bit mantissa."""
    return torch.promote_types(dtype, torch.float32)


def same_float_kind(*tensors: Tensor) -> bool:
    """True if the tensors are all float32 or all float64, on one device: what the fused and
    compiled kernels take (``fishr_lite.fused_head``, ``fishr_lite.compiled_variance``)."""
    first = tensors[0]
    return first.dtype in (torch.float32, torch.float64) and all(
        t.dtype == first.dtype and t.device == first.device for t in tensors)


def under_torch_func(tensor: Tensor) -> bool:
    """True if ``tensor`` is wrapped by a ``torch.func`` transform (grad, vmap, jacrev, ...)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(tensor))


def refuse_torch_func(tensor: Tensor, what: str) -> None:
    """The custom Functions here have no ``torch.func`` rule: say so, and what to use instead."""
    if under_torch_func(tensor):
        raise RuntimeError(
            f"{what} is a custom autograd Function without torch.func support; under "
            "torch.func transforms use fishr_lite.penalty.reference_variance (plain autograd), "
            "which fishr_lite.penalty.gradient_variance picks automatically."
        )


def column_mean(g: Tensor, dtype: torch.dtype) -> Tensor:
    """gbar = (1/n) sum_i g_i as a (1, D) row in ``dtype``: one matrix-vector product g^T 1 / n
    when g is already in ``dtype`` (a pass at memory speed), else a float32 reduction."""
    if g.dtype != dtype:
        return g.mean(dim=0, keepdim=True, dtype=dtype)
    return torch.mv(g.T, g.new_ones(g.shape[0])).div_(g.shape[0]).unsqueeze(0)


class _ColumnVariance(torch.autograd.Function):
    """v of the module docstring, with backward dv -> dg_i = (2/n) (g_i - gbar) dv.

    The gbar term of the backward vanishes because sum_i (g_i - gbar) = 0.
    """

    @staticmethod
    def forward(ctx, g: Tensor, centered: bool) -> Tensor:
        acc = accumulation_dtype(g.dtype)
        with torch.autocast(g.device.type, enabled=False):
            mean = column_mean(g, acc) if centered else g.new_zeros((1, g.shape[1]), dtype=acc)
            v = g.new_zeros(g.shape[1], dtype=acc)
            buffer = block_buffer(g, g.shape[0], g.shape[1:], acc)
            for a, b in row_blocks(g.shape[0], len(buffer)):
                v += torch.sub(g[a:b].to(acc), mean, out=buffer[: b - a]).square_().sum(dim=0)
        ctx.centered = centered
        ctx.save_for_backward(g, mean)
        return v / g.shape[0]

    @staticmethod
    def backward(ctx, grad_v: Tensor):
        g, mean = ctx.saved_tensors
        n = g.shape[0]
        if torch.is_grad_enabled():  # create_graph=True: plain operations, differentiable again
            deviation = g - g.mean(dim=0, keepdim=True) if ctx.centered else g
            return (deviation * grad_v * (2.0 / n)).to(g.dtype), None
        scaled = grad_v * (2.0 / n)
        if g.dtype == mean.dtype:  # one pass: g_i * s - gbar * s
            return torch.addcmul(-(mean * scaled), g, scaled), None
        grad = torch.empty_like(g)  # half precision: the deviation in float32, rounded once
        for a, b in row_blocks(n, rows_per_block(n, g.device, g.shape[1])):
            grad[a:b] = (g[a:b].to(mean.dtype) - mean).mul_(scaled)
        return grad, None


def column_variances(g: Tensor, centered: bool = True) -> Tensor:
    """v = (1/n) sum_i (g_i - gbar)^2 for each column of the (n, D) matrix ``g``.

    With ``centered=False``, gbar = 0 (the second moment). Differentiable (twice too);
    float32 or float64 result (see the module docstring).
    """
    if g.dim() != 2:
        raise ValueError(f"column_variances needs an (n, D) matrix, got shape {tuple(g.shape)}; "
                         "reshape per-sample gradients with g.reshape(n, -1).")
    refuse_torch_func(g, "column_variances")
    return _ColumnVariance.apply(g, centered)

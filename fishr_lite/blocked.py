"""Column variances of a tall matrix, computed in row blocks that stay in cache.

For an (n, D) matrix g whose rows g_i are n per-sample gradients of D coordinates ::

    gbar = (1/n) sum_i g_i
    v    = (1/n) sum_i (g_i - gbar)^2        (D,)   (gbar = 0 if not centered)

The deviations g_i - gbar are formed ``ROWS_PER_BLOCK`` rows at a time, so no (n, D)
temporary is allocated in the forward pass, and the hand-written backward writes its
result in one pass. ``fishr_lite.penalty`` uses this for the diagonal Fishr variances;
``fishr_lite.head_variance`` uses the same blocks for a linear head.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROWS_PER_BLOCK = 2048  # 2048 x 390 float32 = 3 MB: a block and its temporaries stay in cache


def row_blocks(n: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of ``ROWS_PER_BLOCK`` rows covering ``range(n)``."""
    return [(start, min(start + ROWS_PER_BLOCK, n)) for start in range(0, n, ROWS_PER_BLOCK)]


class _ColumnVariance(torch.autograd.Function):
    """v of the module docstring, with backward dv -> dg_i = (2/n) (g_i - gbar) dv.

    The gbar term of the backward vanishes because sum_i (g_i - gbar) = 0. The backward is
    not differentiable again (the penalty is differentiated once).
    """

    @staticmethod
    def forward(ctx, g: Tensor, centered: bool) -> Tensor:
        mean = g.mean(dim=0, keepdim=True) if centered else torch.zeros_like(g[:1])
        v = g.new_zeros(g.shape[1])
        for a, b in row_blocks(g.shape[0]):
            v += (g[a:b] - mean).square_().sum(dim=0)
        ctx.save_for_backward(g, mean)
        return v / g.shape[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_v: Tensor):
        g, mean = ctx.saved_tensors
        scaled = grad_v * (2.0 / g.shape[0])
        grad = torch.empty_like(g)
        for a, b in row_blocks(g.shape[0]):
            torch.sub(g[a:b], mean, out=grad[a:b]).mul_(scaled)
        return grad, None


def column_variances(g: Tensor, centered: bool = True) -> Tensor:
    """v = (1/n) sum_i (g_i - gbar)^2 for each column of the (n, D) matrix ``g``.

    With ``centered=False``, gbar = 0 (the second moment). Differentiable once.
    """
    if g.dim() != 2:
        raise ValueError(f"column_variances needs an (n, D) matrix, got shape {tuple(g.shape)}; "
                         "reshape per-sample gradients with g.reshape(n, -1).")
    return _ColumnVariance.apply(g, centered)

"""Gradient variances of a linear head, computed without forming per-sample gradients.

For an ``nn.Linear`` head s_i = W z_i + b and residuals r_i = dl_i/ds_i (see
``fishr_lite.grads.head_residuals``), the per-sample gradients are g_i^W = r_i z_i^T and
g_i^b = r_i, so their per-coordinate variances over the n samples of a domain need only the
(n, C) residuals and the (n, d) features: ::

    m   = r^T z / n                                      (C, d), the mean gradient
    v^W = (1/n) sum_i (r_i z_i^T - m)^2                  (C, d)
    v^b = (1/n) sum_i (r_i - mean_j r_j)^2               (C,)

(``centered=False`` sets m and mean_j r_j to 0), with a hand-written backward.

This is what ``engine="closed_form"`` uses inside :class:`fishr_lite.training.FishrPenalty`: the
(n, C, d) per-sample gradients of ``closed_form_grads`` are only ever formed one row block at
a time, in one reused buffer, and on a CPU the blocks fit in cache: the forward reads the
features once (m and v^W pooled from each block's mean and squared deviations, see
``_Moments``), the backward once more, and it allocates one (n, d) tensor (a GPU takes
up to 2^24 numbers per block: ``fishr_lite.blocked.rows_per_block``). The result equals
``domain_variances(closed_form_grads(...))`` (tested in float64, values and gradients).
``blocked_head_forward`` and ``blocked_head_backward`` add the head's scores and
gradients to the same passes, for ``fishr_lite.fused_head``. Inside
``with fishr_lite.compiled_variance.compiled_closed_form():`` the forward and the backward run
as kernels fused by ``torch.compile`` instead (opt-in).

Half-precision features or logits (``torch.autocast``) are accumulated in float32. The
backward is differentiable again (``create_graph=True``); under ``torch.func`` transforms the
penalty uses the per-sample-gradient path instead (see ``fishr_lite.penalty.head_variances``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

import fishr_lite.compiled_variance as compiled_variance
from fishr_lite.blocked import accumulation_dtype, block_buffer, refuse_torch_func, row_blocks
from fishr_lite.grads import check_closed_form_inputs, head_residuals, residual_vjp, score_residuals


class _WeightVariance(torch.autograd.Function):
    """v^W of the module docstring, for residuals r (n, C) and features z (n, d).

    Two passes over z, each in row blocks: m = r^T z / n, then sum_i (r_i z_i^T - m)^2 / n
    with the deviations formed block by block (the exact two-pass variance, no cancellation
    of mean(g^2) - mean(g)^2). Backward, with D_i = r_i z_i^T - m and G = dL/dv:
    dL/dz_i = (2/n) sum_c r_ic (G∘D_i)_c,  dL/dr_ic = (2/n) (G∘D_i)_c · z_i.
    """

    @staticmethod
    def forward(ctx, residual: Tensor, features: Tensor, centered: bool) -> Tensor:
        acc = accumulation_dtype(features.dtype)
        with torch.autocast(features.device.type, enabled=False):
            residual = residual.to(acc)
            if compiled_variance.takes_compiled_path(residual, features):
                variance, mean = compiled_variance.run("forward", residual, features, centered)
            else:
                variance, mean = _blocked_variance(residual, features, centered)
        ctx.centered = centered
        ctx.save_for_backward(residual, features, *(() if mean is None else (mean,)))
        return variance

    @staticmethod
    def backward(ctx, grad_v: Tensor):
        residual, features, *maybe_mean = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: plain operations, differentiable again
            return (*_plain_gradients(residual, features, ctx.centered, grad_v), None)
        mean = maybe_mean[0] if maybe_mean else None
        if compiled_variance.takes_compiled_path(residual, features):
            grad_r, grad_z = compiled_variance.run("backward", residual, features, mean, grad_v)
            return grad_r, grad_z, None
        features_dtype = features.dtype  # half precision: backward in float32, rounded once
        features = features.to(residual.dtype)
        n, classes = features.shape[0], residual.shape[1]
        scaled = grad_v * (2.0 / n)
        negative_mean = None if mean is None else -mean
        grad_r = torch.empty_like(residual) if ctx.needs_input_grad[0] else None
        grad_z = torch.empty_like(features) if ctx.needs_input_grad[1] else None
        buffer = block_buffer(features, n, _deviation_shape(residual, features), residual.dtype)
        for a, b in row_blocks(n, len(buffer)):
            r, z = residual[a:b], features[a:b]
            weighted = _deviations(r, z, negative_mean, out=buffer[: b - a]).mul_(scaled)  # G∘D_i
            if classes == 1:
                if grad_z is not None:
                    torch.mul(weighted, r, out=grad_z[a:b])
                if grad_r is not None:
                    torch.sum(weighted.mul_(z), dim=1, keepdim=True, out=grad_r[a:b])
                continue
            if grad_z is not None:
                torch.sum(weighted.mul(r.unsqueeze(2)), dim=1, out=grad_z[a:b])
            if grad_r is not None:
                torch.sum(weighted.mul_(z.unsqueeze(1)), dim=2, out=grad_r[a:b])
        return grad_r, None if grad_z is None else grad_z.to(features_dtype), None


class _Moments:
    """m and v^W of the module docstring, accumulated block by block in one pass over z.

    Block k of B_k rows keeps its mean m_k = r_k^T z_k / B_k and its sum of squared deviations
    S_k = sum_{i in k} (r_i z_i^T - m_k)^2, formed in cache (no cancellation); the blocks then
    pool into (Chan, Golub and LeVeque 1983) ::

        m = sum_k B_k m_k / n,      v^W = (sum_k S_k + sum_k B_k (m_k - m)^2) / n

    Not centered: S_k = sum_{i in k} (r_i z_i^T)^2, v^W = sum_k S_k / n and m is None.
    """

    def __init__(self, residual: Tensor, features: Tensor, centered: bool) -> None:
        n, dtype = features.shape[0], residual.dtype
        deviation_shape = _deviation_shape(residual, features)
        self.buffer = block_buffer(features, n, deviation_shape, dtype)
        self.blocks = row_blocks(n, len(self.buffer))
        self.shape = (residual.shape[1], features.shape[1])
        self.sums = features.new_empty((len(self.blocks), *deviation_shape), dtype=dtype)
        self.negative_means = features.new_empty((len(self.blocks), *self.shape), dtype=dtype) if centered else None

    def add(self, k: int, r: Tensor, z: Tensor) -> None:
        """Block k: residuals r (B, C) and features z (B, d), z in r's dtype."""
        negative_mean = None
        if self.negative_means is not None:  # -m_k = -r^T z / B, by one product
            negative_mean = torch.addmm(self.negative_means[k], r.T, z, beta=0, alpha=-1 / r.shape[0],
                                        out=self.negative_means[k])
        torch.sum(_deviations(r, z, negative_mean, self.buffer[: r.shape[0]]).square_(), dim=0, out=self.sums[k])

    def result(self) -> tuple[Tensor, Optional[Tensor]]:
        """(v^W, m), m None if not centered."""
        n = self.blocks[-1][1]
        squares = self.sums.sum(dim=0).view(self.shape)
        if self.negative_means is None:
            return squares / n, None
        rows = torch.tensor([b - a for a, b in self.blocks], dtype=self.sums.dtype, device=self.sums.device)
        rows = rows.view(-1, 1, 1)
        mean = (self.negative_means * rows).sum(dim=0).div_(-n)
        between = ((self.negative_means + mean).square_() * rows).sum(dim=0)
        return (squares + between) / n, mean


def _blocked_variance(residual: Tensor, features: Tensor, centered: bool) -> tuple[Tensor, Optional[Tensor]]:
    """(v^W, m) of :class:`_WeightVariance` (m None if not centered), ``residual`` already in
    the accumulation dtype, in one pass over the features (:class:`_Moments`)."""
    moments = _Moments(residual, features, centered)
    for k, (a, b) in enumerate(moments.blocks):
        moments.add(k, residual[a:b], features[a:b].to(residual.dtype))
    return moments.result()


def blocked_head_forward(features: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, loss: str,
                         centered: bool) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """(s, r, v^W, m) for a linear head s = z W^T + b, its residuals r = dl/ds and the
    moments of :class:`_Moments`, in one pass over z: each row block's scores, residuals and
    moments while the block is in cache (``fishr_lite.fused_head``; float32 or float64)."""
    scores = features.new_empty(features.shape[0], weight.shape[0])
    residual = torch.empty_like(scores)
    moments = _Moments(residual, features, centered)
    for k, (a, b) in enumerate(moments.blocks):
        z, s = features[a:b], scores[a:b]
        if weight.shape[0] == 1:  # one output: row dot products, s_i = z_i . w (+ b)
            torch.sum(torch.mul(z, weight, out=moments.buffer[: b - a]), dim=1, keepdim=True, out=s)
            if bias is not None:
                s.add_(bias)
        elif bias is None:
            torch.mm(z, weight.T, out=s)
        else:
            torch.addmm(bias, z, weight.T, out=s)
        score_residuals(s, targets[a:b], loss, out=residual[a:b])
        moments.add(k, residual[a:b], z)
    return (scores, residual, *moments.result())


def blocked_head_backward(features: Tensor, weight: Tensor, scores: Tensor, residual: Tensor,
                          mean: Optional[Tensor], grad_s: Tensor, grad_r: Tensor, grad_v: Tensor,
                          loss: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dz, dL/dW, dL/db) of :func:`blocked_head_forward`, in one pass over z. J_i^T being
    linear, dL/ds_i = grad_s_i + J_i^T grad_r_i (all rows at once, ``fishr_lite.grads.residual_vjp``)
    + J_i^T (G'∘D_i) · z_i (the variance's dL/dr_i, block by block, with
    G'∘D_i = (2/n) dL/dv ∘ (r_i z_i^T - m)); then dL/dz_i = W^T dL/ds_i + sum_c r_ic (G'∘D_i)_c,
    dL/dW = sum_i dL/ds_i z_i^T and dL/db = sum_i dL/ds_i."""
    n, classes = residual.shape
    scaled = grad_v * (2.0 / n)
    negative_mean = None if mean is None else -mean
    grad_scores = grad_s + residual_vjp(scores, grad_r, loss)
    slope = residual_vjp(scores, torch.ones_like(scores), loss) if loss == "bce" else None  # J_i = p_i (1 - p_i)
    grad_z, grad_w = torch.empty_like(features), torch.zeros_like(weight)
    buffer = block_buffer(features, n, _deviation_shape(residual, features), residual.dtype)
    for a, b in row_blocks(n, len(buffer)):
        r, z = residual[a:b], features[a:b]
        weighted = _deviations(r, z, negative_mean, out=buffer[: b - a]).mul_(scaled)  # G'∘D_i
        from_variance = torch.linalg.vecdot(weighted, z if classes == 1 else z.unsqueeze(1)).view(b - a, classes)
        if slope is None:
            ds = grad_scores[a:b].add_(residual_vjp(scores[a:b], from_variance, loss))
        else:
            ds = grad_scores[a:b].addcmul_(slope[a:b], from_variance)
        if classes == 1:  # W^T dL/ds_i is an outer product
            torch.mul(weighted, r, out=grad_z[a:b]).addr_(ds[:, 0], weight[0])
        else:
            torch.sum(weighted.mul_(r.unsqueeze(2)), dim=1, out=grad_z[a:b]).addmm_(ds, weight)
        grad_w.addmm_(ds.T, z)
    return grad_z, grad_w, grad_scores.sum(dim=0)


def _plain_gradients(residual: Tensor, features: Tensor, centered: bool, grad_v: Tensor):
    """The backward of :class:`_WeightVariance` with plain operations (so that it can itself be
    differentiated): D_i = r_i z_i^T - m, dL/dz_i = (2/n) sum_c r_ic (G∘D_i)_c,
    dL/dr_ic = (2/n) (G∘D_i)_c · z_i, with m recomputed from r and z."""
    z = features.to(residual.dtype)
    outer = residual.unsqueeze(2) * z.unsqueeze(1)  # (n, C, d)
    deviation = outer - outer.mean(dim=0) if centered else outer
    weighted = deviation * grad_v * (2.0 / z.shape[0])
    grad_r = (weighted * z.unsqueeze(1)).sum(dim=2)
    grad_z = (weighted * residual.unsqueeze(2)).sum(dim=1).to(features.dtype)
    return grad_r, grad_z


def _deviation_shape(residual: Tensor, features: Tensor) -> tuple[int, ...]:
    """Shape of one sample's r_i z_i^T as :func:`_deviations` writes it: (d,) or (C, d)."""
    d = features.shape[1]
    return (d,) if residual.shape[1] == 1 else (residual.shape[1], d)


def _deviations(r: Tensor, z: Tensor, negative_mean: Optional[Tensor], out: Tensor) -> Tensor:
    """Per-sample weight gradients r_i z_i^T of a block plus ``negative_mean`` (-m, negated once
    by the caller, if given), written into ``out``: (B, d) for one output (C = 1, the common
    binary head), else (B, C, d)."""
    if r.shape[1] == 1:
        if negative_mean is None:
            return torch.mul(r, z, out=out)
        return torch.addcmul(negative_mean, r, z, out=out)
    torch.mul(r.unsqueeze(2), z.unsqueeze(1), out=out)
    return out if negative_mean is None else out.add_(negative_mean)


def linear_head_variances(
    head: nn.Linear,
    features: Tensor,
    targets: Tensor,
    loss: str = "bce",
    *,
    centered: bool = True,
    logits: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """``{"weight": v^W (C, d), "bias": v^b (C,)}`` for one domain (see the module docstring).

    Same values and gradients as ``domain_variances([closed_form_grads(head, features,
    targets, loss, logits)], centered=centered)[0]``, for an ``nn.Linear`` head.
    """
    check_closed_form_inputs(head, features)
    refuse_torch_func(features, "linear_head_variances")
    residual = head_residuals(head, features, targets, loss, logits)
    variances = {"weight": _WeightVariance.apply(residual, features, centered)}
    if head.bias is not None:
        variances["bias"] = bias_variance(residual, centered)
    return variances


def bias_variance(residual: Tensor, centered: bool = True) -> Tensor:
    """v^b = (1/n) sum_i (r_i - mean_j r_j)^2 (C,), the bias gradients being the residuals."""
    deviation = residual - residual.mean(dim=0, keepdim=True) if centered else residual
    return deviation.pow(2).mean(dim=0)


__all__ = ["bias_variance", "linear_head_variances"]

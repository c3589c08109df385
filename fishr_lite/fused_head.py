"""A linear head and the variances of its per-sample gradients, in one pass over the features.

For an ``nn.Linear`` head s_i = W z_i + b, residuals r_i = dl_i/ds_i (``head_residuals``) and
per-sample gradients g_i^W = r_i z_i^T, g_i^b = r_i, one domain's outputs are ::

    s_i = W z_i + b                                    (n, C)  the logits
    v^W = (1/n) sum_i (r_i z_i^T - m)^2                (C, d)  m = (1/n) sum_i r_i z_i^T
    v^b = (1/n) sum_i (r_i - rbar)^2                   (C,)    rbar = (1/n) sum_i r_i

(``centered=False``: m = 0 and rbar = 0). :func:`fishr_lite.head_variance.linear_head_variances`
computes v from logits the head has already produced, and its gradient with respect to the
features then has to be added to the head's own: one more (n, d) tensor and one more pass
over it. Here the head is part of the same operation, so each block of rows of z is read once
in the forward (logits, then the block's mean and squared deviations, merged across blocks
by Chan's formula: exact, no E[g^2] - E[g]^2 cancellation), and once in the backward, which
writes dL/dz once. With G = dL/dv^W, G_b = dL/dv^b and k = 2/n: ::

    dL/dr_i  = k [r_i ∘ (G (z_i ∘ z_i)) - (G ∘ m) z_i] + k G_b ∘ (r_i - rbar)
    dL/ds_i  = dL/ds_i (from the logits' users) + J_i^T dL/dr_i      J_i = dr_i/ds_i
    dL/dz_i  = W^T dL/ds_i - k (G ∘ m)^T r_i + k (G^T (r_i ∘ r_i)) ∘ z_i
    dL/dW    = sum_i dL/ds_i z_i^T,   dL/db = sum_i dL/ds_i

with J_i = p_i (1 - p_i) for BCE (p = sigmoid(s)) and diag(p_i) - p_i p_i^T for cross-entropy.
The values and gradients equal those of ``head(z)`` followed by ``linear_head_variances``
(tested in float64 against per-sample gradients from an autograd loop). Under
``create_graph=True`` the backward recomputes the plain operations, so it can be differentiated
again; ``torch.func`` transforms and half precision are refused (use the unfused path).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fishr_lite.blocked import refuse_torch_func
from fishr_lite.grads import LOSSES, bce_targets, head_residuals

ROWS_PER_BLOCK = 2048  # 2048 x 390 float32 = 3 MB: blocks and temporaries stay in the last-level cache,
# and few enough blocks that the per-operation overhead of Python stays small


def _blocks(n: int) -> list[tuple[int, int]]:
    return [(a, min(a + ROWS_PER_BLOCK, n)) for a in range(0, n, ROWS_PER_BLOCK)]


def _residuals(scores: Tensor, targets: Tensor, loss: str) -> tuple[Tensor, Tensor]:
    """(r, p): residuals dl/ds and probabilities (sigmoid or softmax) of a block's scores."""
    if loss == "bce":
        p = torch.sigmoid(scores)
        return p - bce_targets(targets, scores), p
    p = torch.softmax(scores, dim=1)
    r = p.clone()
    r[torch.arange(len(targets), device=r.device), targets] -= 1.0
    return r, p


class _Merge:
    """Running (count, mean, sum of squared deviations) of row vectors, merged block by block
    with Chan et al.'s formula: M2 += M2_b + delta^2 N n_b / (N + n_b), delta = mean_b - mean."""

    def __init__(self, like: Tensor) -> None:
        self.count, self.mean, self.m2 = 0, torch.zeros_like(like), torch.zeros_like(like)

    def add(self, count: int, mean: Tensor, m2: Tensor) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.m2 += m2 + delta.square() * (self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total


def _block_weight_moments(r: Tensor, z: Tensor, centered: bool) -> tuple[Tensor, Tensor]:
    """(mean, sum of squared deviations) over a block's rows of r_i z_i^T, both (C, d)."""
    mean = r.T @ z / len(z) if centered else None
    m2 = z.new_empty(r.shape[1], z.shape[1])
    for c in range(r.shape[1]):
        outer = r[:, c:c + 1] * z if mean is None else torch.addcmul(-mean[c], r[:, c:c + 1], z)
        torch.sum(outer.square_(), dim=0, out=m2[c])
    return (mean if mean is not None else torch.zeros_like(m2)), m2


class _LinearHeadVariances(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                loss: str, centered: bool):
        n, classes = features.shape[0], weight.shape[0]
        scores = features.new_empty(n, classes)
        probabilities = torch.empty_like(scores)
        residuals = torch.empty_like(scores)
        weight_moments = _Merge(weight)
        bias_moments = _Merge(weight[:, 0])
        for a, b in _blocks(n):
            z = features[a:b]
            s = scores[a:b]
            torch.mm(z, weight.T, out=s)
            if bias is not None:
                s += bias
            r, p = _residuals(s, targets[a:b], loss)
            residuals[a:b], probabilities[a:b] = r, p
            weight_moments.add(b - a, *_block_weight_moments(r, z, centered))
            r_mean = r.mean(dim=0) if centered else torch.zeros_like(r[0])
            bias_moments.add(b - a, r_mean, (r - r_mean).square().sum(dim=0))
        # not centered: the merged "m2" is sum (r z)^2 + n * 0, as each block's mean is 0
        ctx.loss, ctx.centered, ctx.has_bias = loss, centered, bias is not None
        ctx.save_for_backward(features, weight, bias, targets, residuals, probabilities,
                              weight_moments.mean, bias_moments.mean)
        return scores, weight_moments.m2 / n, bias_moments.m2 / n

    @staticmethod
    def backward(ctx, grad_scores, grad_vw, grad_vb):
        features, weight, bias, targets, residuals, probabilities, mean, r_mean = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: plain operations, differentiable again
            return (*_plain_backward(ctx, (features, weight, bias), targets, grad_scores, grad_vw,
                                     grad_vb), None, None, None)
        n = features.shape[0]
        k = 2.0 / n
        g = grad_vw if grad_vw is not None else torch.zeros_like(weight)
        g_bias = grad_vb if grad_vb is not None else torch.zeros_like(weight[:, 0])
        g_mean = g * mean  # zero if not centered
        stacked = torch.cat([weight, g_mean])  # (2C, d): W and G∘m, one product for dL/dz
        grad_z = torch.empty_like(features) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight)
        grad_b = torch.zeros_like(weight[:, 0])
        for a, b in _blocks(n):
            z, r, p = features[a:b], residuals[a:b], probabilities[a:b]
            grad_r = (z.square() @ g.T).mul_(r).sub_(z @ g_mean.T).mul_(k)
            grad_r.addcmul_(r - r_mean, g_bias, value=k)
            if ctx.loss == "bce":
                grad_s = grad_r.mul_(p * (1 - p))
            else:
                grad_s = p * (grad_r - (p * grad_r).sum(dim=1, keepdim=True))
            if grad_scores is not None:
                grad_s += grad_scores[a:b]
            grad_w.addmm_(grad_s.T, z)
            grad_b += grad_s.sum(dim=0)
            if grad_z is not None:
                block = grad_z[a:b]
                torch.mm(torch.cat([grad_s, r * -k], dim=1), stacked, out=block)
                block.addcmul_((r.square() @ g), z, value=k)
        return grad_z, grad_w, grad_b if ctx.has_bias else None, None, None, None


def _plain_backward(ctx, inputs, targets, grad_scores, grad_vw, grad_vb):
    """The backward by autograd through the plain formulas (differentiable again)."""
    wanted = [k for k, (t, need) in enumerate(zip(inputs, ctx.needs_input_grad)) if need and t is not None]
    with torch.enable_grad():
        outputs = _plain_forward(*inputs, targets, ctx.loss, ctx.centered)
        pairs = [(out, grad) for out, grad in zip(outputs, (grad_scores, grad_vw, grad_vb))
                 if grad is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], [inputs[k] for k in wanted],
                                    [g for _, g in pairs], create_graph=True, allow_unused=True)
    result = [None, None, None]
    for k, grad in zip(wanted, grads):
        result[k] = grad
    return result


def _plain_forward(features, weight, bias, targets, loss, centered):
    """The formulas of the module docstring with plain operations: (s, v^W, v^b)."""
    scores = features @ weight.T + (bias if bias is not None else 0.0)
    r = head_residuals(nn.Identity(), features, targets, loss, logits=scores)
    outer = r.unsqueeze(2) * features.unsqueeze(1)
    deviation = outer - outer.mean(dim=0) if centered else outer
    r_deviation = r - r.mean(dim=0) if centered else r
    return scores, deviation.square().mean(dim=0), r_deviation.square().mean(dim=0)


def linear_head_with_variances(
    head: nn.Linear, features: Tensor, targets: Tensor, loss: str = "bce", *, centered: bool = True
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(logits (n, C), {"weight": v^W (C, d), "bias": v^b (C,)})`` of one domain (see the
    module docstring): ``head(features)`` and ``linear_head_variances(head, features, targets,
    loss)`` in one pass over the features, with one backward for both."""
    if not isinstance(head, nn.Linear):
        raise ValueError(f"linear_head_with_variances needs an nn.Linear head, got "
                         f"{type(head).__name__}; compute head(features) and use "
                         "fishr_lite.penalty.head_variances instead.")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}.")
    if features.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled():
        raise ValueError(f"linear_head_with_variances computes in float32 or float64, got "
                         f"{features.dtype}{' under autocast' if torch.is_autocast_enabled() else ''}; "
                         "use head(features) and fishr_lite.penalty.head_variances instead.")
    if features.dim() != 2 or len(features) != len(targets):
        raise ValueError(f"features must be (n, d) with one target per row, got "
                         f"{tuple(features.shape)} and {len(targets)} targets.")
    refuse_torch_func(features, "linear_head_with_variances")
    if loss == "bce" and head.out_features != 1:
        raise ValueError(f"loss 'bce' needs a head with one output, got {head.out_features}.")
    scores, vw, vb = _LinearHeadVariances.apply(features, head.weight, head.bias, targets, loss, centered)
    variances = {"weight": vw}
    if head.bias is not None:
        variances["bias"] = vb
    return scores, variances


__all__ = ["linear_head_with_variances"]

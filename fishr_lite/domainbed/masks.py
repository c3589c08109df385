"""Gradient masking with DomainBed's update rules: ANDMask and SANDMask.

Both compute each training domain's gradient g_e = grad R_e of every parameter tensor, average
them, gbar = (1/E) sum_e g_e, and give Adam a masked gradient in place of the mean:

    grad = m * gbar / (1e-10 + mean(m)),   a = abs((1/E) sum_e sign(g_e))   (elementwise)

- :class:`ANDMask` (Parascandolo et al. 2021): m = 1[a >= tau], tau = ``tau``.
- :class:`SANDMask` (Shahtalebi et al. 2021): m = max(0, tanh(k (a - tau) / s^2)), k = ``k``,
  s^2 the unbiased variance over domains of g_e (a NaN variance, as with one domain, is
  replaced by 1e-17, and so is a NaN mask entry).

As DomainBed's ``algorithms.py`` (facebookresearch/DomainBed, read at commit 026d588): each
domain goes through the network separately; ``loss`` reports the mean domain risk. The only
difference: the mask is built in the gradients' dtype (DomainBed casts ANDMask's mask to
float32), which changes nothing in float32 training.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .erm import ERM, Minibatches


class _GradientMask(ERM):
    """Per-domain gradients, then Adam on the masked mean gradient of :meth:`mask`."""

    def mask(self, grads: Tensor) -> Tensor:
        """The mask m for one parameter tensor, from its stacked per-domain gradients (E, ...)."""
        raise NotImplementedError

    def update(self, minibatches: Minibatches, unlabeled: Optional[Minibatches] = None) -> dict[str, float]:
        self._check(minibatches)
        params = list(self.network.parameters())
        per_domain, mean_loss = [], 0.0
        for x, y in minibatches:
            loss = F.cross_entropy(self.network(x), y)
            mean_loss += loss.item() / len(minibatches)
            per_domain.append(torch.autograd.grad(loss, params))
        self.optimizer.zero_grad()
        for i, param in enumerate(params):
            grads = torch.stack([g[i] for g in per_domain])
            mask = self.mask(grads)
            param.grad = mask * grads.mean(dim=0) * (1.0 / (1e-10 + mask.sum() / mask.numel()))
        self.optimizer.step()
        return {"loss": mean_loss}


class ANDMask(_GradientMask):
    """Keep the coordinates where at least a fraction ``tau`` of domains agree on the sign."""

    def mask(self, grads: Tensor) -> Tensor:
        return (torch.sign(grads).mean(dim=0).abs() >= self.hparams["tau"]).to(grads.dtype)


class SANDMask(_GradientMask):
    """A smooth AND-mask, sharper where the domains' gradients vary little."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int,
                 hparams: dict, featurizer: Optional[nn.Module] = None):
        super().__init__(input_shape, num_classes, num_domains, hparams, featurizer)
        self.register_buffer("update_count", torch.tensor([0]))

    def mask(self, grads: Tensor) -> Tensor:
        variance = grads.var(dim=0)
        variance[torch.isnan(variance)] = 1e-17
        agreement = torch.sign(grads).mean(dim=0).abs()
        mask = torch.tanh(self.hparams["k"] * variance.pow(-1) * (agreement - self.hparams["tau"]))
        mask = torch.max(mask, torch.zeros_like(mask))
        mask[torch.isnan(mask)] = 1e-17
        return mask

    def update(self, minibatches: Minibatches, unlabeled: Optional[Minibatches] = None) -> dict[str, float]:
        out = super().update(minibatches, unlabeled)
        self.update_count += 1
        return out

"""Fused linear-head variances against per-sample gradients from a plain autograd loop (float64)."""

import pytest
import torch
from torch import nn

import fishr_lite.blocked as blocked
from fishr_lite.grads import loop_grads
from fishr_lite.head_variance import _WeightVariance, linear_head_variances
from fishr_lite.penalty import reference_variance


@pytest.mark.parametrize("block", [2048, 3])  # one block, and several with a ragged last one
@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_values_and_gradients_match_an_autograd_loop(head_problem, monkeypatch, loss, centered, block):
    monkeypatch.setattr(blocked, "ROWS_PER_BLOCK", block)
    featurizer, head, x, y = head_problem(loss)
    z = featurizer(x)
    got = linear_head_variances(head, z, y, loss, centered=centered)
    want = {name: reference_variance(g.reshape(len(g), -1), centered).reshape(g.shape[1:])
            for name, g in loop_grads(head, z, y, loss=loss).items()}
    assert got.keys() == want.keys()
    params = list(featurizer.parameters()) + list(head.parameters())
    weights = {k: torch.randn_like(v) for k, v in want.items()}  # a random direction for dL/dv
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-14)
    objective = lambda v: sum((weights[k] * v[k]).sum() for k in v)
    grads_got = torch.autograd.grad(objective(got), params, retain_graph=True)
    grads_want = torch.autograd.grad(objective(want), params)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_one_pass_variance_keeps_float32_digits_when_blocks_differ(monkeypatch):
    """Rows sorted so that every block of 64 has another mean, around a large common value:
    pooling the blocks' means and squared deviations keeps float32's digits, where
    mean(g^2) - mean(g)^2 over the same float32 numbers loses two more."""
    monkeypatch.setattr(blocked, "ROWS_PER_BLOCK", 64)
    torch.manual_seed(2)
    n, d = 640, 7
    z = 1000 + torch.randn(n, d, dtype=torch.float64) + torch.linspace(0, 20, n, dtype=torch.float64)[:, None]
    r = 1 + 0.1 * torch.rand(n, 1, dtype=torch.float64)
    g = r * z  # per-sample weight gradients, written out in float64
    want = (g - g.mean(dim=0)).pow(2).mean(dim=0)
    got = _WeightVariance.apply(r.float(), z.float(), True).double().squeeze(0)
    assert ((got - want).abs() / want).max() < 1e-5
    g32 = r.float() * z.float()
    naive = (g32.pow(2).mean(dim=0) - g32.mean(dim=0).pow(2)).double()
    assert ((naive - want).abs() / want).max() > 1e-4  # the case is a hard one


def test_weight_variance_passes_gradcheck_and_gradgradcheck(monkeypatch):
    monkeypatch.setattr(blocked, "ROWS_PER_BLOCK", 4)
    torch.manual_seed(1)
    r = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    z = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    for centered in (True, False):
        function = lambda r, z: _WeightVariance.apply(r, z, centered)  # noqa: E731
        assert torch.autograd.gradcheck(function, (r, z))
        assert torch.autograd.gradgradcheck(function, (r, z))


def test_bad_input_raises_clear_errors(head_problem):
    featurizer, head, x, y = head_problem("bce")
    z = featurizer(x)
    with pytest.raises(ValueError, match="nn.Linear"):
        linear_head_variances(nn.Sequential(head), z, y)
    with pytest.raises(ValueError, match="one 0/1 target per logit"):
        linear_head_variances(head, z, y[:-1])

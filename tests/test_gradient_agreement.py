"""Fish's gradient inner product and AND-mask's sign agreement, against explicit loops."""

import itertools

import pytest
import torch
from torch import nn

from fishr_lite.gradient_agreement import (
    and_mask,
    and_masked_gradient,
    domain_mean_gradients,
    flatten_per_sample,
    gradient_inner_product,
    sign_agreement,
)
from fishr_lite.grads import per_sample_grads
from fishr_lite.objectives import mean_loss


def test_domain_mean_gradients_are_the_gradients_of_the_domain_risks():
    torch.manual_seed(0)
    head = nn.Linear(3, 2).double()
    domains = [(torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 2, (n,))) for n in (5, 8)]
    grads = [per_sample_grads(head, z, y, loss="ce") for z, y in domains]
    means = domain_mean_gradients(grads)
    assert means.shape == (2, 3 * 2 + 2)
    for row, (z, y) in zip(means, domains):
        expected = torch.autograd.grad(mean_loss(head(z), y, "ce"), list(head.parameters()))
        torch.testing.assert_close(row, torch.cat([g.reshape(-1) for g in expected]),
                                   rtol=1e-12, atol=1e-12)


def test_gradient_inner_product_is_the_mean_over_pairs():
    torch.manual_seed(1)
    g = torch.randn(4, 6, dtype=torch.float64)
    pairs = [g[a] @ g[b] for a, b in itertools.combinations(range(4), 2)]
    torch.testing.assert_close(gradient_inner_product(g), torch.stack(pairs).mean())
    same = g[:1].repeat(2, 1)
    torch.testing.assert_close(gradient_inner_product(same), g[0].pow(2).sum())
    torch.testing.assert_close(gradient_inner_product(torch.stack([g[0], -g[0]])), -g[0].pow(2).sum())


def test_sign_agreement_and_mask_on_a_hand_made_example():
    g = torch.tensor([[1.0, 2.0, -1.0, 0.0], [3.0, -1.0, -2.0, 0.0], [0.5, 1.0, -4.0, 1.0]])
    torch.testing.assert_close(sign_agreement(g), torch.tensor([1.0, 1 / 3, 1.0, 1 / 3]))
    torch.testing.assert_close(and_mask(g, 1.0), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(and_mask(g, 0.3), torch.ones(4))
    mean = g.mean(dim=0)
    expected = torch.tensor([mean[0], 0.0, mean[2], 0.0]) / 0.5
    torch.testing.assert_close(and_masked_gradient(g, 1.0), expected)
    torch.testing.assert_close(and_masked_gradient(g, 1.0, rescale=False), expected * 0.5)


def test_flatten_keeps_dict_order():
    grads = {"w": torch.arange(12.0).reshape(2, 3, 2), "b": torch.tensor([[7.0], [8.0]])}
    flat = flatten_per_sample(grads)
    torch.testing.assert_close(flat[1], torch.tensor([6.0, 7, 8, 9, 10, 11, 8]))


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="at least 2"):
        gradient_inner_product(torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\(E, D\)"):
        sign_agreement(torch.ones(3))
    with pytest.raises(ValueError, match="tau"):
        and_mask(torch.ones(2, 3), 1.5)
    with pytest.raises(ValueError, match="row counts"):
        flatten_per_sample({"w": torch.ones(2, 3), "b": torch.ones(3, 1)})
    with pytest.raises(ValueError, match="no domains"):
        domain_mean_gradients([])

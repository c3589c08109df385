"""linear_relu: the fused oneDNN layer gives relu(x W^T + b) and its gradients, written out."""

import pytest
import torch

from fishr_lite.experiments.coloredmnist import MLP
from fishr_lite.linear_relu import _KERNEL, fused_linear_relu, linear_relu, onednn_input_gradient, takes_fused_path

needs_kernel = pytest.mark.skipif(_KERNEL is None, reason="this PyTorch build has no oneDNN linear kernel")


def inputs(dtype=torch.float32, n=300, d_in=392, d_out=390):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=generator, dtype=dtype)
    weight = torch.randn(d_out, d_in, generator=generator, dtype=dtype) / d_in**0.5
    bias = torch.randn(d_out, generator=generator, dtype=dtype) * 0.1
    return [t.requires_grad_() for t in (x, weight, bias)]


def by_formula(x, weight, bias):
    """relu(x W^T + b), one sum per output written as a matrix product and a maximum."""
    return torch.maximum(x @ weight.T + bias, torch.zeros(()))


@needs_kernel
@pytest.mark.parametrize("onednn", [True, False])  # the input gradient by oneDNN, or by @
def test_values_and_gradients_match_the_formula(onednn):
    x, weight, bias = inputs()
    assert takes_fused_path(x, weight, bias)
    y = linear_relu(x, weight, bias)
    expected = by_formula(x, weight, bias)
    assert 0.3 < (y > 0).float().mean() < 0.7  # both sides of the kink are exercised
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(y)
    with onednn_input_gradient(onednn):
        got = torch.autograd.grad(y, (x, weight, bias), upstream)
    want = torch.autograd.grad(expected, (x, weight, bias), upstream)
    for name, a, b in zip(("x", "weight", "bias"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@needs_kernel
def test_gradients_of_gradients_match_the_formula():
    x, weight, bias = inputs(n=64)
    grads = []
    for layer in (linear_relu, by_formula):
        (grad_x,) = torch.autograd.grad(layer(x, weight, bias).pow(2).sum(), [x], create_graph=True)
        grads.append(torch.autograd.grad(grad_x.pow(2).sum(), [weight, bias]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


@needs_kernel
def test_only_the_inputs_that_need_a_gradient_get_one():
    x, weight, bias = inputs(n=32)
    x = x.detach()
    y = linear_relu(x, weight, bias)
    grad_weight, grad_bias = torch.autograd.grad(y.sum(), [weight, bias])
    assert grad_weight.shape == weight.shape and grad_bias.shape == bias.shape


def test_plain_ops_where_the_kernel_does_not_apply():
    x, weight, bias = inputs(dtype=torch.float64, n=50)
    assert not takes_fused_path(x, weight, bias)  # float64
    assert torch.equal(linear_relu(x, weight, bias), torch.relu(torch.nn.functional.linear(x, weight, bias)))
    x32, weight32, bias32 = inputs(n=50)
    with fused_linear_relu(False):
        assert not takes_fused_path(x32, weight32, bias32)
    assert takes_fused_path(x32, weight32, bias32) == (_KERNEL is not None)  # switched back
    assert not takes_fused_path(x32, weight32, None)


def test_under_vmap_it_takes_the_plain_ops():
    x, weight, bias = (t.detach() for t in inputs(n=6))
    seen = []

    def one_row(row):
        seen.append(takes_fused_path(row[None], weight, bias))
        return linear_relu(row[None], weight, bias)[0]

    batched = torch.func.vmap(one_row)(x)
    assert seen == [False]
    torch.testing.assert_close(batched, by_formula(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_the_colored_mnist_mlp_features_match_its_featurizer():
    torch.manual_seed(0)
    model = MLP(hidden_dim=64)
    images = torch.rand(40, 2, 14, 14)
    features, logits = model(images)
    torch.testing.assert_close(features, model.featurizer(images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, model.head(model.featurizer(images)).squeeze(-1), rtol=1e-5, atol=1e-5)
    fused = torch.autograd.grad(logits.sum(), list(model.parameters()))
    plain = torch.autograd.grad(model.head(model.featurizer(images)).sum(), list(model.parameters()))
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

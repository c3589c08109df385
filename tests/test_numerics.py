"""Numerics of the penalty: half precision under autocast, second derivatives, torch.func
transforms, and the cost of the finiteness check."""

import pytest
import torch
from torch import nn

from fishr_lite.blocked import column_variances
from fishr_lite.grads import loop_grads
from fishr_lite.head_variance import linear_head_variances
from fishr_lite.penalty import fishr_penalty, reference_variance
from fishr_lite.training import FishrPenalty


def shifted_domains(n=512, d_in=20, d=32, seed=0):
    """Two domains whose features differ in scale, so that the penalty is far from zero."""
    torch.manual_seed(seed)
    featurizer = nn.Sequential(nn.Linear(d_in, d), nn.ReLU())
    head = nn.Linear(d, 3)
    xs = [torch.randn(n, d_in), 2.0 * torch.randn(n, d_in) + 0.5]
    ys = [torch.randint(0, 3, (n,)) for _ in xs]
    return featurizer, head, xs, ys


@pytest.mark.parametrize("engine", ["closed_form", "torch.func"])
@pytest.mark.parametrize("convention", ["domainbed", "colored_mnist"])
def test_bf16_autocast_penalty_within_one_percent_of_float32(engine, convention):
    featurizer, head, xs, ys = shifted_domains()
    fishr = lambda: FishrPenalty(head, loss="ce", engine=engine, convention=convention)  # noqa: E731
    exact = fishr().penalty([featurizer(x) for x in xs], ys)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = [featurizer(x) for x in xs]
        assert features[0].dtype == torch.bfloat16
        low = fishr().penalty(features, ys)
    assert low.dtype == torch.float32
    assert abs(low.item() / exact.item() - 1) < 0.01, (low.item(), exact.item())
    # the gradient still reaches the bf16 featurizer
    (grad,) = torch.autograd.grad(low, featurizer[0].weight)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bf16_variances_accumulate_in_float32():
    torch.manual_seed(1)
    g = 1.0 + 0.01 * torch.randn(4096, 8)  # mean 1, std 0.01: the variance hides below bf16's digits
    expected = reference_variance(g)
    got = column_variances(g.to(torch.bfloat16))
    assert got.dtype == torch.float32
    # bf16 storage of g costs ~0.4% per entry; a bf16 accumulation would lose everything
    torch.testing.assert_close(got, expected, rtol=0.3, atol=0)


def penalty_of_head_gradients(featurizer, head, xs, ys, fused):
    """A Fishr penalty through the fused closed form, or through the plain reference."""
    zs = [featurizer(x) for x in xs]
    if fused:
        variances = [linear_head_variances(head, z, y, "bce") for z, y in zip(zs, ys)]
    else:
        variances = [{k: reference_variance(g.reshape(len(g), -1)).reshape(g.shape[1:])
                      for k, g in loop_grads(head, z, y, loss="bce").items()} for z, y in zip(zs, ys)]
    flat = torch.stack([torch.cat([v[k].reshape(-1) for k in sorted(v)]) for v in variances])
    return (flat - flat.mean(0)).pow(2).sum()


def test_second_derivatives_through_the_fused_penalty():
    """A Hessian-vector product of the penalty w.r.t. the featurizer equals the plain one."""
    torch.manual_seed(2)
    featurizer = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()
    head = nn.Linear(4, 1).double()
    xs = [torch.randn(n, 3, dtype=torch.float64) for n in (5, 6)]
    ys = [torch.randint(0, 2, (len(x),)).double() for x in xs]
    params = list(featurizer.parameters())
    vector = [torch.randn_like(p) for p in params]
    products = []
    for fused in (True, False):
        penalty = penalty_of_head_gradients(featurizer, head, xs, ys, fused)
        grads = torch.autograd.grad(penalty, params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vector))
        products.append(torch.autograd.grad(dot, params))
    for a, b in zip(*products):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("engine", ["closed_form", "torch.func"])
def test_torch_func_grad_of_the_penalty_equals_autograd(engine):
    from torch.func import functional_call, grad

    torch.manual_seed(3)
    featurizer = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()
    head = nn.Linear(4, 1).double()
    xs = [torch.randn(n, 3, dtype=torch.float64) for n in (5, 6)]
    ys = [torch.randint(0, 2, (len(x),)).double() for x in xs]
    fishr = FishrPenalty(head, engine=engine, ema=0)
    params = dict(featurizer.named_parameters())

    def penalty(theta):
        return fishr.penalty([functional_call(featurizer, theta, (x,)) for x in xs], ys)

    by_func = grad(penalty)(params)
    by_autograd = torch.autograd.grad(penalty(params), list(params.values()))
    for name, want in zip(params, by_autograd):
        torch.testing.assert_close(by_func[name], want, rtol=1e-9, atol=1e-12)


def test_the_custom_functions_refuse_torch_func_with_a_clear_error():
    from torch.func import grad

    with pytest.raises(RuntimeError, match="reference_variance"):
        grad(lambda g: column_variances(g).sum())(torch.randn(4, 2))


def test_the_finiteness_check_synchronises_once_per_penalty(monkeypatch):
    """bool() / item() on a tensor is what waits for a device: count them."""
    calls = []
    for method in ("__bool__", "item"):
        original = getattr(torch.Tensor, method)

        def counted(self, _original=original, _name=method):
            calls.append(_name)
            return _original(self)

        monkeypatch.setattr(torch.Tensor, method, counted)
    grads = {"w": torch.randn(12, 3, 2), "b": torch.randn(12, 3), "c": torch.randn(12, 1)}
    fishr_penalty(grads, [4, 4, 4])
    assert len(calls) == 1, calls

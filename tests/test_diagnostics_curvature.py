"""fishr_lite.diagnostics moments, curvature, BackPACK diagonals and HVP estimators against plain
autograd (per-sample loops, torch.autograd.functional), float64 small models.

Tolerances: exact quantities 1e-10 (they agree to round-off); estimators at fixed seeds:
Monte-Carlo Fisher (K = 400 labels per sample) relative Frobenius error < 0.1, BackPACK
DiagGGNMC (200 samples) < 0.15, Hutchinson (1000 probes) within 3 standard errors
(computed from the exact Hessian) and diagonal < 0.1, Lanczos top-5 when the Krylov space is exhausted 1e-8 and top-3 after
20 < D steps 1e-6 relative, power iteration on a PSD Hessian 1e-5 relative.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fishr_lite import diagnostics as dx
from fishr_lite.diagnostics.functional import Network, flat_parameters, unflatten

EXACT = dict(rtol=1e-10, atol=1e-12)


def make_model(loss: str, head_kind: str = "linear", seed: int = 0):
    torch.manual_seed(seed)
    classes = 1 if loss == "bce" else 3
    featurizer = nn.Sequential(nn.Linear(4, 5), nn.Tanh()).double()
    if head_kind == "linear":
        head = nn.Linear(5, classes).double()
    else:
        head = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, classes)).double()
    domains = []
    for n in (20, 16):
        x = torch.randn(n, 4, dtype=torch.float64)
        y = torch.randint(0, 2, (n,)).double() if loss == "bce" else torch.randint(0, classes, (n,))
        domains.append((x, y))
    return featurizer, head, domains


def module_and_inputs(featurizer, head, x, params):
    if params == "all":
        return Network(featurizer, head), x
    with torch.no_grad():
        return head, featurizer(x)


def sample_loss(logits, target, loss):
    logits = logits.reshape(1, -1)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, target.reshape(1, -1).double(), reduction="sum")
    return F.cross_entropy(logits, target.reshape(1), reduction="sum")


def loop_gradients(module, inputs, targets, loss):
    """(n, D): one torch.autograd.grad call per sample."""
    params = [p for p in module.parameters()]
    rows = []
    for i in range(inputs.shape[0]):
        value = sample_loss(module(inputs[i : i + 1]), targets[i], loss)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)


def autograd_hessian(module, inputs, targets, loss):
    """torch.autograd.functional.hessian of the mean loss over the flat parameters."""

    def risk(flat):
        out = functional_call(module, unflatten(module, flat), (inputs,))
        return sum(sample_loss(out[i], targets[i], loss) for i in range(inputs.shape[0])) / inputs.shape[0]

    return torch.autograd.functional.hessian(risk, flat_parameters(module))


def loop_fisher(module, inputs, loss):
    """(1/n) sum_i sum_y p(y|x_i) g_i(y) g_i(y)^T, every label enumerated, per-sample loop."""
    with torch.no_grad():
        logits = module(inputs).reshape(inputs.shape[0], -1)
    total = 0
    for i in range(inputs.shape[0]):
        if loss == "bce":
            p1 = torch.sigmoid(logits[i, 0])
            labels = [(torch.tensor(0.0, dtype=torch.float64), 1 - p1), (torch.tensor(1.0, dtype=torch.float64), p1)]
        else:
            p = torch.softmax(logits[i], 0)
            labels = [(torch.tensor(c), p[c]) for c in range(logits.shape[1])]
        for label, prob in labels:
            g = loop_gradients(module, inputs[i : i + 1], label.reshape(1), loss)[0]
            total = total + prob * torch.outer(g, g)
    return total / inputs.shape[0]


def loop_ggn(module, inputs, targets, loss):
    """(1/n) sum_i J_i^T (d^2 l / ds^2) J_i with autograd.functional jacobian and hessian per sample."""
    theta = flat_parameters(module)
    total = 0
    for i in range(inputs.shape[0]):
        def out(flat, i=i):
            return functional_call(module, unflatten(module, flat), (inputs[i : i + 1],)).reshape(-1)

        jac = torch.autograd.functional.jacobian(out, theta)
        with torch.no_grad():
            s = out(theta)
        lam = torch.autograd.functional.hessian(lambda s: sample_loss(s, targets[i], loss), s)
        total = total + jac.T @ lam @ jac
    return total / inputs.shape[0]


def rel_error(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("params", ["head", "all"])
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_gradient_moments_match_loop(loss, params):
    featurizer, head, domains = make_model(loss)
    moments = dx.gradient_moments(featurizer, head, domains, loss=loss, params=params, full=True)
    assert len(moments) == 2
    for (x, y), m in zip(domains, moments):
        g = loop_gradients(*module_and_inputs(featurizer, head, x, params), y, loss)
        centered = g - g.mean(0)
        torch.testing.assert_close(m.mean, g.mean(0), **EXACT)
        torch.testing.assert_close(m.covariance, centered.T @ centered / len(g), **EXACT)
        torch.testing.assert_close(m.variance, centered.square().mean(0), **EXACT)
        assert m.n == len(g)


def test_moments_default_diagonal_for_all_and_names():
    featurizer, head, domains = make_model("bce")
    m = dx.gradient_moments(featurizer, head, domains, params="all")[0]
    names = dx.parameter_names(featurizer, head, "all")
    assert m.covariance is None and m.variance.shape == (len(names),)
    assert names[0] == "featurizer.0.weight[0, 0]" and names[-1] == "head.bias[0]"
    assert dx.parameter_names(featurizer, head)[:2] == ["head.weight[0, 0]", "head.weight[0, 1]"]


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("params", ["head", "all"])
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_empirical_fisher_matches_loop(loss, params, diagonal):
    featurizer, head, domains = make_model(loss)
    values = dx.empirical_fisher(featurizer, head, domains, loss=loss, params=params, diagonal=diagonal)
    for (x, y), value in zip(domains, values):
        g = loop_gradients(*module_and_inputs(featurizer, head, x, params), y, loss)
        expected = g.T @ g / len(g)
        torch.testing.assert_close(value, torch.diagonal(expected) if diagonal else expected, **EXACT)


@pytest.mark.parametrize("head_kind", ["linear", "mlp"])
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_exact_fisher_and_ggn_match_loops(loss, head_kind):
    featurizer, head, domains = make_model(loss, head_kind)
    fishers = dx.fisher(featurizer, head, domains, loss=loss)
    ggns = dx.ggn(featurizer, head, domains, loss=loss)
    diag = dx.fisher(featurizer, head, domains, loss=loss, diagonal=True)
    for (x, y), f, g, d in zip(domains, fishers, ggns, diag):
        module, inputs = module_and_inputs(featurizer, head, x, "head")
        torch.testing.assert_close(f, loop_fisher(module, inputs, loss), **EXACT)
        torch.testing.assert_close(g, loop_ggn(module, inputs, y, loss), **EXACT)
        torch.testing.assert_close(d, torch.diagonal(f), **EXACT)


def test_whole_network_fisher_diagonal_matches_loop():
    featurizer, head, domains = make_model("ce")
    (x, _), value = domains[0], dx.fisher(featurizer, head, domains[:1], loss="ce", params="all", diagonal=True)[0]
    expected = loop_fisher(Network(featurizer, head), x, "ce")
    torch.testing.assert_close(value, torch.diagonal(expected), **EXACT)


@pytest.mark.parametrize("params", ["head", "all"])
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_hessian_matches_autograd_functional(loss, params):
    featurizer, head, domains = make_model(loss, "mlp")
    values = dx.hessian(featurizer, head, domains, loss=loss, params=params)
    diagonals = dx.hessian(featurizer, head, domains, loss=loss, params=params, diagonal=True)
    for (x, y), h, d in zip(domains, values, diagonals):
        expected = autograd_hessian(*module_and_inputs(featurizer, head, x, params), y, loss)
        torch.testing.assert_close(h, expected, **EXACT)
        torch.testing.assert_close(d, torch.diagonal(expected), **EXACT)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_monte_carlo_fisher_close_to_exact(loss):
    featurizer, head, domains = make_model(loss)
    exact = dx.fisher(featurizer, head, domains, loss=loss)
    mc = dx.fisher(featurizer, head, domains, loss=loss, mc_samples=400, seed=0)
    again = dx.fisher(featurizer, head, domains, loss=loss, mc_samples=400, seed=0)
    for e, m, a in zip(exact, mc, again):
        assert rel_error(m, e) < 0.1
        torch.testing.assert_close(m, a, rtol=0, atol=0)  # seeded: reproducible
    one = dx.fisher(featurizer, head, domains, loss=loss, mc_samples=1, seed=0)
    assert rel_error(one[0], exact[0]) > rel_error(mc[0], exact[0])  # and it is an estimate


@pytest.mark.parametrize("params", ["head", "all"])
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_backpack_diagonals_match_exact(loss, params):
    featurizer, head, domains = make_model(loss)
    hessians = dx.hessian(featurizer, head, domains, loss=loss, params=params, diagonal=True)
    fishers = dx.fisher(featurizer, head, domains, loss=loss, params=params, diagonal=True)
    diag_h = dx.backpack_diagonal(featurizer, head, domains, "hessian", loss=loss, params=params)
    diag_ggn = dx.backpack_diagonal(featurizer, head, domains, "ggn", loss=loss, params=params)
    diag_mc = dx.backpack_diagonal(featurizer, head, domains, "ggn_mc", loss=loss, params=params, mc_samples=200)
    for h, f, bh, bg, bm in zip(hessians, fishers, diag_h, diag_ggn, diag_mc):
        torch.testing.assert_close(bh, h, **EXACT)
        torch.testing.assert_close(bg, f, **EXACT)
        assert rel_error(bm, f) < 0.15


def test_backpack_leaves_the_model_untouched():
    featurizer, head, domains = make_model("bce")
    before = [p.detach().clone() for p in featurizer.parameters()]
    dx.backpack_diagonal(featurizer, head, domains, "hessian")
    for module in list(featurizer.modules()) + list(head.modules()):
        assert not module._backward_hooks and not module._forward_hooks
    for p, b in zip(featurizer.parameters(), before):
        assert p.grad is None and not hasattr(p, "diag_h")
        torch.testing.assert_close(p, b, rtol=0, atol=0)


def test_backpack_unsupported_layer_names_it_and_the_alternative():
    _, _, domains = make_model("bce")
    featurizer = nn.Sequential(nn.Linear(4, 6), nn.GroupNorm(2, 6), nn.Tanh()).double()
    head = nn.Linear(6, 1).double()
    with pytest.raises(ValueError, match=r"featurizer\.1 \(GroupNorm\).*torch\.func"):
        dx.backpack_diagonal(featurizer, head, domains, "hessian")
    with pytest.raises(ValueError, match="GroupNorm"):
        dx.backpack_diagonal(featurizer, head, domains, "ggn_mc")
    # the alternatives named in the message work on this model
    assert dx.hessian(featurizer, head, domains)[0].shape == (7, 7)
    assert dx.hutchinson_diagonal(featurizer, head, domains, samples=2)[0].shape == (4 * 6 + 6 + 6 + 6 + 6 + 1,)
    # and head-only BackPACK is fine: the GroupNorm is in the (frozen) featurizer
    assert dx.backpack_diagonal(featurizer, head, domains, "hessian", params="head")[0].shape == (7,)


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_hutchinson_close_to_exact_diagonal_and_trace(loss):
    """Rademacher probes: Var[diag_d] = sum_{j != d} H_dj^2 / K, Var[trace] = 2 sum_{i != j} H_ij^2 / K;
    the seeded estimates must lie within 3 standard errors (and be reproducible)."""
    featurizer, head, domains = make_model(loss)
    exact = dx.hessian(featurizer, head, domains[:1], loss=loss, params="all")[0]
    samples = 1000
    off_diagonal = exact - torch.diag(torch.diagonal(exact))
    estimate = dx.hutchinson_diagonal(featurizer, head, domains[:1], loss=loss, samples=samples, seed=0)[0]
    assert torch.linalg.norm(estimate - torch.diagonal(exact)) < 3 * (off_diagonal.square().sum() / samples).sqrt()
    assert rel_error(estimate, torch.diagonal(exact)) < 0.1
    trace = dx.hutchinson_trace(featurizer, head, domains[:1], loss=loss, samples=samples, seed=0)[0]
    assert abs(trace - torch.trace(exact)) < 3 * (2 * off_diagonal.square().sum() / samples).sqrt()
    assert trace == dx.hutchinson_trace(featurizer, head, domains[:1], loss=loss, samples=samples, seed=0)[0]
    torch.testing.assert_close(trace, estimate.sum(), **EXACT)  # same probes


def test_hessian_vector_product_matches_matrix():
    featurizer, head, domains = make_model("ce", "mlp")
    (x, y) = domains[0]
    module = Network(featurizer, head)
    product, size = dx.hessian_vector_product(module, x, y, "ce")
    v = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(product(v), autograd_hessian(module, x, y, "ce") @ v, **EXACT)


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_top_eigenvalues_lanczos_and_power(loss):
    featurizer, head, domains = make_model(loss, "mlp")
    exact = [torch.linalg.eigvalsh(h) for h in dx.hessian(featurizer, head, domains, loss=loss, params="all")]
    size = exact[0].numel()
    full = dx.top_eigenvalues(featurizer, head, domains, loss=loss, k=5, iterations=size)
    few = dx.top_eigenvalues(featurizer, head, domains, loss=loss, k=3, iterations=20)
    for ev, lanczos_full, lanczos_few in zip(exact, full, few):
        torch.testing.assert_close(lanczos_full, ev.flip(0)[:5], rtol=1e-8, atol=1e-10)  # Krylov space exhausted
        torch.testing.assert_close(lanczos_few, ev.flip(0)[:3], rtol=1e-6, atol=1e-8)
    # head Hessian of a linear head is PSD: power iteration finds the largest eigenvalue
    torch.manual_seed(0)
    linear = nn.Linear(5, head[-1].out_features).double()
    head_exact = torch.linalg.eigvalsh(dx.hessian(featurizer, linear, domains[:1], loss=loss)[0])
    power = dx.top_eigenvalues(featurizer, linear, domains[:1], loss=loss, params="head", method="power", iterations=2000)[0]
    assert abs(float(power[0] / head_exact[-1]) - 1) < 1e-5


@pytest.mark.parametrize(
    "domains, message",
    [
        ([], "no domains"),
        ([(torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))], "empty"),
        ([(torch.zeros(3, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))], "3 inputs but 2 targets"),
        ((torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)), r"wrap one domain as \[\(x, y\)\]"),
    ],
)
def test_bad_domains_raise(domains, message):
    featurizer, head, _ = make_model("bce")
    for function in (dx.gradient_moments, dx.fisher, dx.hessian, dx.hutchinson_diagonal, dx.backpack_diagonal):
        with pytest.raises(ValueError, match=message):
            function(featurizer, head, domains)


def test_bad_options_raise():
    featurizer, head, domains = make_model("bce")
    with pytest.raises(ValueError, match="params='middle'"):
        dx.hessian(featurizer, head, domains, params="middle")
    with pytest.raises(ValueError, match="mc_samples=0"):
        dx.fisher(featurizer, head, domains, mc_samples=0)
    with pytest.raises(ValueError, match="method='lanczos' for k > 1"):
        dx.top_eigenvalues(featurizer, head, domains, k=2, method="power")
    with pytest.raises(ValueError, match="unknown curvature"):
        dx.curvature("fischer", featurizer, head, domains)
    wide = nn.Linear(5, 1000).double()  # 6000 parameters: no 6000 x 6000 matrix
    with pytest.raises(ValueError, match="diagonal=True"):
        dx.hessian(featurizer, wide, [(domains[0][0], torch.zeros(20, 1000, dtype=torch.float64))])

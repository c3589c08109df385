"""The head and its gradient variances in one pass (fishr_lite.fused_head), against per-sample
gradients from a plain autograd loop and the logits of head(z) (float64)."""

import pytest
import torch
from torch import nn

import fishr_lite.fused_head as fused_head
from fishr_lite.fused_head import _LinearHeadVariances, linear_head_with_variances
from fishr_lite.grads import loop_grads, summed_loss
from fishr_lite.objectives import DomainBatch, make_objective
from fishr_lite.penalty import reference_variance


def problem(loss, n=11, d=5, classes=3, bias=True, seed=0):
    torch.manual_seed(seed)
    featurizer = nn.Sequential(nn.Linear(4, d), nn.Tanh()).double()
    head = nn.Linear(d, 1 if loss == "bce" else classes, bias=bias).double()
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (n,)).double() if loss == "bce" else torch.randint(0, classes, (n,))
    return featurizer, head, x, y


@pytest.mark.parametrize("block", [2048, 3])  # one block, and several with a ragged last one
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_logits_variances_and_gradients_match_an_autograd_loop(monkeypatch, loss, centered, bias, block):
    monkeypatch.setattr(fused_head, "ROWS_PER_BLOCK", block)
    featurizer, head, x, y = problem(loss, bias=bias)
    z = featurizer(x)
    logits, got = linear_head_with_variances(head, z, y, loss, centered=centered)
    plain_logits = z @ head.weight.T + (head.bias if bias else 0.0)  # the formula, not head()
    want = {name: reference_variance(g.reshape(len(g), -1), centered).reshape(g.shape[1:])
            for name, g in loop_grads(head, z, y, loss=loss).items()}
    assert got.keys() == want.keys()
    torch.testing.assert_close(logits, plain_logits, rtol=1e-12, atol=1e-14)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-14)
    # a loss that uses the logits (the risk) and the variances (a random direction)
    weights = {k: torch.randn_like(v) for k, v in want.items()}
    params = list(featurizer.parameters()) + list(head.parameters())

    def total(scores, variances):
        return summed_loss(scores.reshape(-1) if loss == "bce" else scores, y, loss) / len(y) + sum(
            (weights[k] * variances[k]).sum() for k in variances)

    grads_got = torch.autograd.grad(total(logits, got), params, retain_graph=True)
    grads_want = torch.autograd.grad(total(plain_logits, want), params)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_passes_gradcheck_and_gradgradcheck(monkeypatch, loss):
    monkeypatch.setattr(fused_head, "ROWS_PER_BLOCK", 4)
    _, head, _, y = problem(loss, n=9)
    z = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    for centered in (True, False):
        def function(z, w, b):
            return _LinearHeadVariances.apply(z, w, b, y, loss, centered)
        inputs = (z, head.weight, head.bias)
        assert torch.autograd.gradcheck(function, inputs)
        assert torch.autograd.gradgradcheck(function, inputs)


@pytest.mark.parametrize("convention", ["colored_mnist", "domainbed"])
def test_objective_domain_batch_gives_the_same_penalty_and_gradients(convention):
    featurizer, head, x, y = problem("bce", n=20)
    domains = [(x[:9], y[:9]), (x[9:], y[9:])]
    params = list(featurizer.parameters()) + list(head.parameters())
    fused = make_objective("fishr", head, "bce", convention=convention)
    plain = make_objective("fishr", head, "bce", convention=convention)
    results = []
    for objective, fuse in ((fused, True), (plain, False)):
        for _ in range(2):  # two steps: the moving average of "domainbed" advances alike
            batches = [objective.domain_batch(featurizer(xe), ye) if fuse
                       else DomainBatch(featurizer(xe), head(featurizer(xe)).reshape(-1), ye)
                       for xe, ye in domains]
            assert all((b.head_variances is not None) == fuse for b in batches)
            loss = objective.risks(batches).mean() + 10.0 * objective.penalty(batches)
            grads = torch.autograd.grad(loss, params)
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-14)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_domain_batch_falls_back_where_no_fused_path_exists():
    featurizer, head, x, y = problem("bce")
    z = featurizer(x)
    for options in ({"engine": "torch.func"}, {"covariance": "full"}):
        batch = make_objective("fishr", head, "bce", **options).domain_batch(z, y)
        assert batch.head_variances is None and batch.logits.shape == (len(y),)
    assert make_objective("erm", head, "bce").domain_batch(z, y).head_variances is None
    deep_head = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    assert make_objective("fishr", deep_head, "bce").domain_batch(z, y).head_variances is None


def test_bad_input_raises_clear_errors():
    featurizer, head, x, y = problem("bce")
    z = featurizer(x)
    with pytest.raises(ValueError, match="nn.Linear"):
        linear_head_with_variances(nn.Sequential(head), z, y)
    with pytest.raises(ValueError, match="float32 or float64"):
        linear_head_with_variances(head.half(), z.half(), y)
    with pytest.raises(ValueError, match="one output"):
        linear_head_with_variances(nn.Linear(5, 2).double(), z, y, "bce")
    with pytest.raises(ValueError, match="one target per row"):
        linear_head_with_variances(head.double(), z, y[:-1])
    objective = make_objective("fishr", head.double(), "bce")
    with pytest.raises(ValueError, match="needs at least 2 per domain"):
        objective.fishr.logits_and_variances(z[:1], y[:1])

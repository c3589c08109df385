"""The head and its variances in one node, against a plain autograd loop over the samples."""

import contextlib

import pytest
import torch
from torch import nn

import fishr_lite.blocked as blocked
from fishr_lite.compiled_variance import compiled_closed_form
from fishr_lite.fused_head import fuse_head_and_variances, linear_head_with_variances, takes_fused_path
from fishr_lite.grads import loop_grads
from fishr_lite.penalty import reference_variance
from fishr_lite.training import FishrPenalty


def reference(head, z, y, loss, centered, create_graph=True):
    """The variances of per-sample gradients computed one sample at a time."""
    return {name: reference_variance(g.reshape(len(g), -1), centered).reshape(g.shape[1:])
            for name, g in loop_grads(head, z, y, loss=loss, create_graph=create_graph).items()}


def objective(scores, variances, weights):
    """A scalar using the scores (as a risk would) and every variance."""
    return scores.pow(2).sum() + sum((weights[k] * variances[k]).sum() for k in variances)


def test_taken_where_the_node_applies_and_not_elsewhere(head_problem):
    featurizer, head, x, y = head_problem("bce")
    z = featurizer(x)
    assert takes_fused_path(head, z)
    with compiled_closed_form():
        assert takes_fused_path(head, z)
    with fuse_head_and_variances(False):
        assert not takes_fused_path(head, z)
    assert not takes_fused_path(head, z.to(torch.bfloat16))
    assert not takes_fused_path(head.float(), z)  # parameters in another dtype
    head.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not takes_fused_path(head, z)
    handle = head.register_forward_hook(lambda module, args, out: None)
    assert not takes_fused_path(head, z)  # a hooked head runs as a module
    handle.remove()
    assert not takes_fused_path(nn.Sequential(head), z)


def test_outside_the_node_it_is_the_head_then_its_variances(head_problem):
    featurizer, head, x, y = head_problem("ce", bias=False)
    z = featurizer(x)
    with fuse_head_and_variances(False):
        scores, got = linear_head_with_variances(head, z, y, "ce", centered=False)
    torch.testing.assert_close(scores, head(z), rtol=0, atol=0)
    want = reference(head, z, y, "ce", centered=False)
    assert set(got) == set(want) == {"weight"}
    torch.testing.assert_close(got["weight"], want["weight"], rtol=1e-10, atol=1e-14)


def test_logits_and_penalty_match_the_penalty_of_the_heads_logits(head_problem):
    featurizer, head, x, y = head_problem("bce", n=20)
    fishr = FishrPenalty(head, convention="colored_mnist")
    z = featurizer(x)
    features, targets = [z[:9], z[9:]], [y[:9], y[9:]]
    logits, penalty = fishr.logits_and_penalty(features, targets)
    # up to rounding: the node sums a one-output head's row dot products in its own order
    for s, zz in zip(logits, features):
        torch.testing.assert_close(s, head(zz), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(penalty, fishr.penalty(features, targets, logits=logits), rtol=1e-12, atol=1e-18)
    with fuse_head_and_variances(False):  # the head, then the penalty of its logits: the same numbers
        logits, penalty = fishr.logits_and_penalty(features, targets)
    for s, zz in zip(logits, features):
        torch.testing.assert_close(s, head(zz), rtol=0, atol=0)
    torch.testing.assert_close(penalty, fishr.penalty(features, targets, logits=logits), rtol=0, atol=0)
    concatenated, _ = fishr.logits_and_penalty(z, y, domain_sizes=[9, 11])
    for s, zz in zip(concatenated, features):  # the head applied to each domain's rows
        torch.testing.assert_close(s, head(zz), rtol=1e-14, atol=1e-15)


# the blocked kernels in blocks of 4 rows (several blocks, a ragged last one) and in one
# block; the compiled kernels (slow: they compile for seconds)
KERNELS = [pytest.param("blocked", 4, id="blocked-4-rows"), pytest.param("blocked", 2048, id="blocked-one-block"),
           pytest.param("compiled", None, id="compiled", marks=pytest.mark.slow)]


@contextlib.contextmanager
def kernels(kind, rows, monkeypatch):
    """The node's kernels of ``kind``, blocks of ``rows`` rows for the blocked ones."""
    torch._dynamo.reset()
    if rows is not None:
        monkeypatch.setattr(blocked, "ROWS_PER_BLOCK", rows)
    with compiled_closed_form(kind == "compiled"):
        yield


@pytest.mark.parametrize("kind, rows", KERNELS)
@pytest.mark.parametrize("loss, centered, bias, n", [
    ("bce", True, True, 13), ("bce", True, True, 150),  # 150 rows: groups of 64 and a remainder
    ("bce", False, False, 13), ("ce", False, True, 13), ("ce", True, False, 200)])
def test_values_and_gradients_match_an_autograd_loop(head_problem, monkeypatch, kind, rows, loss, centered,
                                                     bias, n):
    featurizer, head, x, y = head_problem(loss, n=n, bias=bias)
    z = featurizer(x)
    params = list(featurizer.parameters()) + list(head.parameters())
    with kernels(kind, rows, monkeypatch):
        assert takes_fused_path(head, z)
        scores, got = linear_head_with_variances(head, z, y, loss, centered=centered)
        weights = {k: torch.randn_like(v) for k, v in got.items()}
        grads_got = torch.autograd.grad(objective(scores, got, weights), params, retain_graph=True)
    want = reference(head, z, y, loss, centered)
    assert set(got) == set(want)
    torch.testing.assert_close(scores, head(z), rtol=1e-14, atol=1e-15)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-14)
    grads_want = torch.autograd.grad(objective(head(z), want, weights), params)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind, rows", KERNELS)
def test_second_derivatives_match_an_autograd_loop(head_problem, monkeypatch, kind, rows):
    featurizer, head, x, y = head_problem("bce")
    z = featurizer(x)
    weights = {"weight": torch.randn(1, 5, dtype=torch.float64), "bias": torch.randn(1, dtype=torch.float64)}

    def curvature(scores, variances):
        (grad_z,) = torch.autograd.grad(objective(scores, variances, weights), z, create_graph=True,
                                        retain_graph=True)
        return torch.autograd.grad(grad_z.pow(2).sum(), list(head.parameters()))

    with kernels(kind, rows, monkeypatch):
        got = curvature(*linear_head_with_variances(head, z, y))
    want = curvature(head(z), reference(head, z, y, "bce", True))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("engine, compiled", [
    pytest.param("closed_form", True, marks=pytest.mark.slow), ("closed_form", False), ("backpack", False),
    ("torch.func", False)])
def test_a_training_step_through_logits_and_penalty_matches_an_autograd_loop(head_problem, engine, compiled):
    torch._dynamo.reset()
    featurizer, head, x, y = head_problem("bce", n=30)
    fishr = FishrPenalty(head, engine=engine, convention="colored_mnist")
    params = list(featurizer.parameters()) + list(head.parameters())

    def loss(logits, penalty):
        risk = sum(nn.functional.binary_cross_entropy_with_logits(s.squeeze(-1), t) for s, t in zip(logits, ys))
        return risk + 1e3 * penalty

    z = featurizer(x)
    features, ys = [z[:14], z[14:]], [y[:14], y[14:]]
    with compiled_closed_form(compiled):
        logits, penalty = fishr.logits_and_penalty(features, ys)
        got = torch.autograd.grad(loss(logits, penalty), params, retain_graph=True)
    per_domain = [reference(head, f, t, "bce", True) for f, t in zip(features, ys)]
    flat = torch.stack([torch.cat([v["weight"].reshape(-1), v["bias"]]) for v in per_domain])
    want_penalty = (flat - flat.mean(dim=0)).pow(2).sum()  # the colored_mnist convention: sums
    want_logits = [head(f) for f in features]
    want = torch.autograd.grad(loss(want_logits, want_penalty), params)
    for a, b in zip(logits, want_logits):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(penalty, want_penalty, rtol=1e-10, atol=1e-15)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_cross_entropy_on_one_output_is_refused(fused):
    """With one output the softmax is constant: the penalty would be zero without a word.
    ``logits_and_penalty`` takes the node (fused) or the head then the variances."""
    head, z = nn.Linear(3, 1), torch.randn(8, 3)
    assert takes_fused_path(head, z)
    fishr, targets = FishrPenalty(head, loss="ce"), [torch.zeros(4, dtype=torch.long)] * 2
    with fuse_head_and_variances(fused):
        with pytest.raises(ValueError, match="use loss 'bce'"):
            fishr.logits_and_penalty([z[:4], z[4:]], targets)
        with pytest.raises(ValueError, match="use loss 'bce'"):
            fishr.penalty([z[:4], z[4:]], targets)


def test_closed_form_refuses_features_that_are_not_one_row_per_sample():
    """A Linear head on (n, k, d) features sums k terms per sample, which the closed form
    does not model: each entry point says so instead of failing inside a kernel."""
    from fishr_lite.grads import per_sample_grads
    from fishr_lite.head_variance import linear_head_variances

    head, z, y = nn.Linear(3, 1), torch.randn(4, 2, 3), torch.zeros(4)
    calls = [lambda: linear_head_with_variances(head, z, y),
             lambda: linear_head_variances(head, z, y),
             lambda: per_sample_grads(head, z, y, engine="closed_form"),
             lambda: FishrPenalty(head).penalty([z, z], [y, y])]
    for call in calls:
        with pytest.raises(ValueError, match=r"needs \(n, d\) features.*got shape \(4, 2, 3\)"):
            call()

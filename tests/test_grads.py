"""Per-sample gradient engines against a per-sample autograd loop (float64)."""

import pytest
import torch
from torch import nn

from fishr_lite.grads import loop_grads, per_sample_grads

HEAD_ENGINES = ["closed_form", "backpack", "torch.func"]


class CountBackward(torch.autograd.Function):
    """Identity whose backward counts how often autograd went through it."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        CountBackward.calls += 1
        return grad


def assert_close_dict(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", HEAD_ENGINES)
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_head_engines_match_loop(head_problem, engine, loss):
    featurizer, head, x, y = head_problem(loss)
    features = featurizer(x)
    expected = loop_grads(head, features, y, loss=loss)
    grads = per_sample_grads(head, features, y, loss=loss, engine=engine)
    assert_close_dict(grads, expected)
    assert all(g.requires_grad for g in grads.values())  # create_graph kept


def test_closed_form_uses_given_logits(head_problem):
    featurizer, head, x, y = head_problem("bce")
    features = featurizer(x)
    logits = head(features).squeeze(-1)
    grads = per_sample_grads(head, features, y, loss="bce", logits=logits)
    assert_close_dict(grads, loop_grads(head, features, y, loss="bce"))


def test_torch_func_whole_mlp_matches_loop():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    grads = per_sample_grads(model, x, y, loss="ce", engine="torch.func")
    assert_close_dict(grads, loop_grads(model, x, y, loss="ce"))


@pytest.mark.slow
def test_torch_func_small_convnet_matches_loop():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double()
    x, y = torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    grads = per_sample_grads(model, x, y, loss="ce", engine="torch.func")
    assert_close_dict(grads, loop_grads(model, x, y, loss="ce"))


@pytest.mark.parametrize("engine", HEAD_ENGINES)
def test_engine_does_not_backpropagate_through_featurizer(head_problem, engine):
    featurizer, head, x, y = head_problem("bce")
    features = CountBackward.apply(featurizer(x))
    CountBackward.calls = 0
    grads = per_sample_grads(head, features, y, loss="bce", engine=engine)
    assert CountBackward.calls == 0  # the extra pass stopped at the features
    assert all(p.grad is None for p in list(featurizer.parameters()) + list(head.parameters()))
    assert not any(hasattr(p, "grad_batch") for p in head.parameters())  # nothing stale
    # ... while the per-sample gradients still reach the featurizer:
    penalty = sum(g.pow(2).sum() for g in grads.values())
    weight_grad = torch.autograd.grad(penalty, featurizer[0].weight)[0]
    assert CountBackward.calls == 1 and weight_grad.abs().sum() > 0


def test_backpack_leaves_user_head_untouched_and_torch_func_still_works(head_problem):
    featurizer, head, x, y = head_problem("ce")
    features = featurizer(x)
    per_sample_grads(head, features, y, loss="ce", engine="backpack")
    assert not getattr(head, "_backpack_extend", False)
    assert not head._forward_hooks and not head._backward_hooks
    grads = per_sample_grads(head, features, y, loss="ce", engine="torch.func")
    assert_close_dict(grads, loop_grads(head, features, y, loss="ce"))


def test_backpack_follows_parameter_updates(head_problem):
    featurizer, head, x, y = head_problem("bce")
    features = featurizer(x).detach()
    per_sample_grads(head, features, y, loss="bce", engine="backpack")
    with torch.no_grad():
        head.weight.mul_(-2.0)  # in-place update, as an optimizer does
    grads = per_sample_grads(head, features, y, loss="bce", engine="backpack")
    assert_close_dict(grads, loop_grads(head, features, y, loss="bce"))


def test_functorch_is_an_alias_of_torch_func(head_problem):
    featurizer, head, x, y = head_problem("ce")
    features = featurizer(x)
    assert_close_dict(per_sample_grads(head, features, y, loss="ce", engine="functorch"),
                      per_sample_grads(head, features, y, loss="ce", engine="torch.func"))


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_backpack_on_a_two_layer_head_matches_loop_with_featurizer_gradient(head_problem, loss):
    featurizer, _, x, y = head_problem(loss, d=4)
    head = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1 if loss == "bce" else 3)).double()
    features = featurizer(x)
    grads = per_sample_grads(head, features, y, loss=loss, engine="backpack")
    expected = loop_grads(head, features, y, loss=loss)
    assert_close_dict(grads, expected)
    # differentiable w.r.t. the featurizer, as the penalty needs
    direction = {k: torch.randn_like(v) for k, v in expected.items()}
    score = lambda g: sum((direction[k] * g[k]).sum() for k in g)  # noqa: E731
    got = torch.autograd.grad(score(grads), list(featurizer.parameters()), retain_graph=True)
    want = torch.autograd.grad(score(expected), list(featurizer.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"engine": "nope"}, "unknown engine"),
        ({"loss": "mse"}, "unknown loss"),
    ],
)
def test_bad_arguments_raise(head_problem, kwargs, match):
    featurizer, head, x, y = head_problem("bce")
    with pytest.raises(ValueError, match=match):
        per_sample_grads(head, featurizer(x), y, **kwargs)


def test_closed_form_rejects_non_linear_head(head_problem):
    featurizer, head, x, y = head_problem("bce")
    with pytest.raises(ValueError, match="nn.Linear"):
        per_sample_grads(nn.Sequential(head), featurizer(x), y, engine="closed_form")


def test_mismatched_targets_raise(head_problem):
    featurizer, head, x, y = head_problem("bce")
    with pytest.raises(ValueError, match="targets"):
        per_sample_grads(head, featurizer(x), y[:-1])


@pytest.mark.parametrize("engine", ["closed_form", "backpack", "torch.func"])
def test_cross_entropy_needs_two_classes_and_class_indices(engine):
    """One output under softmax has zero loss and zero gradients: every engine refuses it
    (and float targets) instead of returning an all-zero penalty."""
    torch.manual_seed(0)
    z = torch.randn(6, 3)
    with pytest.raises(ValueError, match="C >= 2 classes.*use loss 'bce'"):
        per_sample_grads(nn.Linear(3, 1), z, torch.zeros(6, dtype=torch.long), loss="ce", engine=engine)
    with pytest.raises(ValueError, match="integer class index"):
        per_sample_grads(nn.Linear(3, 2), z, torch.zeros(6), loss="ce", engine=engine)

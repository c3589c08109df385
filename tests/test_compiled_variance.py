"""The closed form's compiled kernels against per-sample gradients from a plain autograd loop."""

import pytest
import torch

from fishr_lite import compiled_variance
from fishr_lite.compiled_variance import compiled_closed_form, takes_compiled_path
from fishr_lite.grads import loop_grads
from fishr_lite.head_variance import linear_head_variances
from fishr_lite.penalty import reference_variance

pytestmark = pytest.mark.slow  # each case compiles its kernels (seconds)


@pytest.mark.parametrize("loss, centered, n", [("bce", True, 13), ("ce", False, 13), ("bce", False, 150)])
def test_values_and_gradients_match_an_autograd_loop(head_problem, loss, centered, n):
    featurizer, head, x, y = head_problem(loss, n=n)
    z = featurizer(x)
    assert takes_compiled_path(z, z) is False  # off by default
    with compiled_closed_form():
        assert takes_compiled_path(z, z)
        got = linear_head_variances(head, z, y, loss, centered=centered)
        weights = {k: torch.randn_like(v) for k, v in got.items()}
        params = list(featurizer.parameters()) + list(head.parameters())
        grads_got = torch.autograd.grad(sum((weights[k] * got[k]).sum() for k in got), params,
                                        retain_graph=True)
    want = {name: reference_variance(g.reshape(len(g), -1), centered).reshape(g.shape[1:])
            for name, g in loop_grads(head, z, y, loss=loss).items()}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-14)
    grads_want = torch.autograd.grad(sum((weights[k] * want[k]).sum() for k in want), params)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_half_precision_and_create_graph_keep_the_eager_path(head_problem):
    z16 = torch.randn(6, 3, dtype=torch.bfloat16)
    with compiled_closed_form():
        assert not takes_compiled_path(z16.float(), z16)
        featurizer, head, x, y = head_problem("bce")
        z = featurizer(x)
        v = linear_head_variances(head, z, y)["weight"]
        (grad_z,) = torch.autograd.grad(v.sum(), z, create_graph=True)  # differentiable again
        (second,) = torch.autograd.grad(grad_z.pow(2).sum(), head.weight)
    assert torch.isfinite(second).all()


def test_a_kernel_that_cannot_be_built_says_what_to_do(head_problem, monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed

    def cannot_build(*args):
        inner = RuntimeError("no C++ compiler found")
        try:
            failure = BackendCompilerFailed(lambda: None, inner, None)
        except TypeError:  # older torch (2.2) takes no first_useful_frame
            failure = BackendCompilerFailed(lambda: None, inner)
        raise failure

    monkeypatch.setattr(compiled_variance, "compiled", lambda name: cannot_build)
    featurizer, head, x, y = head_problem("bce")
    with compiled_closed_form(), pytest.raises(RuntimeError, match=r"C\+\+ compiler.*g\+\+"):
        linear_head_variances(head, featurizer(x), y)

"""Column variances in row blocks against the plain reference of fishr_lite.penalty (float64)."""

import pytest
import torch

import fishr_lite.blocked as blocked
from fishr_lite.blocked import column_variances, row_blocks, rows_per_block
from fishr_lite.penalty import reference_variance


@pytest.mark.parametrize("block", [2048, 3])  # one block, and several with a ragged last one
@pytest.mark.parametrize("centered", [True, False])
def test_values_and_gradient_match_the_reference(monkeypatch, centered, block):
    monkeypatch.setattr(blocked, "ROWS_PER_BLOCK", block)
    torch.manual_seed(0)
    g = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    got = column_variances(g, centered)
    want = reference_variance(g, centered)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    direction = torch.randn(5, dtype=torch.float64)
    (grad_got,) = torch.autograd.grad((direction * got).sum(), g)
    (grad_want,) = torch.autograd.grad((direction * want).sum(), g)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-12, atol=1e-15)


def test_passes_gradcheck(monkeypatch):
    monkeypatch.setattr(blocked, "ROWS_PER_BLOCK", 4)
    g = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    for centered in (True, False):
        assert torch.autograd.gradcheck(lambda g: column_variances(g, centered), (g,))
        assert torch.autograd.gradgradcheck(lambda g: column_variances(g, centered), (g,))


def test_row_blocks_cover_the_rows_once():
    assert row_blocks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert row_blocks(10, 10) == [(0, 10)]
    assert row_blocks(0, 1) == []


def test_blocks_fit_a_cpu_cache_and_a_gpu_block_takes_many_rows():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # a device name: no GPU needed
    assert rows_per_block(25_000, cpu, 390) == blocked.ROWS_PER_BLOCK
    assert rows_per_block(13, cpu, 390) == 13
    assert rows_per_block(25_000, gpu, 390) == 25_000  # a Colored MNIST domain: one block
    assert rows_per_block(25_000, gpu, 10 * 390) == blocked.GPU_BLOCK_NUMEL // 3900 < 25_000
    assert rows_per_block(0, gpu, 390) == 1


def test_rejects_a_tensor_that_is_not_a_matrix():
    with pytest.raises(ValueError, match=r"\(n, D\) matrix.*reshape"):
        column_variances(torch.randn(4, 2, 3))

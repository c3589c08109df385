"""Fixtures shared by the test modules."""

import pytest
import torch
from torch import nn


def _head_problem(loss: str, n: int = 13, d: int = 5, classes: int = 3, bias: bool = True, seed: int = 0):
    """(featurizer, head, x, y) in float64: a Linear(4, d) + Tanh featurizer, a linear head
    (one output for ``loss="bce"``, ``classes`` for ``"ce"``), n inputs and their targets."""
    torch.manual_seed(seed)
    featurizer = nn.Sequential(nn.Linear(4, d), nn.Tanh()).double()
    head = nn.Linear(d, 1 if loss == "bce" else classes, bias=bias).double()
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (n,)).double() if loss == "bce" else torch.randint(0, classes, (n,))
    return featurizer, head, x, y


@pytest.fixture
def head_problem():
    """A small float64 problem for a linear head: ``head_problem(loss, n=13, ...)``."""
    return _head_problem

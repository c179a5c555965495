import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def orth64(out: int, r: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64))[0]


def ref_project(w: torch.Tensor, q: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    """Float64 reference of W - s·QQᵀW, building QQᵀ explicitly (the thing the code must not do)."""
    w64 = w.to(torch.float64).reshape(w.shape[0], -1)
    q64 = q.to(torch.float64)
    p = q64 @ q64.T
    return (w64 - s * p @ w64).reshape(w.shape)

"""Float64 references shared by the para_core tests."""
import torch


def orth64(out: int, r: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64))[0]


def ref_project(w: torch.Tensor, q: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    """Float64 reference of W - s·QQᵀW, building QQᵀ explicitly (the thing the code must not do)."""
    w64 = w.to(torch.float64).reshape(w.shape[0], -1)
    q64 = q.to(torch.float64)
    p = q64 @ q64.T
    return (w64 - s * p @ w64).reshape(w.shape)

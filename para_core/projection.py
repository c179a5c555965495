"""W <- W - s·Q(QᵀW): the PaRa edit of one weight.

Works for linear (out x in) and conv (out x in x kh x kw) weights, any storage dtype, any device.
The math runs in float32 (or float64 when asked); the out x out matrix QQᵀ is never built.
"""
from __future__ import annotations

import torch

from .errors import ParaShapeError


def _check_fit(weight: torch.Tensor, q: torch.Tensor, what: str) -> None:
    if weight.ndim < 2:
        raise ParaShapeError(f"{what}: PaRa needs a weight with at least 2 dims, got shape {tuple(weight.shape)}")
    if q.ndim != 2 or q.shape[0] != weight.shape[0]:
        raise ParaShapeError(f"{what}: basis of shape {tuple(q.shape)} does not fit weight of shape "
                             f"{tuple(weight.shape)} (basis rows must equal the weight's output dim {weight.shape[0]})")


def projection_delta(weight: torch.Tensor, q: torch.Tensor, strength: float = 1.0,
                     compute_dtype: torch.dtype = torch.float32, what: str = "weight") -> torch.Tensor:
    """ΔW = -s·Q(QᵀW) in compute_dtype, shaped like weight."""
    _check_fit(weight, q, what)
    w = weight.to(compute_dtype).reshape(weight.shape[0], -1)
    qc = q.to(device=weight.device, dtype=compute_dtype)
    return torch.mm(qc, torch.mm(qc.T, w)).mul_(-strength).reshape(weight.shape)


def project_out_(weight: torch.Tensor, q: torch.Tensor, strength: float = 1.0,
                 compute_dtype: torch.dtype = torch.float32, what: str = "weight") -> torch.Tensor:
    """In place: weight -= s·Q(QᵀW). Returns weight.

    For a contiguous weight already in compute_dtype this is one r x in GEMM plus one fused
    addmm into the weight's own memory (no out x in temporary).
    """
    _check_fit(weight, q, what)
    if strength == 0:
        return weight
    qc = q.to(device=weight.device, dtype=compute_dtype)
    if weight.dtype == compute_dtype and weight.is_contiguous():
        w = weight.view(weight.shape[0], -1)
        w.addmm_(qc, torch.mm(qc.T, w), alpha=-strength)
        return weight
    w = weight.to(compute_dtype).reshape(weight.shape[0], -1)
    w.addmm_(qc, torch.mm(qc.T, w), alpha=-strength)
    weight.copy_(w.reshape(weight.shape))
    return weight


def project_out(weight: torch.Tensor, q: torch.Tensor, strength: float = 1.0,
                compute_dtype: torch.dtype = torch.float32, what: str = "weight") -> torch.Tensor:
    """Out of place: a new tensor (weight's dtype and device) = W - s·Q(QᵀW)."""
    _check_fit(weight, q, what)
    w = weight.to(compute_dtype, copy=True).contiguous()
    project_out_(w, q, strength, compute_dtype, what)
    return w.to(weight.dtype)


def apply_stages_(weight: torch.Tensor, stages: list[torch.Tensor], strength: float = 1.0,
                  compute_dtype: torch.dtype = torch.float32, what: str = "weight") -> torch.Tensor:
    """Apply an ordered chain of projections in place (a sequential merge): W_k = W_{k-1} - s·Q_kQ_kᵀW_{k-1}.

    The whole chain runs in compute_dtype and is cast back once at the end.
    """
    for q in stages:
        _check_fit(weight, q, what)
    if weight.dtype == compute_dtype and weight.is_contiguous():
        for q in stages:
            project_out_(weight, q, strength, compute_dtype, what)
        return weight
    w = weight.to(compute_dtype).contiguous()
    for q in stages:
        project_out_(w, q, strength, compute_dtype, what)
    weight.copy_(w)
    return weight

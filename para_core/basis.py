"""Orthonormal bases of the learned matrix B (out x r).

PaRa removes span(B) from a weight's output space. Everything downstream works with an
orthonormal Q of that span, computed once, in float32 (float64 where asked), and sign-fixed
so that the same B always gives bit-identical Q.
"""
from __future__ import annotations

import torch

from .errors import ParaRankError, ParaShapeError


def _check_matrix(b: torch.Tensor, what: str) -> None:
    if b.ndim != 2:
        raise ParaShapeError(f"{what}: expected a 2-D (out x r) matrix, got shape {tuple(b.shape)}")
    out, r = b.shape
    if r == 0 or out == 0:
        raise ParaShapeError(f"{what}: empty basis, shape {tuple(b.shape)}")
    if r > out:
        raise ParaShapeError(f"{what}: rank r={r} exceeds the output dimension out={out} (shape {tuple(b.shape)})")
    if not torch.isfinite(b).all():
        raise ParaRankError(f"{what}: contains NaN or Inf values")


def rank_tolerance(shape: tuple[int, int], dtype: torch.dtype) -> float:
    """Relative threshold below which a diagonal entry of R (or a singular value) counts as zero."""
    return max(shape) * torch.finfo(dtype).eps * 10.0


def _qr_sign_fixed(b: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q with diag(R) > 0, diag(R)) for one matrix or a batch (..., out, r)."""
    with torch.autocast(device_type=b.device.type, enabled=False):
        q, r = torch.linalg.qr(b.to(dtype), mode="reduced")
        d = torch.diagonal(r, dim1=-2, dim2=-1)
        sign = torch.where(d < 0, -1.0, 1.0).to(q.dtype).detach()
        return q * sign.unsqueeze(-2), d


def _check_rank(d: torch.Tensor, shape, dtype: torch.dtype, what: str) -> None:
    scale = d.abs().max()
    if not torch.isfinite(scale) or scale == 0 or (d.abs() <= rank_tolerance(shape, dtype) * scale).any():
        raise ParaRankError(f"{what}: B of shape {tuple(shape)} is rank deficient (|diag R| min/max = "
                            f"{float(d.abs().min()):.3e}/{float(scale):.3e})")


def orthonormal_basis(b: torch.Tensor, dtype: torch.dtype = torch.float32, what: str = "basis") -> torch.Tensor:
    """Q with orthonormal columns and span(Q) = span(B); deterministic signs (diag(R) > 0).

    Raises ParaRankError for rank-deficient or non-finite B rather than returning NaNs.
    The computation is differentiable (used by the trainer) and ignores autocast.
    """
    _check_matrix(b, what)
    q, d = _qr_sign_fixed(b, dtype)
    _check_rank(d, b.shape, dtype, what)
    return q


def orthonormal_bases(bs: list[torch.Tensor], whats: list[str], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """orthonormal_basis for many matrices, one batched QR per shape (a file has hundreds of small
    tall-skinny matrices; one LAPACK call each is slow when the CPU's threads are contended).
    The result is bit-identical to calling orthonormal_basis on each."""
    for b, what in zip(bs, whats):
        _check_matrix(b, what)
    out: list[torch.Tensor | None] = [None] * len(bs)
    groups: dict[tuple, list[int]] = {}
    for i, b in enumerate(bs):
        groups.setdefault((tuple(b.shape), b.device), []).append(i)
    for (shape, _dev), idx in groups.items():
        if len(idx) == 1:
            out[idx[0]] = orthonormal_basis(bs[idx[0]], dtype, whats[idx[0]])
            continue
        q, d = _qr_sign_fixed(torch.stack([bs[i].to(dtype) for i in idx]), dtype)
        for j, i in enumerate(idx):
            _check_rank(d[j], shape, dtype, whats[i])
            out[i] = q[j].contiguous()
    return out


def orthonormality_error(q: torch.Tensor) -> float:
    """max |QᵀQ - I| in float64: how far a stored basis is from orthonormal."""
    q64 = q.to(torch.float64)
    eye = torch.eye(q64.shape[1], dtype=torch.float64, device=q64.device)
    return float((q64.T @ q64 - eye).abs().max())


def span_union(bases: list[torch.Tensor], dtype: torch.dtype = torch.float32, rtol: float = 1e-2) -> torch.Tensor:
    """Orthonormal basis of span(Q1 ∪ Q2 ∪ ...), independent of the order of the inputs.

    Shared directions are counted once: singular values of [Q1 Q2 ...] below rtol·s_max are dropped.
    For two bases a direction at principal angle θ gives the singular value √(1 - cos θ) ≈ θ/√2, so with
    the default rtol = 1e-2 directions less than about 1.1° apart (fp16 storage noise is ~0.06°) count as
    one, and anything further apart is kept. Columns are ordered by singular value and sign-fixed
    (largest-magnitude entry positive).
    """
    m = torch.cat([q.to(dtype) for q in bases], dim=1)
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    keep = s > rtol * s.max()
    u = u[:, keep]
    idx = u.abs().argmax(dim=0)
    sign = torch.sign(u[idx, torch.arange(u.shape[1], device=u.device)])
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign


def principal_angle_cosines(q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(Q1) and span(Q2), descending, in float64."""
    return torch.linalg.svdvals(q1.to(torch.float64).T @ q2.to(torch.float64)).clamp(0.0, 1.0)

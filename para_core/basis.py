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


def rank_margins(d: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """min|diag R| / (tolerance · max|diag R|) per matrix (d: (..., r)), as a device tensor: > 1 means full
    rank and finite; 0 for a B with NaN/Inf or all zeros. Computed without a host synchronisation."""
    a = d.detach().abs()
    scale = a.amax(dim=-1)
    margin = a.amin(dim=-1) / (rank_tolerance(shape, dtype) * scale)
    ok = torch.isfinite(a).all(dim=-1) & (scale > 0)
    return torch.where(ok, torch.nan_to_num(margin, nan=0.0, posinf=0.0), torch.zeros_like(margin))


def _check_rank(d: torch.Tensor, shape, dtype: torch.dtype, what: str) -> None:
    if not bool(rank_margins(d, shape, dtype) > 1):
        a = d.detach().abs()
        raise ParaRankError(f"{what}: B of shape {tuple(shape)} is rank deficient or not finite (|diag R| min/max = "
                            f"{float(a.min()):.3e}/{float(a.max()):.3e})")


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
    The result is bit-identical to calling orthonormal_basis on each. Strict: checks every matrix now
    (one host synchronisation per matrix); the trainer uses `orthonormal_bases_deferred`."""
    for b, what in zip(bs, whats):
        _check_matrix(b, what)
    qs, margins = orthonormal_bases_deferred(bs, dtype)
    bad = [i for i, m in enumerate(margins.tolist()) if not m > 1]
    if bad:
        i = bad[0]
        _check_rank(_qr_sign_fixed(bs[i], dtype)[1], bs[i].shape, dtype, whats[i])
    return qs


def orthonormal_bases_deferred(bs: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(Q per matrix, rank margins (len(bs),) on the device) with no host synchronisation.

    Same Q as `orthonormal_bases` (bit-identical), but nothing is checked: a rank-deficient or non-finite B gives
    a margin <= 1 (`rank_margins`), which the caller validates later with `raise_if_degenerate` - every N
    steps and before anything is saved - so a GPU never waits for the host inside a training step. Shapes
    must already be valid (out >= r >= 1), which is checked once when the layers are built.
    """
    out: list[torch.Tensor | None] = [None] * len(bs)
    per: list[torch.Tensor | None] = [None] * len(bs)
    groups: dict[tuple, list[int]] = {}
    for i, b in enumerate(bs):
        groups.setdefault((tuple(b.shape), b.device), []).append(i)
    for (shape, _dev), idx in groups.items():
        if len(idx) == 1:
            q, d = _qr_sign_fixed(bs[idx[0]], dtype)
            out[idx[0]], per[idx[0]] = q, rank_margins(d, shape, dtype)
        else:
            q, d = _qr_sign_fixed(torch.stack([bs[i].to(dtype) for i in idx]), dtype)
            # one copy of the batch and one unbind: per-matrix select + contiguous would give backward one
            # SelectBackward per matrix, each zero-filling and adding a gradient of the whole batch's size
            for i, qi, mi in zip(idx, q.contiguous().unbind(0), rank_margins(d, shape, dtype).unbind(0)):
                out[i], per[i] = qi, mi
    if not bs:
        return [], torch.zeros(0)
    # views stacked in input order: no index tensor is copied to the device (that copy would synchronise)
    return out, torch.stack([m.to(per[0].device) for m in per])


def raise_if_degenerate(margins: torch.Tensor, whats: list[str], shapes: list[tuple[int, ...]]) -> None:
    """Raise ParaRankError naming the first matrix whose margin (from `orthonormal_bases_deferred`, possibly the
    running minimum over several steps) says it was rank deficient or not finite. One host synchronisation."""
    bad = (~(margins > 1)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise ParaRankError(f"{whats[i]}: B of shape {tuple(shapes[i])} became rank deficient or not finite during "
                            f"training (rank margin {float(margins[i]):.3e} <= 1; {len(bad)} matrices affected)")


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

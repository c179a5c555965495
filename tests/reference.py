"""The float64 references every test compares against: the pure tests, the integration tests and their harness
all import this one module, so a reference is written once.

The formulas are deliberately not the code's: the projector QQᵀ is built as a matrix, in float64.
"""
from __future__ import annotations

import torch

F64 = torch.float64


def orth64(b: torch.Tensor) -> torch.Tensor:
    """Q of B = QR in float64 with diag(R) > 0: the unique orthonormal basis the PaRa format defines.

    The projector QQᵀ does not depend on the choice, but PaRa + LoRA `product` mode does.
    """
    q, r = torch.linalg.qr(b.to(F64))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)


def random_orth64(out: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """A random out x r orthonormal basis in float64 (Q of a Gaussian matrix drawn from `generator`)."""
    return torch.linalg.qr(torch.randn(out, r, generator=generator, dtype=F64))[0]


def _q64(b: torch.Tensor) -> torch.Tensor:
    """The orthonormal basis a reference projects with: a float32/float64 Q whose columns are orthonormal to its
    own precision is taken as it is (the code under test is handed that same Q; orthonormalising it again would
    move the reference by the Q's rounding, ~1e-7 for float32, which fp32 tolerances are not meant to absorb);
    any other B (a raw B, or a Q rounded to 16 or 8 bits) is orthonormalised with orth64."""
    b64 = b.to(F64)
    if b.dtype in (torch.float32, torch.float64):
        err = (b64.T @ b64 - torch.eye(b.shape[1], dtype=F64)).abs().max()
        if err <= 8 * b.shape[0] ** 0.5 * torch.finfo(b.dtype).eps:
            return b64
    return orth64(b)


def projector64(b: torch.Tensor) -> torch.Tensor:
    """QQᵀ (out x out, float64), the orthogonal projector onto span(B), built as a matrix."""
    q = _q64(b)
    return q @ q.T


def project64(w: torch.Tensor, bases: list[torch.Tensor], strength: float = 1.0) -> torch.Tensor:
    """The sequential chain W_k = W_{k-1} - s·Q_kQ_kᵀW_{k-1} for each B_k (or Q_k) in order, in float64, shaped
    like w (a conv weight is flattened over all but its output dimension)."""
    cur = w.to(F64).reshape(w.shape[0], -1)
    for b in bases:
        cur = cur - strength * (projector64(b) @ cur)
    return cur.reshape(w.shape)


def parallel64(w: torch.Tensor, bases: list[torch.Tensor], strength: float = 1.0) -> torch.Tensor:
    """W - s·Σ_k Q_kQ_kᵀW: every stage projected from the same W, which is what a sequential chain must NOT
    equal when the subspaces overlap (tests use it to show that the order of the stages matters)."""
    w64 = w.to(F64).reshape(w.shape[0], -1)
    return (w64 - strength * sum(projector64(b) @ w64 for b in bases)).reshape(w.shape)


def union64(bases: list[torch.Tensor]) -> torch.Tensor:
    """Orthonormal basis of span(B_1 ∪ B_2 ∪ ...) in float64."""
    u, s, _ = torch.linalg.svd(torch.cat([orth64(b) for b in bases], 1), full_matrices=False)
    return u[:, s > 1e-10 * s.max()]


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |x| (float64): the gap between the two representable neighbours of x."""
    fi = torch.finfo(dtype)
    mant = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23,
            torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}[dtype]
    ax = x.to(F64).abs().clamp_min(fi.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(ax)) - mant)


def assert_rel_close(actual: torch.Tensor, ref64: torch.Tensor, what: str, rel: float = 2e-6):
    """max |actual - ref64| <= rel · max |ref64|; the default is one fp32 computation's rounding, the bound the
    patched-weight tests use."""
    scale = float(ref64.abs().max())
    err = float((actual.to(F64) - ref64).abs().max())
    assert err <= rel * scale, f"{what}: max error {err:.3e} vs scale {scale:.3e}"


def ref_project(w: torch.Tensor, q: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    """project64(w, [q], s): the name tests written before this module use."""
    return project64(w, [q], s)

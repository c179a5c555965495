"""PaRa combined with a LoRA on the same weight.

With W = W0 + BA (a LoRA whose alpha/rank scale is folded into B) and Q the PaRa basis:

* ``product`` — the formula literally: ΔW = (-α1 Q + α2 B)(α1 QᵀW0 + α2 A). Needs rank(Q) = rank(B).
  It contains cross terms -α1α2 QA + α1α2 BQᵀW0 that neither model has alone.
* ``stacked`` — its block form [-α1 Q | α2 B]·[α1 QᵀW0 ; α2 A] = -α1² QQᵀW0 + α2² BA, for any ranks.
  At α1 = α2 = 1 this is exactly "PaRa first, then LoRA": W0 - QQᵀW0 + BA, the order the paper found
  to work (LoRA first, then PaRa, would project the LoRA's update away as well).

Both return factors (U, D) with ΔW = U @ D, so the delta is never stored at full size.
"""
from __future__ import annotations

import torch

from .errors import ParaShapeError

COMBINE_MODES = ("stacked", "product")


def combine_factors(q: torch.Tensor, w0: torch.Tensor, lora_up: torch.Tensor, lora_down: torch.Tensor,
                    alpha_para: float = 1.0, alpha_lora: float = 1.0, mode: str = "stacked",
                    compute_dtype: torch.dtype = torch.float32, what: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(U, D), U: out x k, D: k x (in·kh·kw), with ΔW = U @ D as defined by `mode`."""
    out = w0.shape[0]
    w = w0.to(compute_dtype).reshape(out, -1)
    qc = q.to(device=w.device, dtype=compute_dtype)
    up = lora_up.to(device=w.device, dtype=compute_dtype).reshape(lora_up.shape[0], -1)
    down = lora_down.to(device=w.device, dtype=compute_dtype).reshape(lora_down.shape[0], -1)
    if qc.shape[0] != out or up.shape[0] != out:
        raise ParaShapeError(f"{what}: PaRa basis {tuple(q.shape)} / LoRA up {tuple(lora_up.shape)} do not fit weight {tuple(w0.shape)}")
    if down.shape[1] != w.shape[1] or up.shape[1] != down.shape[0]:
        raise ParaShapeError(f"{what}: LoRA down {tuple(lora_down.shape)} / up {tuple(lora_up.shape)} do not fit weight {tuple(w0.shape)}")
    qtw = qc.T @ w
    if mode == "product":
        if qc.shape[1] != up.shape[1]:
            raise ParaShapeError(f"{what}: mode 'product' needs equal ranks, PaRa has r={qc.shape[1]} and the LoRA r={up.shape[1]}; "
                                 "use mode 'stacked' for different ranks")
        return -alpha_para * qc + alpha_lora * up, alpha_para * qtw + alpha_lora * down
    if mode == "stacked":
        return (torch.cat([-alpha_para * qc, alpha_lora * up], dim=1),
                torch.cat([alpha_para * qtw, alpha_lora * down], dim=0))
    raise ValueError(f"unknown combine mode '{mode}' (expected one of {', '.join(COMBINE_MODES)})")


def combine_delta(q, w0, lora_up, lora_down, alpha_para=1.0, alpha_lora=1.0, mode="stacked",
                  compute_dtype=torch.float32, what="weight") -> torch.Tensor:
    """ΔW shaped like w0 (in compute_dtype)."""
    u, d = combine_factors(q, w0, lora_up, lora_down, alpha_para, alpha_lora, mode, compute_dtype, what)
    return (u @ d).reshape(w0.shape)

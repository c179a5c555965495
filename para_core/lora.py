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


def chain_factors(stages: list[torch.Tensor], w0: torch.Tensor, up_scale: float = 1.0, down_scale: float = 1.0,
                  compute_dtype: torch.dtype = torch.float32, what: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(U, D) of a PaRa chain as a low-rank update: W_k = W_{k-1} - (a·b)·Q_k Q_kᵀ W_{k-1} for each stage.

    U = [-a·Q_1 | ... | -a·Q_k], D = [b·Q_1ᵀW_0 ; ... ; b·Q_kᵀW_{k-1}], so W0 + U@D is the whole chain
    (a = up_scale, b = down_scale). Rank r_1 + ... + r_k.
    """
    w = w0.to(compute_dtype).reshape(w0.shape[0], -1).clone()
    ups, downs = [], []
    for q in stages:
        qc = q.to(device=w.device, dtype=compute_dtype)
        if qc.shape[0] != w.shape[0]:
            raise ParaShapeError(f"{what}: PaRa basis {tuple(q.shape)} does not fit weight {tuple(w0.shape)}")
        d = qc.T @ w
        ups.append(-up_scale * qc)
        downs.append(down_scale * d)
        w.addmm_(qc, d, alpha=-up_scale * down_scale)
    return torch.cat(ups, 1), torch.cat(downs, 0)


def combine_factors(q: torch.Tensor | list[torch.Tensor], w0: torch.Tensor | None, lora_up: torch.Tensor | None,
                    lora_down: torch.Tensor | None, alpha_para: float = 1.0, alpha_lora: float = 1.0,
                    mode: str = "stacked", compute_dtype: torch.dtype = torch.float32,
                    what: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(U, D), U: out x k, D: k x (in·kh·kw), with ΔW = U @ D as defined by `mode`.

    The one implementation of PaRa + LoRA (the CLI, the API and the PaRa + LoRA node all call it).
    `q` may be a list of stages (a sequential merge): `stacked` then applies the chain with strength
    α1² per stage before adding α2²·BA; `product` needs a single basis. With no LoRA on this weight
    (lora_up None) both modes reduce to the PaRa term -α1²·QQᵀW0; with no PaRa stages (q an empty
    list; w0 may then be None) both reduce to the LoRA term α2²·BA.
    """
    if mode not in COMBINE_MODES:
        raise ValueError(f"unknown combine mode '{mode}' (expected one of {', '.join(COMBINE_MODES)})")
    stages = list(q) if isinstance(q, (list, tuple)) else [q]
    if lora_up is not None:
        device = w0.device if w0 is not None else lora_up.device
        up = lora_up.to(device=device, dtype=compute_dtype).reshape(lora_up.shape[0], -1)
        down = lora_down.to(device=device, dtype=compute_dtype).reshape(lora_down.shape[0], -1)
        if up.shape[1] != down.shape[0] or (w0 is not None and (up.shape[0] != w0.shape[0] or down.shape[1] != w0[0].numel())):
            raise ParaShapeError(f"{what}: LoRA up {tuple(lora_up.shape)} / down {tuple(lora_down.shape)} do not fit weight "
                                 f"{tuple(w0.shape) if w0 is not None else '(unknown)'}")
        if not stages:
            return alpha_lora * up, alpha_lora * down
    elif not stages:
        raise ValueError(f"{what}: neither PaRa stages nor a LoRA to combine")
    out = w0.shape[0]
    if mode == "product" and lora_up is not None:
        if len(stages) != 1:
            raise ParaShapeError(f"{what}: mode 'product' needs a single PaRa basis, this PaRa is a sequential merge of "
                                 f"{len(stages)} stages; use mode 'stacked' or merge with mode 'union'")
        qc = stages[0].to(device=w0.device, dtype=compute_dtype)
        if qc.shape[0] != out:
            raise ParaShapeError(f"{what}: PaRa basis {tuple(qc.shape)} does not fit weight {tuple(w0.shape)}")
        if qc.shape[1] != up.shape[1]:
            raise ParaShapeError(f"{what}: mode 'product' needs equal ranks, PaRa has r={qc.shape[1]} and the LoRA r={up.shape[1]}; "
                                 "use mode 'stacked' for different ranks")
        qtw = qc.T @ w0.to(compute_dtype).reshape(out, -1)
        return -alpha_para * qc + alpha_lora * up, alpha_para * qtw + alpha_lora * down
    ups, downs = chain_factors(stages, w0, alpha_para, alpha_para, compute_dtype, what)
    if lora_up is None:
        return ups, downs
    return torch.cat([ups, alpha_lora * up], dim=1), torch.cat([downs, alpha_lora * down], dim=0)


def combine_delta(q, w0, lora_up, lora_down, alpha_para=1.0, alpha_lora=1.0, mode="stacked",
                  compute_dtype=torch.float32, what="weight") -> torch.Tensor:
    """ΔW shaped like w0 (in compute_dtype)."""
    u, d = combine_factors(q, w0, lora_up, lora_down, alpha_para, alpha_lora, mode, compute_dtype, what)
    return (u @ d).reshape(w0.shape)

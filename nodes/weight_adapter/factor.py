"""A fixed low-rank update as a ComfyUI weight adapter: W <- W + s·U@D (PaRa + LoRA).

U and D come from para_core.lora.combine_factors, computed once from the true base weight W0 when the
node runs, so the update does not depend on what other patches did to the running weight.
"""
from __future__ import annotations

import torch

from .base import PackAdapter, add_rounding_once_, float32_on


class FactorAdapter(PackAdapter):
    """weights = (U, D): out x k and k x in·kh·kw, float32."""

    name = "para_lora"

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor) -> "FactorAdapter":
        return cls(set(), (up.detach().to(torch.float32).contiguous(), down.detach().to(torch.float32).contiguous()))

    def apply_(self, weight, strength, function, key):
        up, down = float32_on(self.weights, weight.device)
        diff = torch.mm(up, down).reshape(weight.shape)
        if strength != 1:
            diff.mul_(strength)
        add_rounding_once_(weight, function(diff))

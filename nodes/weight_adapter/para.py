"""PaRa as a ComfyUI weight adapter: W <- W - s·Q_k(Q_kᵀW) for each stage k, on the *running* weight.

ComfyUI applies every patch of a key in the order it was added (`comfy.lora.calculate_weight`), each one
seeing the weight the earlier ones produced: two Load PaRa in a row are the paper's sequential merge, and a
LoRA loaded after them is "PaRa first, then LoRA". The math runs in float32 whatever the storage dtype
(fp16 on CUDA, bf16 under low VRAM) and rounds once, in place: on an offset (fused qkv) patch ComfyUI passes
a narrowed view and discards the returned tensor. Q is orthonormal when the adapter is made (no QR per call:
the low-VRAM path recomputes patches on every forward).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ...para_core.projection import apply_stages_
from .base import PackAdapter, add_rounding_once_, float32_on


class ParaAdapter(PackAdapter):
    """weights = (Q_1, ..., Q_k): the stages of a sequential chain (one for an ordinary PaRa file), each out x r."""

    name = "para"

    @classmethod
    def from_stages(cls, stages: Sequence[torch.Tensor]) -> "ParaAdapter":
        return cls(set(), tuple(q.detach().to(torch.float32).contiguous() for q in stages))

    def apply_(self, weight, strength, function, key):
        out = weight.shape[0]
        stages = float32_on(self.weights, weight.device)
        fw = function(weight)
        if fw is weight:  # identity `function` (every core call site but one): edit the weight itself
            if weight.dtype == torch.float32 and weight.is_contiguous():
                apply_stages_(weight.view(out, -1), stages, strength, what=str(key))  # no out x in temporary
            else:  # fp16/bf16: upcast once, all stages in fp32, round once
                w = weight.reshape(out, -1).to(torch.float32, copy=True)
                apply_stages_(w, stages, strength, what=str(key))
                weight.copy_(w.reshape(weight.shape))
            return
        # A real `function` maps between the file's row layout and the model's (Flux norm_out's scale/shift
        # swap, an involution): project in the file's layout, map the diff back, add it (ComfyUI's pattern).
        w = fw.reshape(out, -1).to(torch.float32, copy=True)
        apply_stages_(w, stages, strength, what=str(key))
        w.sub_(fw.reshape(out, -1))
        add_rounding_once_(weight, function(w.reshape(weight.shape)))

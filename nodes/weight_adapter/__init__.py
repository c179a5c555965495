"""The pack's ComfyUI weight adapters, one small file per algorithm (as ComfyUI's comfy/weight_adapter/).

* `ParaAdapter` (para.py): W <- W - s·Q_k(Q_kᵀW) per stage, on the running weight (Load/Apply/Hook PaRa).
* `FactorAdapter` (factor.py): W <- W + s·U@D, fixed factors (PaRa + LoRA).

Both keep ComfyUI's adapter contract: constructible as `cls(loaded_keys, weights)` with every tensor they use
inside `weights`, which ComfyUI's dynamic-VRAM path relies on (`comfy.lora.prefetch_prepared_value` rebuilds
an adapter that way around tensors it moved into a VRAM buffer; the tensors may still be in flight then, so
constructors only store them). Neither is added to ComfyUI's adapter registry: that would make the stock
LoRA loader try to parse PaRa files.
"""
from .factor import FactorAdapter
from .para import ParaAdapter

ADAPTERS = (ParaAdapter, FactorAdapter)

__all__ = ["ADAPTERS", "FactorAdapter", "ParaAdapter"]

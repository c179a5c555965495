"""What the pack reads of ComfyUI's own LoRA machinery (PaRa + LoRA): a model's true base weight W0 and a LoRA
file's factors. This is the one place that reaches into core internals: `ModelPatcher.get_key_patches` and the
`weights` tuple of `comfy.weight_adapter.lora.LoRAAdapter` (up, down, alpha, mid, dora_scale, reshape).
"""
from __future__ import annotations

import torch

from ..para_core.errors import ParaError
from .keys import key_name, split_target


def base_weights(patcher, targets) -> dict:
    """The true W0 of each target, float32 (the backup if the model is currently patched), sliced for offsets.

    Mirrors ModelPatcher.patch_weight_to_device: copy to the compute dtype, then the layer's convert
    function (dequantizes mixed-precision fp8 layers).
    """
    entries = patcher.get_key_patches() if targets else {}
    out = {}
    for t in targets:
        key, offset, fn = split_target(t)
        w, convert = entries[key][0]
        w = convert(w.to(torch.float32, copy=True), inplace=True).to(torch.float32)
        if offset is not None:
            w = w.narrow(*offset)
        out[t] = fn(w) if fn is not None else w  # in the file's row layout, like the LoRA factors
    return out


def read_lora(lora_sd: dict[str, torch.Tensor], unet_map: dict, te_map: dict, source: str):
    """LoRA factors per add_patches target via ComfyUI's own parser: {target: (up·alpha/rank, down)}.

    Returns (factors, unread file keys). Anything that is not a plain LoRA (LoHa, LoKr, diff, DoRA,
    LoCon mid) raises ParaError: their update is not B@A, so the PaRa+LoRA formula does not apply.
    """
    import comfy.lora
    import comfy.lora_convert
    key_map = {**unet_map, **te_map}
    lora_sd = comfy.lora_convert.convert_lora(lora_sd)
    loaded = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
    from comfy.weight_adapter.lora import LoRAAdapter
    factors = {}
    used: set[str] = set()
    bad = []
    for target, adapter in loaded.items():
        if not isinstance(adapter, LoRAAdapter):
            kind = getattr(adapter, "name", None) or (adapter[0] if isinstance(adapter, tuple) and isinstance(adapter[0], str) else "diff")
            bad.append(f"{key_name(target)} ({kind})")
            continue
        up, down, alpha, mid, dora, reshape = adapter.weights
        if mid is not None or dora is not None or reshape is not None:
            what = "a LoCon mid weight" if mid is not None else "DoRA scale" if dora is not None else "a reshape"
            bad.append(f"{key_name(target)} ({what})")
            continue
        rank = down.shape[0]
        scale = (float(alpha) / rank) if alpha is not None else 1.0
        factors[target] = (up.to(torch.float32) * scale, down.to(torch.float32))
        used |= adapter.loaded_keys
    if bad:
        raise ParaError(f"{source}: {len(bad)} layers are not plain LoRA (B@A) layers, which PaRa + LoRA needs "
                        f"(first: {', '.join(bad[:3])})")
    if not factors:
        raise ParaError(f"{source}: no LoRA layer of this file matches the model")
    return factors, sorted(k for k in lora_sd if k not in used and not k.endswith(".alpha"))

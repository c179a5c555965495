"""Where each module of a PaRa file goes in a ComfyUI model: ComfyUI's own LoRA key maps, per patcher.

Module names are matched through `comfy.lora.model_lora_keys_unet` / `model_lora_keys_clip`, so files with
ComfyUI-native, kohya (`lora_unet_...`) or diffusers/PEFT names load on every model family ComfyUI loads.
A key-map value is 'key', ('key', offset) for a slice of a fused weight (qkv), or ('key', offset, function)
where `function` maps the file's row layout to the model's (Flux's scale/shift swap).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

import comfy.lora

from ..para_core import blocks
from ..para_core.errors import ParaError
from ..para_core.families import family_of
from ..para_core.format import MatchReport, ParaModel, match_modules

_DIFFUSERS_ATTN = (".to_q", ".to_k", ".to_v", ".to_out.0")
TEXT_ENCODER_PREFIXES = ("text_encoders.", "text_encoder.", "text_encoder_2.", "lora_te")


def key_maps(model, clip) -> tuple[dict, dict]:
    """ComfyUI's own LoRA key maps ({file name: model key or (key, offset)}), one per patcher.

    Always a fresh dict: both comfy functions have a mutable default argument.
    """
    unet = comfy.lora.model_lora_keys_unet(model.model, {}) if model is not None else {}
    te = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
    return unet, te


def _lookup(key_map: Mapping, module: str):
    hit = key_map.get(module)
    if hit is None and module.endswith(_DIFFUSERS_ATTN):
        # diffusers/PEFT files name attention projections `attn2.to_k`; ComfyUI maps only `attn2.processor.to_k`
        for suffix in _DIFFUSERS_ATTN:
            if module.endswith(suffix):
                alt = module[: -len(suffix)] + ".processor" + (".to_out" if suffix == ".to_out.0" else suffix)
                hit = key_map.get(alt)
                break
    return hit


def split_target(target) -> tuple[str, tuple[int, int, int] | None, Callable | None]:
    """(key, offset, function) of a key-map value: 'k', ('k', offset) or ('k', offset, function)."""
    if isinstance(target, str):
        return target, None, None
    return target[0], target[1], (target[2] if len(target) > 2 else None)


def target_rows(target, shapes: Mapping[str, torch.Size]) -> int:
    """Output rows a basis must have for this add_patches target (offset length for a fused slice)."""
    key, offset, _fn = split_target(target)
    shape = shapes[key]
    if len(shape) < 2:
        return 0  # 1-D weights (norms) cannot take a PaRa
    if offset is None:
        return int(shape[0])
    dim, _start, length = offset
    return int(length) if dim == 0 else 0


def _weight_shapes(patcher) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in patcher.model.state_dict().items()} if patcher is not None else {}


class Resolution:
    """Where each module of a PaRa file goes: in the diffusion model, in the text encoder, or nowhere."""

    def __init__(self, para: ParaModel, model, clip):
        self.unet_map, self.te_map = unet_map, te_map = key_maps(model, clip)
        self.unet_shapes = _weight_shapes(model)
        self.family = family_of(model) if model is not None else None  # None: blocks found from the names
        self.te_shapes = _weight_shapes(clip.patcher if clip is not None else None)
        self.side: dict[str, str] = {}

        def resolve(module: str):
            for side, kmap, shapes in (("model", unet_map, self.unet_shapes), ("clip", te_map, self.te_shapes)):
                target = _lookup(kmap, module)
                if target is None:
                    continue
                key = split_target(target)[0]
                if key not in shapes or not key.endswith(".weight"):
                    continue
                self.side[module] = side
                return target, target_rows(target, shapes)
            return None

        self.report: MatchReport = match_modules(para, resolve)
        seen: dict = {}
        for module, target in self.report.matched.items():
            if target in seen:  # e.g. a native and a kohya name for one layer: which one wins would be arbitrary
                raise ParaError(f"{para.source}: modules '{seen[target]}' and '{module}' both name the layer "
                                f"{key_name(target)}; keep one of them")
            seen[target] = module
        self.clip_missing = clip is None and any(m.startswith(TEXT_ENCODER_PREFIXES) for m in self.report.unmatched)

    def targets(self, side: str) -> dict[str, object]:
        return {m: t for m, t in self.report.matched.items() if self.side.get(m) == side}


    def raise_if_bad(self, para: ParaModel) -> None:
        """One ParaError if the file does not fit the model (nothing matched, shapes differ, CLIP missing)."""
        if not self.report.matched and not self.report.mismatched and self.clip_missing:
            raise ParaError(f"{para.source}: has text-encoder layers only ({len(self.report.unmatched)}); connect the CLIP input")
        self.report.raise_if_bad()


def key_name(target) -> str:
    key, offset, _fn = split_target(target)
    return key if offset is None else f"{key}[{offset[1]}:{offset[1] + offset[2]}]"


def block_multipliers(res: Resolution, block_strength: str) -> dict[str, float]:
    """{model weight key: multiplier} from a block-strength spec (para_core.blocks), checked against every
    module of the diffusion model. Empty spec: {} (every layer at 1)."""
    if not (block_strength or "").strip():
        return {}
    modules = [k[: -len(".weight")] for k, shape in res.unet_shapes.items() if k.endswith(".weight") and len(shape) >= 2]
    per_module = blocks.resolve(block_strength, modules, res.family)
    return {f"{m}.weight": v for m, v in per_module.items()}



"""Patch orchestration: a PaRa (or PaRa + LoRA) becomes ComfyUI weight patches on clones of the model and CLIP.

PaRa enters as `ParaAdapter` / `FactorAdapter` instances passed to `ModelPatcher.add_patches`, the same
mechanism as ComfyUI's LoRA loader: baked into the weights when the model loads (or per forward for offloaded
layers), undone bit-exactly when it unloads, no cost per sampling step. `bypass.py` holds the other way in:
an output projection that never touches the weight.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..para_core import blocks
from ..para_core.errors import ParaError
from ..para_core.format import ParaModel
from ..para_core.lora import combine_factors
from .bypass import add_bypass, entries_from_patches, unavailable_reason
from .core_lora import base_weights, read_lora
from .keys import Resolution, block_multipliers, key_name, split_target, target_rows
from .model_caches import fresh_caches_per_sampling
from .ui_text import describe
from .weight_adapter import FactorAdapter, ParaAdapter


def grouped_patches(para: ParaModel, res: Resolution, side: str, strength: float,
                    multipliers: Mapping[str, float] | None = None) -> dict[float, dict]:
    """{strength: {target: ParaAdapter}} for one side: the side's strength times each layer's block
    multiplier; layers at strength 0 are left out (bit-identical to not patching them)."""
    groups: dict[float, dict] = {}
    for module, target in res.targets(side).items():
        s = strength * (multipliers or {}).get(split_target(target)[0], 1.0)
        if s != 0:
            groups.setdefault(s, {})[target] = ParaAdapter.from_stages(para.stages[module])
    return groups


def apply_para(para: ParaModel, model, clip, strength_model: float, strength_clip: float, block_strength: str = "",
               bypass: bool = False):
    """Clone model/clip and add one ParaAdapter per matched weight (one add_patches call per strength), or with
    `bypass` the same PaRa as output projections that leave every weight untouched (bypass.py).

    `block_strength` (para_core.blocks) scales strength_model per block of the diffusion model.
    Returns (model, clip, status text). A file that does not fit raises ParaError with one message.
    """
    if bypass and unavailable_reason():
        raise ParaError(unavailable_reason())
    res = Resolution(para, model, clip)
    res.raise_if_bad(para)
    mult = block_multipliers(res, block_strength)
    new_model, new_clip = model, clip
    counts = {}
    for side, strength in (("model", strength_model), ("clip", strength_clip)):
        if side == "clip" and clip is None:
            continue
        groups = grouped_patches(para, res, side, strength, mult if side == "model" else None)
        if not groups:
            counts[side] = 0
            continue
        clone = model.clone() if side == "model" else clip.clone()
        added = 0
        if bypass:
            entries = entries_from_patches(groups)
            add_bypass(clone if side == "model" else clone.patcher, entries)
            groups = {}
            added = len(entries)
        for s, patches in groups.items():
            n = len(clone.add_patches(patches, s))
            if n != len(patches):  # cannot happen: targets come from the patcher's own state dict
                raise ParaError(f"{para.source}: ComfyUI accepted {n} of {len(patches)} patches")
            added += n
        counts[side] = added
        if side == "model":
            fresh_caches_per_sampling(clone)
            new_model = clone
        else:
            new_clip = clone
    notes = ["text-encoder layers skipped: no CLIP connected"] if res.clip_missing else []
    if strength_model == 0 or (clip is not None and strength_clip == 0):
        notes.append("strength 0 leaves that side unchanged")
    if mult:
        notes.append(f"block strength: {blocks.describe(mult, res.family) or 'all 1'}")
    if bypass:
        notes.append("bypass: weights untouched, each layer's output projected")
    return new_model, new_clip, describe(res.report, counts, "; ".join(notes))


def apply_para_lora(para: ParaModel, lora_sd: dict[str, torch.Tensor], lora_source: str, model, clip,
                    alpha_para: float, alpha_lora: float, mode: str):
    """Clone model/clip and add one FactorAdapter per weight touched by the PaRa or the LoRA."""
    res = Resolution(para, model, clip)
    res.raise_if_bad(para)
    factors, unread = read_lora(lora_sd, res.unet_map, res.te_map, lora_source)
    para_by_target = {t: m for m, t in res.report.matched.items()}
    shapes = {**res.unet_shapes, **res.te_shapes}
    for target, (up, _down) in factors.items():
        rows = target_rows(target, shapes)
        if up.shape[0] != rows:
            raise ParaError(f"{lora_source}: LoRA layer {key_name(target)} has {up.shape[0]} output rows, the model weight {rows}")
    counts: dict[str, int] = {}
    stats = {"both": 0, "para": 0, "lora": 0}
    new_model, new_clip = model, clip
    for side, patcher, kshapes in (("model", model, res.unet_shapes), ("clip", clip, res.te_shapes)):
        if patcher is None:
            continue
        base = patcher if side == "model" else patcher.patcher
        mine = [t for t in {*para_by_target, *factors} if split_target(t)[0] in kshapes]
        w0s = base_weights(base, [t for t in mine if t in para_by_target])
        patches = {}
        for target in sorted(mine, key=key_name):
            module = para_by_target.get(target)
            stages = para.stages[module] if module is not None else []
            up, down = factors.get(target, (None, None))
            u, d = combine_factors(stages, w0s.get(target), up, down, alpha_para, alpha_lora, mode,
                                   what=f"{para.source} + {lora_source}: {key_name(target)}")
            patches[target] = FactorAdapter.from_factors(u, d)
            stats["both" if stages and up is not None else "para" if stages else "lora"] += 1
        if not patches:
            counts[side] = 0
            continue
        clone = patcher.clone()
        added = clone.add_patches(patches, 1.0)
        counts[side] = len(added)
        if side == "model":
            fresh_caches_per_sampling(clone)
            new_model = clone
        else:
            new_clip = clone
    note = (f"{stats['both']} with PaRa and LoRA, {stats['para']} PaRa only, {stats['lora']} LoRA only; mode {mode}, "
            f"alpha_para {alpha_para:g}, alpha_lora {alpha_lora:g}")
    if unread:
        note += f"; {len(unread)} LoRA keys not used (first: {', '.join(unread[:3])})"
    if res.clip_missing:
        note += "; text-encoder layers skipped: no CLIP connected"
    return new_model, new_clip, describe(res.report, counts, note)

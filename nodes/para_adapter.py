"""How PaRa enters a ComfyUI model: weight adapters handed to `ModelPatcher.add_patches`.

ComfyUI applies every patch of a key in the order it was added (`comfy.lora.calculate_weight`), each one
seeing the weight the earlier ones produced, and dispatches on `isinstance(v, WeightAdapterBase)`. So:

* `ParaAdapter` edits the *running* weight, W <- W - s·Q(QᵀW) for each stage of the chain. Two loaders
  in a row are the paper's sequential merge, and a LoRA loaded after it is "PaRa first, then LoRA".
* `FactorAdapter` adds a fixed ΔW = U@D computed at node time from the true base weight W0 (PaRa + LoRA).

Both edit `weight` in place and compute in float32 whatever the storage dtype, rounding once to it, because on an offset
(fused qkv) patch ComfyUI passes a narrowed view and throws the returned tensor away, and because on
CUDA the weight arrives in fp16. Their tensors are prepared once (Q orthonormal at load time, no QR per
call: LowVram recomputes patches on every forward). Instances are shared between model clones, so
they are never mutated after construction. Neither is added to ComfyUI's adapter registry: that
would make the stock LoRA loader try to parse PaRa files.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

import comfy.lora
import comfy.model_management
import comfy.weight_adapter

from ..para_core import blocks
from ..para_core.errors import ParaError
from ..para_core.format import MatchReport, ParaModel, match_modules
from ..para_core.lora import combine_factors
from ..para_core.projection import apply_stages_

log = logging.getLogger(__name__)

_DIFFUSERS_ATTN = (".to_q", ".to_k", ".to_v", ".to_out.0")
TEXT_ENCODER_PREFIXES = ("text_encoders.", "text_encoder.", "text_encoder_2.", "lora_te")


def _add_(weight: torch.Tensor, diff: torch.Tensor) -> None:
    """weight += diff (float32) in place, rounding once to the weight's dtype.

    `weight += diff.half()` would round the diff first: PaRa's diff can nearly cancel the weight
    (a component removed entirely), and then the diff's own rounding error is many ulps of the result.
    """
    if weight.dtype == torch.float32:
        weight += diff
    else:
        weight.copy_(weight.to(torch.float32).add_(diff))


class ParaAdapter(comfy.weight_adapter.WeightAdapterBase):
    """W <- W - s·Q_k(Q_kᵀW) for each stage k in order (one stage for an ordinary PaRa file)."""

    name = "para"

    def __init__(self, stages: list[torch.Tensor] | tuple[torch.Tensor, ...]):
        self.loaded_keys: set[str] = set()
        self.weights = tuple(q.detach().to(torch.float32).contiguous() for q in stages)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        if strength == 0:
            return weight
        try:
            with torch.no_grad():  # a patch is never differentiated; Q may be an inference tensor (made in a node)
                self._apply(weight, float(strength), function, key)
        except Exception as e:  # ComfyUI's convention: a broken patch logs and leaves the weight alone
            logging.error("ERROR %s %s %s", self.name, key, e)
        return weight

    def _apply(self, weight, strength, function, key):
        out = weight.shape[0]
        stages = [comfy.model_management.cast_to_device(q, weight.device, torch.float32) for q in self.weights]
        fw = function(weight)
        if fw is weight:  # identity `function` (every core call site but one): edit the weight itself
            if weight.dtype == torch.float32 and weight.is_contiguous():
                apply_stages_(weight.view(out, -1), stages, strength, what=str(key))  # no out x in temporary
            else:  # fp16/bf16 (CUDA): upcast once, all stages in fp32, round once
                w = weight.reshape(out, -1).to(torch.float32, copy=True)
                apply_stages_(w, stages, strength, what=str(key))
                weight.copy_(w.reshape(weight.shape))
            return
        # A real `function` maps between the file's row layout and the model's (Flux norm_out's scale/shift
        # swap, an involution): project in the file's layout, map the diff back, add it (ComfyUI's pattern).
        w = fw.reshape(out, -1).to(torch.float32, copy=True)
        apply_stages_(w, stages, strength, what=str(key))
        w.sub_(fw.reshape(out, -1))
        _add_(weight, function(w.reshape(weight.shape)))


class FactorAdapter(comfy.weight_adapter.WeightAdapterBase):
    """W <- W + s·U@D with fixed float32 factors (PaRa + LoRA, computed from the base weight W0)."""

    name = "para_lora"

    def __init__(self, up: torch.Tensor, down: torch.Tensor):
        self.loaded_keys: set[str] = set()
        self.weights = (up.detach().to(torch.float32).contiguous(), down.detach().to(torch.float32).contiguous())

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        if strength == 0:
            return weight
        try:
            with torch.no_grad():
                up = comfy.model_management.cast_to_device(self.weights[0], weight.device, torch.float32)
                down = comfy.model_management.cast_to_device(self.weights[1], weight.device, torch.float32)
                diff = torch.mm(up, down).reshape(weight.shape)
                if strength != 1:
                    diff.mul_(strength)
                _add_(weight, function(diff))
        except Exception as e:
            logging.error("ERROR %s %s %s", self.name, key, e)
        return weight


# ---- key mapping ---------------------------------------------------------------------------------
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
                                f"{_key_name(target)}; keep one of them")
            seen[target] = module
        self.clip_missing = clip is None and any(m.startswith(TEXT_ENCODER_PREFIXES) for m in self.report.unmatched)

    def targets(self, side: str) -> dict[str, object]:
        return {m: t for m, t in self.report.matched.items() if self.side.get(m) == side}


def describe(report: MatchReport, patched: Mapping[str, int], note: str = "", first: int = 3) -> str:
    """The text a loader node shows: what was patched, what was skipped."""
    parts = [", ".join(f"{side}: {n} layer{'' if n == 1 else 's'} patched" for side, n in patched.items())]
    if report.unmatched:
        parts.append(f"skipped {len(report.unmatched)} not in this model (first: {', '.join(report.unmatched[:first])})")
    if note:
        parts.append(note)
    return "; ".join(parts)


def _raise_if_bad(res: Resolution, para: ParaModel) -> None:
    if not res.report.matched and not res.report.mismatched and res.clip_missing:
        raise ParaError(f"{para.source}: has text-encoder layers only ({len(res.report.unmatched)}); connect the CLIP input")
    res.report.raise_if_bad()


def block_multipliers(res: Resolution, block_strength: str) -> dict[str, float]:
    """{model weight key: multiplier} from a block-strength spec (para_core.blocks), checked against every
    module of the diffusion model. Empty spec: {} (every layer at 1)."""
    if not (block_strength or "").strip():
        return {}
    modules = [k[: -len(".weight")] for k, shape in res.unet_shapes.items() if k.endswith(".weight") and len(shape) >= 2]
    per_module = blocks.resolve(block_strength, modules)
    return {f"{m}.weight": v for m, v in per_module.items()}


def grouped_patches(para: ParaModel, res: Resolution, side: str, strength: float,
                    multipliers: Mapping[str, float] | None = None) -> dict[float, dict]:
    """{strength: {target: ParaAdapter}} for one side: the side's strength times each layer's block
    multiplier; layers at strength 0 are left out (bit-identical to not patching them)."""
    groups: dict[float, dict] = {}
    for module, target in res.targets(side).items():
        s = strength * (multipliers or {}).get(split_target(target)[0], 1.0)
        if s != 0:
            groups.setdefault(s, {})[target] = ParaAdapter(para.stages[module])
    return groups


def apply_para(para: ParaModel, model, clip, strength_model: float, strength_clip: float, block_strength: str = ""):
    """Clone model/clip and add one ParaAdapter per matched weight (one add_patches call per strength).

    `block_strength` (para_core.blocks) scales strength_model per block of the diffusion model.
    Returns (model, clip, status text). A file that does not fit raises ParaError with one message.
    """
    res = Resolution(para, model, clip)
    _raise_if_bad(res, para)
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
        for s, patches in groups.items():
            n = len(clone.add_patches(patches, s))
            if n != len(patches):  # cannot happen: targets come from the patcher's own state dict
                raise ParaError(f"{para.source}: ComfyUI accepted {n} of {len(patches)} patches")
            added += n
        counts[side] = added
        if side == "model":
            new_model = clone
        else:
            new_clip = clone
    notes = ["text-encoder layers skipped: no CLIP connected"] if res.clip_missing else []
    if strength_model == 0 or (clip is not None and strength_clip == 0):
        notes.append("strength 0 leaves that side unchanged")
    if mult:
        notes.append(f"block strength: {blocks.describe(mult) or 'all 1'}")
    return new_model, new_clip, describe(res.report, counts, "; ".join(notes))


# ---- PaRa + LoRA ---------------------------------------------------------------------------------
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
            bad.append(f"{_key_name(target)} ({kind})")
            continue
        up, down, alpha, mid, dora, reshape = adapter.weights
        if mid is not None or dora is not None or reshape is not None:
            what = "a LoCon mid weight" if mid is not None else "DoRA scale" if dora is not None else "a reshape"
            bad.append(f"{_key_name(target)} ({what})")
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


def _key_name(target) -> str:
    key, offset, _fn = split_target(target)
    return key if offset is None else f"{key}[{offset[1]}:{offset[1] + offset[2]}]"


def apply_para_lora(para: ParaModel, lora_sd: dict[str, torch.Tensor], lora_source: str, model, clip,
                    alpha_para: float, alpha_lora: float, mode: str):
    """Clone model/clip and add one FactorAdapter per weight touched by the PaRa or the LoRA."""
    res = Resolution(para, model, clip)
    _raise_if_bad(res, para)
    factors, unread = read_lora(lora_sd, res.unet_map, res.te_map, lora_source)
    para_by_target = {t: m for m, t in res.report.matched.items()}
    shapes = {**res.unet_shapes, **res.te_shapes}
    for target, (up, _down) in factors.items():
        rows = target_rows(target, shapes)
        if up.shape[0] != rows:
            raise ParaError(f"{lora_source}: LoRA layer {_key_name(target)} has {up.shape[0]} output rows, the model weight {rows}")
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
        for target in sorted(mine, key=_key_name):
            module = para_by_target.get(target)
            stages = para.stages[module] if module is not None else []
            up, down = factors.get(target, (None, None))
            u, d = combine_factors(stages, w0s.get(target), up, down, alpha_para, alpha_lora, mode,
                                   what=f"{para.source} + {lora_source}: {_key_name(target)}")
            patches[target] = FactorAdapter(u, d)
            stats["both" if stages and up is not None else "para" if stages else "lora"] += 1
        if not patches:
            counts[side] = 0
            continue
        clone = patcher.clone()
        added = clone.add_patches(patches, 1.0)
        counts[side] = len(added)
        if side == "model":
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

"""Hook PaRa: a PaRa as ComfyUI HOOKS, for the hook system (per-conditioning and scheduled weights).

Core Create Hook LoRA makes a `comfy.hooks.WeightHook` holding a LoRA state dict; ComfyUI maps its keys
to the model when the sampler registers the hook (`WeightHook.add_hook_patches`, per ModelPatcher and per
target: diffusion model or text encoder). `ParaWeightHook` does the same with a PARA: at registration it
resolves the file's modules against that patcher (the same `Resolution` as Load PaRa) and hands
`ParaAdapter` patches to `ModelPatcher.add_hook_patches`. While sampling, ComfyUI bakes the patches of the
hooks a conditioning carries into a float32 copy of each weight (`patch_hook_weight_to_device` ->
`comfy.lora.calculate_weight`, which calls `ParaAdapter.calculate_weight` with the hook keyframe's strength
multiplied in), and restores the base weight for conditionings without them. So:

* regional subjects: Cond Set Props with a mask and this hook per subject, combined into one positive -
  each subject's region is denoised by the model with its own PaRa, in one image, without merging;
* scheduling: Set Hook Keyframes with Create Hook Keyframe (strength per start percent) on these hooks.

Cost: the hooked weights are re-baked whenever the active hook set changes during a step (ComfyUI's
hook mode `MaxSpeed` caches them per hook set); plain Load PaRa has no per-step cost.
"""
from __future__ import annotations

import comfy.hooks
from comfy_api.latest import io

from ..para_core import blocks
from ..para_core.errors import ParaError
from . import ui_text
from .nodes_para import _STRENGTH, CATEGORY, Para, _block_strength_in, para_line
from .keys import TEXT_ENCODER_PREFIXES, Resolution, block_multipliers
from .model_caches import fresh_caches_per_call
from .patching import grouped_patches


class _ClipPatcherView:
    """What Resolution reads from a CLIP (cond_stage_model, patcher), for a bare text-encoder ModelPatcher."""

    def __init__(self, patcher):
        self.patcher = patcher
        self.cond_stage_model = patcher.model


class ParaWeightHook(comfy.hooks.WeightHook):
    """A WeightHook whose patches are a PaRa, resolved against each patcher it is registered on."""

    def __init__(self, para=None, strength_model: float = 1.0, strength_clip: float = 1.0, block_strength: str = ""):
        super().__init__(strength_model=strength_model, strength_clip=strength_clip)
        self.para = para
        self.block_strength = block_strength
        self.need_weight_init = False

    def add_hook_patches(self, model, model_options, target_dict, registered):
        if not self.should_register(model, model_options, target_dict, registered):
            return False
        is_clip = target_dict.get("target", None) == comfy.hooks.EnumWeightTarget.Clip
        try:
            if is_clip:
                res, side, strength, mult = Resolution(self.para, None, _ClipPatcherView(model)), "clip", self._strength_clip, None
            else:
                res = Resolution(self.para, model, None)
                side, strength, mult = "model", self._strength_model, block_multipliers(res, self.block_strength)
            diffusion_modules = [m for m in res.report.unmatched if not m.startswith(TEXT_ENCODER_PREFIXES)]
            if res.report.mismatched or (not is_clip and not res.report.matched and diffusion_modules):
                res.report.raise_if_bad()  # a file for another model: say so instead of sampling without it
        except ParaError as e:
            raise ValueError(f"Hook PaRa ({self.para.source}): {e}") from None
        for s, patches in grouped_patches(self.para, res, side, strength, mult).items():
            model.add_hook_patches(hook=self, patches=patches, strength_patch=s)
        if not is_clip:
            fresh_caches_per_call(model, model_options)
        registered.add(self)
        return True

    def clone(self):
        c: ParaWeightHook = super().clone()
        c.para = self.para
        c.block_strength = self.block_strength
        return c


class PaRaHook(io.ComfyNode):
    """A PaRa as HOOKS: per conditioning (regions, one subject each) and scheduled over the steps."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PaRaHook",
            display_name="Hook PaRa",
            category=CATEGORY,
            description="Turn a PaRa into ComfyUI hooks (like Create Hook LoRA): attach them to a conditioning with Cond "
                        "Set Props (with a mask: one subject per region, several subjects in one image without merging), "
                        "and schedule them with Set Hook Keyframes. Only the conditionings that carry the hook are "
                        "denoised with the PaRa-patched weights.",
            is_experimental=True,
            inputs=[
                Para.Input("para", tooltip="The PaRa (from Load PaRa File, Load PaRa or Merge PaRa)."),
                io.Float.Input("strength_model", **_STRENGTH,
                               tooltip="How much of the subspace to remove from the diffusion model while the hook is "
                                       "active: W - s·Q(QᵀW). Hook keyframes multiply it per step."),
                io.Float.Input("strength_clip", **_STRENGTH,
                               tooltip="The same for the file's text-encoder layers, when the hooks are set on a CLIP "
                                       "(Set CLIP Hooks)."),
                _block_strength_in(" (checked against the model when sampling starts)"),
                io.Hooks.Input("prev_hooks", optional=True, tooltip="Hooks to combine with (as in Create Hook LoRA)."),
            ],
            outputs=[io.Hooks.Output(display_name="HOOKS", tooltip="Connect to Cond Set Props, Set Hook Keyframes or Set CLIP Hooks.")],
            hidden=[ui_text.NODE_ID],
        )

    @classmethod
    def execute(cls, para, strength_model, strength_clip, block_strength="", prev_hooks=None) -> io.NodeOutput:
        block_strength = block_strength or ""
        try:
            blocks.parse(block_strength)  # syntax now; block names are checked against the model at sampling
        except ParaError as e:
            raise ValueError(f"Hook PaRa ({para.source}): {e}") from None
        prev = prev_hooks.clone() if prev_hooks is not None else comfy.hooks.HookGroup()
        if strength_model == 0 and strength_clip == 0:
            return io.NodeOutput(prev, ui=ui_text.report(cls, "strength 0: no hook added"))
        group = comfy.hooks.HookGroup()
        group.add(ParaWeightHook(para, strength_model, strength_clip, block_strength))
        text = (f"hook: {para_line(para)}; strength model {strength_model:g}, clip {strength_clip:g}"
                + (f"; block strength {block_strength.strip()}" if block_strength.strip() else "")
                + "\nactive only on the conditionings that carry it")
        return io.NodeOutput(prev.clone_and_combine(group), ui=ui_text.report(cls, text))


NODES = [PaRaHook]

"""Test-only input nodes, registered into ComfyUI once, by the harness when it starts ComfyUI (ComfyHarness._start).

They hand a graph what a test cannot get from a file: fixed synthetic latents and conditionings (so SD3 trains
without a text encoder), the tiny model of every family (families.py), and loaders for the example workflows,
whose real loaders cannot load a tiny SDXL or Flux. Nothing of the pack or of ComfyUI is replaced. The node ids
(``ParaTest...``) are the ones the tests' graphs and workflow swaps use.

ParaTestTinyCheckpoint and ParaTestTinyCLIP return the CLIP (and the 4-channel VAE) of the tiny SD1.5
checkpoint, which the ``sd15`` fixture loads and puts into ``SD15``; a test using them must request ``sd15``.
"""
from __future__ import annotations

import torch

import families as F

FAMILY_KEYS = list(F.FAMILIES)

# Filled by the `sd15` fixture (conftest.py): "clip" and "vae" of the tiny SD1.5 checkpoint it loaded.
SD15: dict = {}
_BUILT: dict = {}


def clear_built() -> None:
    """Drop the models these nodes hold (at the end of the session: conftest.py)."""
    SD15.clear()
    _BUILT.clear()


def _sd15(what: str, node: str):
    if what not in SD15:
        raise RuntimeError(f"{node} returns the {what} of the tiny SD1.5 checkpoint, which the `sd15` fixture "
                           f"loads: request `sd15` in the test before running a prompt with {node}")
    return SD15[what]


class _InputNode:
    FUNCTION = "make"
    CATEGORY = "_for_testing"


class ParaTestLatents(_InputNode):
    """n smooth, structured latents (low-frequency sinusoids per channel), fixed by seed."""

    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"n": ("INT", {"default": 4}), "channels": ("INT", {"default": 4}),
                             "size": ("INT", {"default": 8}), "seed": ("INT", {"default": 0})}}

    def make(self, n, channels, size, seed):
        g = torch.Generator().manual_seed(seed)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
        out = torch.zeros(n, channels, size, size)
        for i in range(n):
            for c in range(channels):
                fx, fy, ph = torch.rand(3, generator=g) * torch.tensor([3.0, 3.0, 6.28])
                out[i, c] = torch.sin(6.28 * (fx * xx + fy * yy) + ph) * (1.0 + c * 0.3)
        return ({"samples": out},)


class ParaTestConditioning(_InputNode):
    """A fixed random conditioning [(1, tokens, dim), {"pooled_output": (1, pooled)}] (pooled 0: none)."""

    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tokens": ("INT", {"default": 8}), "dim": ("INT", {"default": 768}),
                             "pooled": ("INT", {"default": 0}), "seed": ("INT", {"default": 0})}}

    def make(self, tokens, dim, pooled, seed):
        g = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": torch.randn(1, pooled, generator=g)} if pooled else {}
        return ([[torch.randn(1, tokens, dim, generator=g), extra]],)


class ParaTestFamilyModel(_InputNode):
    """The tiny model of a family (families.build), a fresh one per execution."""

    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILY_KEYS,)}}

    def make(self, family):
        return (F.build(family),)


class ParaTestFamilyModelColdCalls(ParaTestFamilyModel):
    """The tiny model of a family whose every diffusion-model call starts on an empty cross-call cache (a
    DIFFUSION_MODEL wrapper of the test's own calling the model's `clear_kv_cache`): the reference that sampling
    through the pack's nodes must equal."""

    def make(self, family):
        import comfy.patcher_extension
        patcher = F.build(family)
        clear = patcher.model.diffusion_model.clear_kv_cache

        def cold(executor, *args, **kwargs):
            clear()
            return executor(*args, **kwargs)
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "para-test.cold-calls", cold)
        return (patcher,)


class ParaTestFamilyLatents(_InputNode):
    """n latents shaped for the family (families.latents), fixed by seed."""

    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILY_KEYS,), "n": ("INT", {"default": 2}), "seed": ("INT", {"default": 0})}}

    def make(self, family, n, seed):
        return ({"samples": F.latents(family, n, seed)},)


class ParaTestFamilyConditioning(_InputNode):
    """The family's conditioning with its extra tensors and values (families.conditioning), fixed by seed."""

    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILY_KEYS,), "seed": ("INT", {"default": 1})}}

    def make(self, family, seed):
        return (F.conditioning(family, seed),)


class ParaTestTinyCheckpoint(_InputNode):
    """Stands in for CheckpointLoaderSimple: the family's tiny model, the tiny SD1.5 CLIP-L and TAESD VAE."""

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILY_KEYS,)}}

    def make(self, family):
        clip, vae = _sd15("clip", "ParaTestTinyCheckpoint"), _sd15("vae", "ParaTestTinyCheckpoint")
        return F.build(family), clip, vae


class ParaTestTinyUNet(ParaTestFamilyModel):
    """Stands in for UNETLoader in the example workflows: the family's tiny model (the same node under its own id)."""


class ParaTestTinyCLIP(_InputNode):
    """Stands in for a CLIP loader (DualCLIPLoader): the tiny SD1.5 checkpoint's CLIP-L."""

    RETURN_TYPES = ("CLIP",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def make(self):
        return (_sd15("clip", "ParaTestTinyCLIP"),)


class ParaTestTinyVAE16(_InputNode):
    """Stands in for VAELoader on a 16-channel latent (Flux): a TAESD with explicit random init, built once."""

    RETURN_TYPES = ("VAE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def make(self):
        if "vae16" not in _BUILT:
            import comfy.sd
            import comfy.taesd.taesd
            from harness import _init_sd
            sd = _init_sd(comfy.taesd.taesd.TAESD(latent_channels=16))
            sd.update(vae_scale=torch.tensor(1.0), vae_shift=torch.tensor(0.0))
            _BUILT["vae16"] = comfy.sd.VAE(sd=sd)
        return (_BUILT["vae16"],)


class ParaTestSizedLatents(_InputNode):
    """A list of LATENTs, one per image, each (1, 4, size, size) filled with one value (images of mixed sizes)."""

    RETURN_TYPES = ("LATENT",)
    OUTPUT_IS_LIST = (True,)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sizes": ("STRING", {"default": "8,6"}), "values": ("STRING", {"default": "1,1"})}}

    def make(self, sizes, values):
        return ([{"samples": torch.full((1, 4, int(s), int(s)), float(v))} for s, v in zip(sizes.split(","), values.split(","))],)


NODES = {cls.__name__: cls for cls in (
    ParaTestLatents, ParaTestConditioning, ParaTestSizedLatents, ParaTestFamilyModel, ParaTestFamilyModelColdCalls,
    ParaTestFamilyLatents, ParaTestFamilyConditioning,
    ParaTestTinyCheckpoint, ParaTestTinyUNet, ParaTestTinyCLIP, ParaTestTinyVAE16)}


def register(node_class_mappings: dict) -> None:
    """Add the nodes to ComfyUI's NODE_CLASS_MAPPINGS; an id already taken by another class is an error."""
    for name, cls in NODES.items():
        other = node_class_mappings.setdefault(name, cls)
        if other is not cls:
            raise RuntimeError(f"test input node id {name} is already registered as {other!r}")

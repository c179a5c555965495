"""UNets for the benchmarks, built from ComfyUI's own classes with random weights (nothing downloaded).

``sd15`` / ``sdxl``: the real architectures (ComfyUI's detection configs, comfy/model_detection.py), so
ComfyUI detects them as SD1.5 / SDXL. ``tiny_sd15``: model_channels 320, one level (the integration
harness's UNet). ``tiny_sdxl``: SDXL's blocks (linear transformers, context 2048, 2816-dim label
embedding, head dim 64) with two levels, one res block each and transformer depth 1; ComfyUI cannot
detect it (the SDXL class matches the full depth), so it is built through ``comfy.supported_models.SDXL``.
"""
from __future__ import annotations

COMMON = dict(use_checkpoint=False, image_size=32, out_channels=4, in_channels=4, use_spatial_transformer=True, legacy=False,
              use_temporal_attention=False, use_temporal_resblock=False)
CONFIGS = {
    "sd15": dict(COMMON, adm_in_channels=None, model_channels=320, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1, use_linear_in_transformer=False,
                 context_dim=768, num_heads=8, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
    "sdxl": dict(COMMON, num_classes="sequential", adm_in_channels=2816, model_channels=320, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                 use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10]),
    "tiny_sd15": dict(COMMON, adm_in_channels=None, model_channels=320, num_res_blocks=[1], channel_mult=[1],
                      transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=-2, context_dim=768,
                      num_heads=8, num_head_channels=-1, use_linear_in_transformer=False),
    "tiny_sdxl": dict(COMMON, num_classes="sequential", adm_in_channels=2816, model_channels=320, num_res_blocks=[1, 1],
                      channel_mult=[1, 2], transformer_depth=[0, 1], transformer_depth_middle=1, use_linear_in_transformer=True,
                      context_dim=2048, num_head_channels=64, transformer_depth_output=[0, 0, 1, 1]),
}
CONTEXT = {"sd15": 768, "tiny_sd15": 768, "sdxl": 2048, "tiny_sdxl": 2048}


def is_sdxl(arch: str) -> bool:
    return arch.endswith("sdxl")


def make_state_dict(arch: str, seed: int = 0, device: str = "cpu", dtype=None) -> dict:
    """Random weights at the architecture's real shapes: N(0, 1/fan_in) for ≥2-D weights, 1 for norm scales,
    N(0, 0.02²) for biases (ComfyUI ops skip init, so every tensor is set explicitly)."""
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    dtype = dtype or torch.float32
    g = torch.Generator(device=device).manual_seed(seed)
    m = UNetModel(**CONFIGS[arch], operations=comfy.ops.disable_weight_init, device=device, dtype=dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=dtype) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=dtype) * 0.02)
    return {k: v.detach() for k, v in m.state_dict().items()}


def load(arch: str, sd: dict, weight_dtype=None):
    """A ModelPatcher as ComfyUI's UNETLoader gives it (detection for the real architectures); weight_dtype
    (a torch dtype) stores the weights in it, as UNETLoader's ``weight_dtype`` does (None: ComfyUI's choice)."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    if arch != "tiny_sdxl":
        mp = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": weight_dtype} if weight_dtype else {})
        if mp is None:
            raise RuntimeError(f"ComfyUI did not detect the {arch} UNet")
        return mp
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    config = comfy.supported_models.SDXL(unet_config)
    load_device = mm.get_torch_device()
    dtype = weight_dtype or mm.unet_dtype(model_params=sum(v.numel() for v in sd.values()),
                                          supported_dtypes=list(config.supported_inference_dtypes))
    config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes))
    model = config.get_model(sd, "")
    model = model.to(mm.unet_offload_device())
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def load_file(arch: str, path: str, weight_dtype_name: str | None = None, disable_dynamic: bool = False):
    """`load` from a safetensors file; ComfyUI 0.33+ keeps this as the model's ``cached_patcher_init`` (how its
    loaders let the core trainer make its own copy of the model: it reloads it)."""
    import torch
    import comfy.utils
    sd = comfy.utils.load_torch_file(path)
    mp = load(arch, sd, getattr(torch, weight_dtype_name) if weight_dtype_name else None)
    if hasattr(mp, "cached_patcher_init"):
        mp.cached_patcher_init = (load_file, (arch, path, weight_dtype_name))
    return mp


def data(arch: str, images: int, res: int, seed: int = 1234):
    """(latents, positive) as the dataset and text-encode nodes give them: one caption for all images;
    SDXL conditioning carries a pooled output (its size embeddings are filled in by ComfyUI)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    latents = [{"samples": torch.randn(images, 4, res, res, generator=g)}]
    ctx = torch.randn(1, 77, CONTEXT[arch], generator=g)
    extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if is_sdxl(arch) else {}
    return latents, [[[ctx, extra]]]

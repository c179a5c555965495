"""What a diffusion model computes once and reuses across calls, and how the pack keeps it from going stale.

HiDream-O1 (ComfyUI 0.33, ``comfy/ldm/hidream_o1/model.py``) runs its text prompt through the same transformer
as the image and keeps the prompt prefix's K/V (and the reference images' ViT output) from one call to the
next, keyed by prompt, positions and reference identity - not by the weights. Within one sampling run the
weights do not change, so that is exact; across runs ComfyUI never clears it (``clear_kv_cache`` has no
caller), so a run on the same prompt after the weights changed reuses K/V of the *previous* weights: the base
model's K/V in a PaRa run after a base run, PaRa's in a base run after a PaRa run - the patch then only
reaches the image tokens. (ComfyUI's own LoRA loader has the same problem; it is the host's, and this module
does not change the host.)

The pack clears the cache where its weights come and go: `fresh_caches_per_sampling` around each sampling run
of a model it patched (Load / Apply PaRa, PaRa + LoRA); `fresh_caches_per_call` around each model call of a
sampling run with a PaRa hook, where the weights change between calls (keyframes, hooked and plain
conditionings on the same prompt); and `nodes/train_host.py` around every forward while training, where each
step has other weights and a cached K/V would also still hold the previous step's graph. Feature-detected by
the model's own method; a model without one is left alone.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

_WRAPPER_KEY = "comfyui-para.fresh-caches"


def cross_call_cache_clearer(model) -> Callable[[], None] | None:
    """The diffusion model's own method that drops what it caches across calls (HiDream-O1's
    ``clear_kv_cache``), or None for models that cache nothing across calls. `model`: a ModelPatcher, a
    BaseModel or the diffusion model itself."""
    base = getattr(model, "model", model)
    dm = getattr(base, "diffusion_model", base)
    clear = getattr(dm, "clear_kv_cache", None) if isinstance(dm, torch.nn.Module) else None
    return clear if callable(clear) else None


def cleared_around(clear: Callable[[], None], call: Callable) -> Callable:
    """`call`, with the cache cleared before it and after it (also when it raises)."""
    def run(*args, **kwargs):
        clear()
        try:
            return call(*args, **kwargs)
        finally:
            clear()
    return run


def _cleared_wrapper(clear: Callable[[], None]) -> Callable:
    """A ComfyUI wrapper (``wrapper(executor, *args, **kwargs)``) that runs the wrapped call cleared around."""
    def wrapper(executor, *args, **kwargs):
        return cleared_around(clear, executor)(*args, **kwargs)
    return wrapper


def fresh_caches_per_sampling(patcher) -> None:
    """Make each sampling run of ModelPatcher `patcher` (and of its later clones) start and end with an empty
    cross-call cache: nothing computed with other weights is used, and nothing computed with these weights
    outlives the run. One OUTER_SAMPLE wrapper under the pack's key; nothing for models without such a cache
    or a ComfyUI without patcher wrappers."""
    clear = cross_call_cache_clearer(patcher)
    if clear is None or not hasattr(patcher, "add_wrapper_with_key"):
        return
    import comfy.patcher_extension
    kind = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    if _WRAPPER_KEY in patcher.wrappers.get(kind, {}):
        return
    patcher.add_wrapper_with_key(kind, _WRAPPER_KEY, _cleared_wrapper(clear))


def fresh_caches_per_call(patcher, model_options: dict) -> None:
    """Make each diffusion-model call of one sampling run (`model_options`: that run's, as a hook's
    ``add_hook_patches`` gets them) start and end with an empty cross-call cache: with hooks the weights can
    change between any two calls. One DIFFUSION_MODEL wrapper under the pack's key, for this run only."""
    clear = cross_call_cache_clearer(patcher)
    import comfy.patcher_extension as extension
    if clear is None or not hasattr(extension, "add_wrapper_with_key"):
        return
    kind = extension.WrappersMP.DIFFUSION_MODEL
    wrappers = model_options.get("transformer_options", {}).get("wrappers", {})
    if _WRAPPER_KEY in wrappers.get(kind, {}):
        return
    extension.add_wrapper_with_key(kind, _WRAPPER_KEY, _cleared_wrapper(clear), model_options, is_model_options=True)

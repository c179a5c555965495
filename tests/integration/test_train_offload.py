"""Training PaRa on an offloaded model (ComfyUI's low-VRAM path): the weights stay where ComfyUI keeps them.

ComfyUI offloads by loading a model partially (``ModelPatcher.load(lowvram_model_memory=...)``, what
``load_models_gpu`` does when the weights do not fit): a streamed layer keeps its weight on the offload device,
is marked ``comfy_cast_weights`` and computes from a per-call copy on the compute device
(``comfy.ops.cast_bias_weight``). On a CPU the load and offload devices are the same, so "on the offload
device" alone proves nothing; what is checked instead is what makes offloading work on a GPU:

* every layer is streamed (``comfy_cast_weights``), by ComfyUI's own partial load with a 1-byte budget, as
  the dynamic-VRAM check drives it (benchmarks/gpu_dynamic_vram.py), and ComfyUI counts no weight as loaded;
* at every layer call - in the forward and in the recomputation that gradient checkpointing runs inside
  backward, i.e. between blocks in both directions - every parameter of the model is the same object, on
  the offload device, and each PaRa layer computed from ComfyUI's cast of it (one cast per call: nothing of
  a block's weights is held between its forward and its backward);
* the trained gradient equals the one of the fully loaded model (fp32 rounding).

This drives Train PaRa's own machinery (para_core: the plan, ParaNetwork's wrappers with ComfyUI's cast,
checkpointing over the blocks, the per-step bases); the node's ``offloading`` input loads the model the same way.
"""
from __future__ import annotations

import contextlib
import importlib

import torch

from para_core.layer import ParaNetwork
from para_core.targets import plan
from para_core.train import checkpoint_units, enable_checkpointing


def _one_step(harness, offload: bool):
    """(grad of every B, per-call records) after one forward/backward of the tiny SD1.5 UNet with PaRa on ExCA,
    with the trainer's own layer choice and weight/bias access (nodes/train_host.py)."""
    pkg = harness.nodes.NODE_CLASS_MAPPINGS["PaRaTrainer"].__module__.rsplit(".", 1)[0]
    host = importlib.import_module(f"{pkg}.train_host")
    import comfy.model_management as mm
    import comfy.ops
    import comfy.sd
    mm.unload_all_models()
    mp = comfy.sd.load_diffusion_model(harness.path("diffusion_models", harness.sd15_unet()))
    dev = mm.get_torch_device()
    offload_dev = mp.offload_device
    if offload:
        mp.load(dev, lowvram_model_memory=1)  # ComfyUI's partial load: every layer streamed
    else:
        mp.load(dev, full_load=True)
    base = mp.model
    mods = host.trainable_layers(base)
    p = plan({n: m.weight.shape[0] for n, m in mods.items()}, "ExCA", 4, layout="unet")
    net = ParaNetwork.from_weights({n: mods[n].weight.detach().float() for n in p.ranks}, p.ranks, "random", 0, "output")
    params = {name: (t, t.device) for name, t in base.named_parameters()}
    records = {"calls": 0, "moved": [], "not_streamed": set(), "casts": {}}
    trained = {id(mods[n]) for n in p.ranks}

    def check_between_calls(module, args):
        records["calls"] += 1
        if not module.comfy_cast_weights:
            records["not_streamed"].add(type(module).__name__)
        for name, t in base.named_parameters():
            if t is not params[name][0] or t.device != (offload_dev if offload else params[name][1]):
                records["moved"].append(name)
    real_cast = comfy.ops.cast_bias_weight

    def counted_cast(module, *a, **k):
        if id(module) in trained:
            records["casts"][id(module)] = records["casts"].get(id(module), 0) + 1
        return real_cast(module, *a, **k)
    hooks = [m.register_forward_pre_hook(check_between_calls) for m in mods.values()]
    undo = [net.attach(mods, host.comfy_weight_of, host.comfy_bias_of),
            enable_checkpointing(checkpoint_units(base.diffusion_model))]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, 768, generator=g)
    comfy.ops.cast_bias_weight = counted_cast
    try:
        with net.step():
            y = base.apply_model(x.to(dev), torch.tensor([3.0], device=dev), c_crossattn=ctx.to(dev))
            y.float().square().mean().backward()
    finally:
        comfy.ops.cast_bias_weight = real_cast
        for h in hooks:
            h.remove()
        for u in reversed(undo):
            u()
    info = {"loaded_bytes": getattr(mp, "model_loaded_weight_memory", None), "model_bytes": mp.model_size(),
            "streamed": sum(1 for m in mods.values() if m.comfy_cast_weights), "layers": len(mods)}
    with contextlib.suppress(Exception):
        mp.detach()
    mm.unload_all_models()
    return {n: layer.b.grad.clone() for n, layer in net.items()}, records, info, len(trained)


def test_offloaded_training_streams_every_layer_and_keeps_weights_in_place(comfy):
    grads, rec, info, n_trained = _one_step(comfy, offload=True)
    assert info["streamed"] == info["layers"] > 0, info  # ComfyUI's partial load streamed every layer
    assert info["loaded_bytes"] is None or info["loaded_bytes"] < info["model_bytes"] // 100, info
    assert rec["calls"] > 2 * info["layers"] // 2 and not rec["not_streamed"], rec["not_streamed"]
    assert not rec["moved"], rec["moved"][:5]  # between every layer call, forward and backward: weights stay put
    # each trained layer: one cast in the forward, one in checkpointing's recomputation, none kept in between
    assert len(rec["casts"]) == n_trained and set(rec["casts"].values()) == {2}, set(rec["casts"].values())
    full, _, info_full, _ = _one_step(comfy, offload=False)
    assert info_full["streamed"] == 0, info_full
    for n, gr in grads.items():
        assert torch.allclose(gr, full[n], rtol=1e-4, atol=1e-6 * float(full[n].abs().max())), n

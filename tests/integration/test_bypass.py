"""PaRa in bypass mode (Load PaRa (Bypass), Apply PaRa (Bypass)) against weight patching, in a real ComfyUI.

Bypass projects each patched layer's output, y - s·QQᵀ(y - b), and never writes a weight. On full-precision
weights it must compute what weight patching computes (to fp32 rounding); on fp8-stored and quantized weights,
where baking a patch rounds the patched weight into the storage format, it must be exact where patching is not:
both are compared with a reference model whose fp32 weights are the dequantized stored weights, weight-patched
in fp32.
"""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from harness import bits_equal

LIN = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # Linear 320 x 320 (self-attention)
FF = "diffusion_model.output_blocks.1.1.transformer_blocks.0.ff.net.0.proj"  # Linear 2560 x 320
CONV = "diffusion_model.input_blocks.0.0"  # Conv 320 x 4 x 3 x 3
CONV1 = "diffusion_model.input_blocks.1.1.proj_in"  # Conv 320 x 320 x 1 x 1
OUT = {LIN: 320, FF: 2560, CONV: 320, CONV1: 320}


def _b(out, r, seed):
    return torch.randn(out, r, generator=torch.Generator().manual_seed(seed))


def _inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([2.5, 0.7][:batch]), torch.randn(batch, 8, 768, generator=g)


def _predict(patcher, seed=0) -> torch.Tensor:
    """The diffusion model's output on fixed inputs, with the patcher loaded as ComfyUI loads it for sampling."""
    import comfy.model_management as mm
    x, sigma, ctx = _inputs(seed)
    mm.unload_all_models()
    with torch.no_grad():  # (not inference mode: ComfyUI 0.8 cannot move mixed-precision layers in inference mode)
        mm.load_models_gpu([patcher], force_full_load=True)
    with torch.inference_mode():
        y = patcher.model.apply_model(x, sigma, c_crossattn=ctx).float().clone()
    mm.unload_all_models()
    return y


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _pack_module(comfy, name):
    pkg = comfy.nodes.NODE_CLASS_MAPPINGS["PaRaLoader"].__module__.rsplit(".", 1)[0]
    return importlib.import_module(f"{pkg}.{name}")


@pytest.fixture(scope="module")
def files(comfy):
    comfy.write_para("bypass_a.safetensors", {m: [_b(OUT[m], r, i)] for i, (m, r) in enumerate([(LIN, 8), (FF, 16), (CONV, 4), (CONV1, 8)])})
    comfy.write_para("bypass_b.safetensors", {LIN: [_b(320, 4, 20)], CONV1: [_b(320, 6, 21)]})
    return "bypass_a.safetensors", "bypass_b.safetensors"


def _load_chain(comfy, unet_name, para_names, bypass, weight_dtype="default", strengths=(0.8, 1.3)):
    g = comfy.graph()
    ld = g.node("UNETLoader", unet_name=unet_name, weight_dtype=weight_dtype)
    m = ld.out(0)
    last = None
    for name, s in zip(para_names, strengths):
        last = g.node("PaRaLoaderBypass" if bypass else "PaRaLoader", model=m, para_name=name, strength_model=s, strength_clip=1.0)
        m = last.out(0)
    g.node("PreviewAny", source=m)
    ui = comfy.run(g.finalize())
    return comfy.output(ld.id, 0), comfy.output(last.id, 0), ui.get(last.id, {}).get("text", [""])[0]


def test_bypass_equals_weight_patching_and_leaves_weights_untouched(comfy, files):
    """Two bypass loaders in a row (the sequential merge, strengths 0.8 and 1.3) = the same two Load PaRa, to fp32
    rounding, on linear and conv layers; the stored weights stay bit-identical while the bypass model is loaded."""
    unet = comfy.sd15_unet()
    base, patched, _ = _load_chain(comfy, unet, files, bypass=False)
    base2, bypassed, text = _load_chain(comfy, unet, files, bypass=True)
    assert base2 is base  # the same UNETLoader output (cached): bypass and patching start from one model
    assert "model: 2 layers patched" in text and "bypass: weights untouched" in text
    y_base, y_patch, y_bypass = _predict(base), _predict(patched), _predict(bypassed)
    assert _rel(y_patch, y_base) > 1e-2  # the PaRa changes the prediction
    assert _rel(y_bypass, y_patch) < 2e-5, _rel(y_bypass, y_patch)
    # nothing baked: while the bypass model is loaded its weights are the base weights, bit for bit
    import comfy.model_management as mm
    w0 = comfy.base_state_dict(base)
    with torch.inference_mode():
        mm.load_models_gpu([bypassed], force_full_load=True)
        sd = bypassed.model.state_dict()
        assert all(bits_equal(sd[k], v) for k, v in w0.items())
    mm.unload_all_models()
    # and after unloading, the base model predicts exactly as before (the forward hooks are gone)
    assert torch.equal(_predict(base), y_base)


def test_bypass_strength_zero_and_block_strength_follow_weight_patching(comfy, files):
    unet = comfy.sd15_unet()
    base, _, _ = _load_chain(comfy, unet, files[:1], bypass=False)
    g = comfy.graph()
    ld = g.node("UNETLoader", unet_name=unet, weight_dtype="default")
    by = g.node("PaRaLoaderBypass", model=ld.out(0), para_name=files[0], strength_model=1.0, strength_clip=1.0,
                block_strength="input:0, output:0.5")
    wp = g.node("PaRaLoader", model=ld.out(0), para_name=files[0], strength_model=1.0, strength_clip=1.0,
                block_strength="input:0, output:0.5")
    zero = g.node("PaRaLoaderBypass", model=ld.out(0), para_name=files[0], strength_model=0.0, strength_clip=1.0)
    for n in (by, wp, zero):
        g.node("PreviewAny", source=n.out(0))
    comfy.run(g.finalize())
    assert _rel(_predict(comfy.output(by.id, 0)), _predict(comfy.output(wp.id, 0))) < 2e-5
    assert torch.equal(_predict(comfy.output(zero.id, 0)), _predict(base))


def test_bypass_on_fused_qkv_slices_and_swapped_rows_flux(comfy):
    """Flux's fused qkv / linear1 (offset patches: a slice of the output rows) and the final modulation whose rows
    ComfyUI's key map swaps (scale/shift): bypass = weight patching."""
    h = 64
    stages = {"transformer.transformer_blocks.0.attn.to_k": [_b(h, 3, 100)],
              "transformer.transformer_blocks.0.attn.add_q_proj": [_b(h, 2, 101)],
              "diffusion_model.single_blocks.0.linear1_qkv": [_b(3 * h, 4, 102)],
              "transformer.single_transformer_blocks.0.proj_mlp": [_b(4 * h, 2, 103)],
              "transformer.norm_out.linear": [_b(2 * h, 3, 104)]}
    comfy.write_para("flux_bypass.safetensors", stages)
    nodes = comfy.nodes.NODE_CLASS_MAPPINGS
    model = comfy.flux_model()
    with torch.inference_mode():
        wp = nodes["PaRaLoader"].execute(model=model, para_name="flux_bypass.safetensors", strength_model=0.9, strength_clip=1.0).args[0]
        by = nodes["PaRaLoaderBypass"].execute(model=model, para_name="flux_bypass.safetensors", strength_model=0.9, strength_clip=1.0).args[0]
    g = torch.Generator().manual_seed(3)
    x, ctx, vec = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    t = torch.tensor([0.6])

    def run(patcher):
        import comfy.model_management as mm
        mm.unload_all_models()
        with torch.inference_mode():
            mm.load_models_gpu([patcher], force_full_load=True)
            y = patcher.model.diffusion_model(x, t, ctx, vec).float().clone()
        mm.unload_all_models()
        return y
    y0, y_wp, y_by = run(model), run(wp), run(by)
    assert _rel(y_wp, y0) > 1e-3
    assert _rel(y_by, y_wp) < 2e-5, _rel(y_by, y_wp)


def _dequantized_file(comfy, patcher, name):
    """A fp32 UNet file holding exactly the weights `patcher`'s layers compute with (fp8 / quantized, dequantized)."""
    import comfy.model_management as mm
    model_patcher = importlib.import_module("comfy.model_patcher")
    mm.unload_all_models()
    sd = {}
    with torch.inference_mode():
        for k, v in patcher.model.state_dict().items():
            leaf = k.rsplit(".", 1)[-1]
            if not k.startswith("diffusion_model.") or leaf in ("weight_scale", "input_scale", "comfy_quant", "scale_weight"):
                continue  # quantization side data: folded into the dequantized weight
            if leaf not in ("weight", "bias"):
                sd[k[len("diffusion_model."):]] = v.to(torch.float32).clone()
                continue
            w, _set, convert = model_patcher.get_key_weight(patcher.model, k)
            w = w.dequantize() if hasattr(w, "dequantize") and type(w) is not torch.Tensor else w
            if convert is not None:
                w = convert(w.to(torch.float32, copy=True), inplace=True)
            sd[k[len("diffusion_model."):]] = w.to(torch.float32).clone()
    comfy.write_safetensors("diffusion_models", name, sd)
    return name


def _bypass_vs_patching_on_stored(comfy, files, unet_name, weight_dtype, ref_name):
    stored, patched, _ = _load_chain(comfy, unet_name, files[:1], bypass=False, weight_dtype=weight_dtype, strengths=(1.0,))
    _, bypassed, _ = _load_chain(comfy, unet_name, files[:1], bypass=True, weight_dtype=weight_dtype, strengths=(1.0,))
    ref_base, ref, _ = _load_chain(comfy, _dequantized_file(comfy, stored, ref_name), files[:1], bypass=False, strengths=(1.0,))
    y_ref, y_ref_base = _predict(ref), _predict(ref_base)
    assert _rel(y_ref, y_ref_base) > 1e-2
    # the format's own compute error (e.g. int8 activations), with no PaRa: the floor for both ways of applying it
    floor = _rel(_predict(stored), y_ref_base)
    return _rel(_predict(bypassed), y_ref), _rel(_predict(patched), y_ref), floor


def test_bypass_on_fp8_storage_is_exact_where_patching_rounds(comfy, files):
    """UNETLoader weight_dtype fp8_e4m3fn: patching bakes W - QQᵀW back into fp8 (stochastic rounding, a few %
    of the change); bypass computes from the stored fp8 weights in fp32 and matches the fp32 reference."""
    bypass_err, patch_err, floor = _bypass_vs_patching_on_stored(comfy, files, comfy.sd15_unet(), "fp8_e4m3fn", "fp8_ref.safetensors")
    assert floor < 2e-5, floor  # fp8 storage computes in fp32 from the stored values: exact
    assert bypass_err < 2e-5, bypass_err
    assert patch_err > 20 * bypass_err, (patch_err, bypass_err)


def _quantized_unet(comfy, fmt: str, layers: list[str]) -> str:
    """The tiny SD1.5 UNet with `layers` stored in ComfyUI's mixed-precision format `fmt` (safetensors metadata
    `_quantization_metadata`, per-layer weight + weight_scale), the rest fp32."""
    import safetensors.torch
    algo = importlib.import_module("comfy.quant_ops").QUANT_ALGOS[fmt]
    sd = safetensors.torch.load_file(comfy.path("diffusion_models", comfy.sd15_unet()))
    sd = {k: v.to(torch.float32) for k, v in sd.items()}
    for layer in layers:
        w = sd[f"{layer}.weight"]
        storage = algo["storage_t"]
        if storage.is_floating_point:
            scale = w.abs().max() / torch.finfo(storage).max
            sd[f"{layer}.weight"] = (w / scale).to(storage)
        else:
            scale = w.abs().max() / 127.0
            sd[f"{layer}.weight"] = torch.round(w / scale).clamp(-127, 127).to(storage)
        sd[f"{layer}.weight_scale"] = scale.to(torch.float32).reshape(())
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {layer: {"format": fmt} for layer in layers}})}
    return comfy.write_safetensors("diffusion_models", f"tiny_sd15_{fmt}.safetensors", sd, metadata=meta)


QUANT_FORMATS = ["float8_e4m3fn", "float8_e5m2", "int8_tensorwise"]


def test_bypass_on_quantized_layers_matches_the_dequantized_reference(comfy, files):
    """Every one of these mixed-precision formats that the running ComfyUI loads (feature-detected through
    `comfy.quant_ops.QUANT_ALGOS`: 0.8 has the fp8 ones, 0.33 int8 too) - at least the fp8 one."""
    algos = getattr(importlib.import_module("comfy.quant_ops"), "QUANT_ALGOS", {})
    tested = []
    for fmt in (f for f in QUANT_FORMATS if f in algos):
        layers = [m[len("diffusion_model."):] for m in (LIN, FF)]
        name = _quantized_unet(comfy, fmt, layers)
        stored, _, _ = _load_chain(comfy, name, files[:1], bypass=False, strengths=(1.0,))
        for layer in layers:
            mod = stored.model.diffusion_model.get_submodule(layer)
            assert getattr(mod, "quant_format", None) == fmt, (fmt, layer, type(mod.weight))
        bypass_err, patch_err, floor = _bypass_vs_patching_on_stored(comfy, files, name, "default", f"{fmt}_ref.safetensors")
        # bypass adds nothing to the format's own error (2e-5: fp32 rounding); patching re-quantizes the patched weight
        assert bypass_err < 1.5 * floor + 2e-5, (fmt, bypass_err, floor)
        assert patch_err > bypass_err, (fmt, patch_err, bypass_err)
        tested.append(fmt)
    assert "float8_e4m3fn" in tested, tested


def test_without_model_injections_the_node_says_so_in_one_line(comfy, files, monkeypatch):
    """Feature detection: a ComfyUI whose ModelPatcher has no `set_injections` gets one line naming what is missing."""
    model_patcher = importlib.import_module("comfy.model_patcher")
    monkeypatch.delattr(model_patcher.ModelPatcher, "set_injections")
    g = comfy.graph()
    ld = g.node("UNETLoader", unet_name=comfy.sd15_unet(), weight_dtype="default")
    by = g.node("PaRaLoaderBypass", model=ld.out(0), para_name=files[0], strength_model=1.0, strength_clip=1.0)
    g.node("PreviewAny", source=by.out(0))
    msg = comfy.run_failing(g.finalize())
    assert "cannot run PaRa in bypass mode" in msg and "set_injections" in msg and "\n" not in msg.strip(), msg

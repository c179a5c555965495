"""Train PaRa on a base whose weights are stored in fp8 or in ComfyUI's quantized formats (a consumer GPU's
memory): it trains, and it trains what the stored model computes.

Two references, both trained by the same graph (tiny SD1.5 UNet, ExCA, fixed synthetic data, fp32 compute):

* the **dequantized** base: a fp32 file holding exactly the weights the stored model computes with. Training
  reads the stored weights only through ComfyUI's own cast (fp8 -> compute dtype, QuantizedTensor ->
  dequantize), so the two runs are the same computation: losses and trained bases agree to fp32 rounding.
* the **original** base (the weights before quantization): the runs differ only by the storage format's
  rounding of the weights, so the loss histories agree to within that precision (fp8 e4m3: 3 mantissa bits,
  2^-4 relative per weight; the loss, an average over many weights and samples, moves far less).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from test_bypass import FF, LIN, QUANT_FORMATS, _dequantized_file, _quantized_unet

SETTINGS = dict(batch_size=2, grad_accumulation_steps=1, steps=4, learning_rate=0.01, rank=4, optimizer="AdamW",
                loss_function="MSE", seed=0, training_dtype="fp32", gradient_checkpointing=True, targets="ExCA",
                include="", exclude="", rank_boundary=0.025, loss_space="prediction", existing_para="[None]",
                save_every=0, preview_every=0, init="random", projection="output")


def _train(comfy, unet_name: str, weight_dtype: str = "default"):
    """(loss history, {layer: Q}, the UNETLoader's model) of one Train PaRa run on this UNet file."""
    g = comfy.graph()
    ld = g.node("UNETLoader", unet_name=unet_name, weight_dtype=weight_dtype)
    lat = g.node("ParaTestLatents", n=4, channels=4, size=8, seed=0).out(0)
    cond = g.node("ParaTestConditioning", tokens=8, dim=768, pooled=0, seed=1).out(0)
    tr = g.node("PaRaTrainer", model=ld.out(0), latents=lat, positive=cond, **SETTINGS)
    g.node("PreviewAny", source=tr.out(3))
    comfy.run(g.finalize(), fresh_cache=True)
    para = comfy.output(tr.id, 1)
    return list(comfy.output(tr.id, 2)["loss"]), {m: c[0].float() for m, c in para.stages.items()}, comfy.output(ld.id, 0)


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _q_diff(qa: dict, qb: dict) -> float:
    """Largest |Q_a - Q_b| over layers (both sign-fixed by the QR, so equal bases give equal matrices)."""
    assert qa.keys() == qb.keys()
    return max(float((qa[m] - qb[m]).abs().max()) for m in qa)


def test_fp8_stored_base_trains_what_it_computes(comfy):
    """UNETLoader weight_dtype fp8_e4m3fn: the same run as on the dequantized weights (fp32 rounding), and
    within fp8 precision of the run on the original weights."""
    unet = comfy.sd15_unet()
    losses8, q8, stored = _train(comfy, unet, "fp8_e4m3fn")
    w = stored.model.diffusion_model.get_submodule(LIN[len("diffusion_model."):]).weight
    assert w.dtype == torch.float8_e4m3fn  # trained on what is stored, not on an upcast copy of the model
    ref = _dequantized_file(comfy, stored, "fp8_train_ref.safetensors")
    losses_ref, q_ref, _ = _train(comfy, ref)
    assert _max_rel(losses8, losses_ref) < 1e-4, (losses8, losses_ref)
    assert _q_diff(q8, q_ref) < 1e-3  # Adam amplifies fp32 rounding a little
    losses_orig, _, _ = _train(comfy, unet)
    gap = _max_rel(losses8, losses_orig)
    assert gap < 2 ** -4, (gap, losses8, losses_orig)  # fp8 e4m3's relative weight precision
    assert losses8[-1] < losses8[0]


def test_quantized_layers_train_what_they_compute(comfy):
    """ComfyUI's mixed-precision formats (QuantizedTensor layers; every format of QUANT_FORMATS that the running
    ComfyUI loads, at least fp8) on two trained layers: the run equals the one on the dequantized weights."""
    algos = getattr(importlib.import_module("comfy.quant_ops"), "QUANT_ALGOS", {})
    if "float8_e4m3fn" not in algos:
        pytest.skip("this ComfyUI has no mixed-precision formats (comfy.quant_ops.QUANT_ALGOS)")
    tested = []
    for fmt in (f for f in QUANT_FORMATS if f in algos):
        layers = [m[len("diffusion_model."):] for m in (LIN, FF)]
        name = _quantized_unet(comfy, fmt, layers)
        losses_q, q_q, stored = _train(comfy, name)
        assert getattr(stored.model.diffusion_model.get_submodule(layers[0]), "quant_format", None) == fmt
        assert LIN in q_q and FF in q_q  # the quantized layers were trained
        losses_ref, q_ref, _ = _train(comfy, _dequantized_file(comfy, stored, f"{fmt}_train_ref.safetensors"))
        # int8 also quantizes activations in its matmul: its own compute error, the floor for both runs
        tol = 1e-4 if algos[fmt]["storage_t"].is_floating_point else 2e-2
        assert _max_rel(losses_q, losses_ref) < tol, (fmt, losses_q, losses_ref)
        assert _q_diff(q_q, q_ref) < (1e-3 if tol == 1e-4 else 5e-2), fmt  # Adam amplifies fp32 rounding a little
        tested.append(fmt)
    assert "float8_e4m3fn" in tested

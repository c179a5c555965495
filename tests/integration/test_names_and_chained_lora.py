"""Two areas where a wrong result used to go unnoticed, checked in a real ComfyUI against float64:

* diffusers/PEFT module names without `.processor` (``...attn2.to_k``, ``...to_out.0``): every one of the
  four attention projections, with and without the ``unet.`` prefix, must patch exactly its own weight.
  All four have 320 output rows, so a name mapped to the wrong projection would still fit: only the
  values show it.
* PaRa + LoRA with a sequential merge (two stages) and α ≠ 1 through the nodes (Merge PaRa -> PaRa + LoRA),
  which share para_core.lora.combine_factors with the command line.
"""
from __future__ import annotations

import torch

from harness import bits_equal
from reference import assert_rel_close, parallel64, project64

BLOCK = "diffusion_model.input_blocks.1.1.transformer_blocks.0"
UP0 = "diffusion_model.output_blocks.0.1.transformer_blocks.0"
UP1 = "diffusion_model.output_blocks.1.1.transformer_blocks.0"


def _b(out: int, r: int, seed: int) -> torch.Tensor:
    return torch.randn(out, r, generator=torch.Generator().manual_seed(seed))


def test_peft_names_without_processor_patch_exactly_their_weight(comfy, sd15):
    names = {  # PEFT / diffusers file name -> the weight it must patch
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q": f"{BLOCK}.attn2.to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": f"{BLOCK}.attn2.to_k",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": f"{BLOCK}.attn2.to_v",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0": f"{BLOCK}.attn2.to_out.0",
        "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": f"{UP0}.attn1.to_k",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0": f"{UP1}.attn1.to_out.0",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q": f"{UP1}.attn1.to_q",
    }
    stages = {name: [_b(320, 3, 200 + i)] for i, name in enumerate(names)}
    comfy.write_para("peft_names.safetensors", stages)
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    p = g.node("PaRaLoader", model=ck.out(0), para_name="peft_names.safetensors", strength_model=1.0, strength_clip=1.0)
    g.node("PreviewAny", source=p.out(0))
    ui = comfy.run(g.finalize())
    assert ui[p.id]["text"] == ["model: 7 layers patched"]
    base = comfy.base_state_dict(sd15["model"])
    got = comfy.patched_state_dict(comfy.output(p.id, 0))
    for name, module in names.items():
        assert_rel_close(got[module + ".weight"], project64(base[module + ".weight"], stages[name]), name)
    touched = {m + ".weight" for m in names.values()}
    assert all(bits_equal(v, base[k]) for k, v in got.items() if k not in touched)


def test_chained_para_plus_lora_with_alphas_through_the_nodes(comfy, sd15):
    lin, conv = f"{BLOCK}.attn2.to_k", "diffusion_model.input_blocks.1.1.proj_in"  # 320 x 768, 320 x 320 x 1 x 1
    a = {lin: [_b(320, 24, 210)], conv: [_b(320, 16, 211)]}
    b = {lin: [_b(320, 20, 212)], conv: [_b(320, 12, 213)]}
    comfy.write_para("chain_a.safetensors", a)
    comfy.write_para("chain_b.safetensors", b)
    gen = torch.Generator().manual_seed(214)
    up, down = torch.randn(320, 4, generator=gen) * 0.1, torch.randn(4, 768, generator=gen) * 0.1
    comfy.write_safetensors("loras", "chain_lora.safetensors",
                            {f"{lin}.lora_up.weight": up, f"{lin}.lora_down.weight": down, f"{lin}.alpha": torch.tensor(2.0)})
    a1, a2 = 0.7, 1.3
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    la = g.node("PaRaLoader", model=ck.out(0), para_name="chain_a.safetensors", strength_model=1.0, strength_clip=1.0)
    lb = g.node("PaRaLoader", model=ck.out(0), para_name="chain_b.safetensors", strength_model=1.0, strength_clip=1.0)
    mg = g.node("PaRaMerge", para_a=la.out(2), para_b=lb.out(2), mode="sequential")
    cb = g.node("PaRaLoRACombine", model=ck.out(0), para=mg.out(0), lora_name="chain_lora.safetensors",
                alpha_para=a1, alpha_lora=a2, mode="stacked")
    g.node("PreviewAny", source=cb.out(0))
    ui = comfy.run(g.finalize())
    assert "1 with PaRa and LoRA, 1 PaRa only, 0 LoRA only" in ui[cb.id]["text"][0], ui[cb.id]
    base = comfy.base_state_dict(sd15["model"])
    got = comfy.patched_state_dict(comfy.output(cb.id, 0))
    # W_k = W_{k-1} - α1²·Q_kQ_kᵀW_{k-1}: the second stage acts on the first one's result
    w_lin = base[lin + ".weight"]
    lora_delta = a2 * a2 * (up.double() * 0.5) @ down.double()  # alpha 2 / rank 4
    ref = project64(w_lin, a[lin] + b[lin], a1 * a1) + lora_delta
    assert_rel_close(got[lin + ".weight"], ref, "PaRa chain + LoRA")
    w_conv = base[conv + ".weight"]
    assert_rel_close(got[conv + ".weight"], project64(w_conv, a[conv] + b[conv], a1 * a1), "PaRa chain only")
    # the two random subspaces overlap, so both stages projected from W0 would be a different weight
    parallel = parallel64(w_lin, a[lin] + b[lin], a1 * a1) + lora_delta
    assert float((parallel - ref).abs().max()) > 1e-4 * float(ref.abs().max())
    assert all(bits_equal(v, base[k]) for k, v in got.items() if k not in (lin + ".weight", conv + ".weight"))

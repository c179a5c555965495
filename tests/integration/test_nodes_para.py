"""The PaRa inference nodes inside a real ComfyUI: patched weights against float64 references.

Weights are read back as ComfyUI bakes them (load_models_gpu with force_patch_weights); references are
computed from the unpatched base weights in float64.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from harness import bits_equal
from reference import assert_rel_close, orth64, parallel64, project64, ulp, union64

LIN = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"  # Linear 320 x 768
FF = "diffusion_model.output_blocks.1.1.transformer_blocks.0.ff.net.0.proj"  # Linear 2560 x 320
CONV = "diffusion_model.input_blocks.0.0"  # Conv 320 x 4 x 3 x 3
CONV1 = "diffusion_model.input_blocks.1.1.proj_in"  # Conv 320 x 320 x 1 x 1
TEQ = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"  # 768 x 768, fp16 on CPU
TEFC = "text_encoders.clip_l.transformer.text_model.encoder.layers.11.mlp.fc1"  # 3072 x 768
OUT = {LIN: 320, FF: 2560, CONV: 320, CONV1: 320, TEQ: 768, TEFC: 3072}


def wkey(module: str) -> str:
    """The model state-dict key of a module (UNet keys keep their prefix; CLIP keys drop `text_encoders.`)."""
    return (module[len("text_encoders."):] if module.startswith("text_encoders.") else module) + ".weight"


def rand_b(out: int, r: int, seed: int) -> torch.Tensor:
    return torch.randn(out, r, generator=torch.Generator().manual_seed(seed))


def assert_fp32_close(actual: torch.Tensor, ref64: torch.Tensor, what: str):
    assert actual.dtype == torch.float32, what
    assert_rel_close(actual, ref64, what)


def assert_within_ulp(actual: torch.Tensor, ref64: torch.Tensor, what: str, n: float = 1.0):
    """Every element within n units in the last place of the storage dtype (rounding to storage is the only error)."""
    err = (actual.to(torch.float64) - ref64).abs()
    bound = n * ulp(ref64, actual.dtype) + 1e-7 * float(ref64.abs().max())
    bad = int((err > bound).sum())
    assert bad == 0, f"{what}: {bad} of {err.numel()} elements off by more than {n} ulp of {actual.dtype} (max err {float(err.max()):.3e})"


def loader_graph(comfy, ckpt, para_name, strength_model=1.0, strength_clip=1.0, with_clip=True):
    g = comfy.graph()
    ckpt_node = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    kw = {"clip": ckpt_node.out(1)} if with_clip else {}
    para = g.node("PaRaLoader", model=ckpt_node.out(0), para_name=para_name, strength_model=strength_model,
                  strength_clip=strength_clip, **kw)
    g.node("PreviewAny", source=para.out(0))
    return g, ckpt_node, para


@pytest.fixture(scope="module")
def base(comfy, sd15):
    """Unpatched base weights of the tiny SD1.5 (UNet fp32, CLIP fp16 on CPU)."""
    unet = comfy.base_state_dict(sd15["model"])
    clip = comfy.base_state_dict(sd15["clip"])
    return {"unet": unet, "clip": clip}


def w0(base, module):
    k = wkey(module)
    return (base["clip"] if module.startswith("text_encoders.") else base["unet"])[k]


# ---- Load PaRa -----------------------------------------------------------------------------------
def test_load_patches_unet_and_clip_against_float64(comfy, sd15, base):
    stages = {m: [rand_b(OUT[m], r, i)] for i, (m, r) in enumerate([(LIN, 4), (FF, 8), (CONV, 3), (CONV1, 4), (TEQ, 4), (TEFC, 2)])}
    comfy.write_para("subject.safetensors", stages)
    g, _, para = loader_graph(comfy, sd15["ckpt"], "subject.safetensors")
    ui = comfy.run(g.finalize())
    assert ui[para.id]["text"] == ["model: 4 layers patched, clip: 2 layers patched"]
    model, clip = comfy.output(para.id, 0), comfy.output(para.id, 1)
    assert model is not sd15["model"] and clip is not sd15["clip"]
    unet = comfy.patched_state_dict(model)
    te = comfy.patched_state_dict(clip)
    for m in (LIN, FF, CONV, CONV1):
        assert_fp32_close(unet[wkey(m)], project64(w0(base, m), stages[m]), m)
    for m in (TEQ, TEFC):
        assert te[wkey(m)].dtype == torch.float16
        assert_within_ulp(te[wkey(m)], project64(w0(base, m), stages[m]), m)
    patched = {wkey(m) for m in stages}
    for sd, ref in ((unet, base["unet"]), (te, base["clip"])):
        for k, v in sd.items():
            if k not in patched:
                assert bits_equal(v, ref[k]), f"{k} changed but has no PaRa"
    # unloading restored the base bit-exactly (ComfyUI's backups), and the input model carries no patches
    assert all(bits_equal(v, base["unet"][k]) for k, v in comfy.base_state_dict(sd15["model"]).items())
    assert all(bits_equal(v, base["clip"][k]) for k, v in comfy.base_state_dict(sd15["clip"]).items())
    assert not sd15["model"].patches and not sd15["clip"].patcher.patches
    # the PARA output is the parsed file
    assert sorted(comfy.output(para.id, 2).stages) == sorted(stages)


def test_strength_zero_is_bit_identical_and_strength_is_linear(comfy, sd15, base):
    stages = {LIN: [rand_b(320, 4, 10)], TEQ: [rand_b(768, 4, 11)]}
    comfy.write_para("strength.safetensors", stages)
    g, _, para = loader_graph(comfy, sd15["ckpt"], "strength.safetensors", 0.0, 0.0)
    ui = comfy.run(g.finalize())
    assert "model: 0 layers patched, clip: 0 layers patched" in ui[para.id]["text"][0]
    for patcher, ref in ((comfy.output(para.id, 0), base["unet"]), (comfy.output(para.id, 1), base["clip"])):
        for k, v in comfy.patched_state_dict(patcher).items():
            assert bits_equal(v, ref[k]), k
    for s in (0.5, -1.0, 2.0):
        g, _, para = loader_graph(comfy, sd15["ckpt"], "strength.safetensors", s, s)
        comfy.run(g.finalize())
        got = comfy.patched_state_dict(comfy.output(para.id, 0), [wkey(LIN)])[wkey(LIN)]
        assert_fp32_close(got, project64(w0(base, LIN), stages[LIN], s), f"{LIN} at strength {s}")
        got = comfy.patched_state_dict(comfy.output(para.id, 1), [wkey(TEQ)])[wkey(TEQ)]
        assert_within_ulp(got, project64(w0(base, TEQ), stages[TEQ], s), f"{TEQ} at strength {s}")


def test_adapter_inside_comfy_calculate_weight(comfy, sd15):
    """ComfyUI's own comfy.lora.calculate_weight: strength 0 is a no-op; an fp16 weight and an offset slice are edited in place."""
    import comfy.lora as clora
    comfy.write_para("adapter.safetensors", {LIN: [rand_b(320, 4, 20)]})
    g, _, para = loader_graph(comfy, sd15["ckpt"], "adapter.safetensors", with_clip=False)
    comfy.run(g.finalize())
    patch = comfy.output(para.id, 0).patches[wkey(LIN)]
    assert len(patch) == 1
    adapter = patch[0][1]
    w = torch.randn(320, 768, generator=torch.Generator().manual_seed(1))
    out = clora.calculate_weight([(0.0, adapter, 1.0, None, None)], w.clone(), "k")
    assert torch.equal(out, w)
    # fp16 weight (what ComfyUI passes on CUDA): computed in fp32, rounded once to fp16
    w16 = w.half()
    out = clora.calculate_weight([(1.0, adapter, 1.0, None, None)], w16.clone(), "k")
    assert out.dtype == torch.float16
    q = adapter.weights[0]
    assert_within_ulp(out, project64(w16, [q]), "fp16 weight")
    # an offset patch: ComfyUI passes weight.narrow(...) and discards the return value
    big = torch.randn(960, 768, generator=torch.Generator().manual_seed(2))
    out = clora.calculate_weight([(1.0, adapter, 1.0, (0, 320, 320), None)], big.clone(), "k")
    assert torch.equal(out[:320], big[:320]) and torch.equal(out[640:], big[640:])
    assert_fp32_close(out[320:640], project64(big[320:640], [q]), "offset slice")
    # outside inference mode with grad enabled (a trainer loading a PaRa model): the adapter's Q was made in
    # inference mode by the executor, and ComfyUI's weight copy may require grad
    assert adapter.weights[0].is_inference()
    with torch.inference_mode(False), torch.enable_grad():
        wg = w.clone().requires_grad_(True)
        out = clora.calculate_weight([(1.0, adapter, 1.0, None, None)], wg * 1.0, "k")
    assert_fp32_close(out.detach(), project64(w, [q]), "grad mode")


def test_chained_loaders_are_the_sequential_merge_and_lora_after_para(comfy, sd15, base):
    b1, b2 = rand_b(320, 4, 30), rand_b(320, 4, 31)
    b2[:, :2] = b1[:, :2] + 0.1 * b2[:, :2]  # overlapping subspaces: chain != independent sum
    comfy.write_para("chain_1.safetensors", {LIN: [b1], CONV: [rand_b(320, 2, 32)]})
    comfy.write_para("chain_2.safetensors", {LIN: [b2]})
    up = rand_b(320, 4, 33) * 0.05
    down = torch.randn(4, 768, generator=torch.Generator().manual_seed(34)) * 0.05
    comfy.write_safetensors("loras", "style_after.safetensors", {f"{LIN}.lora_up.weight": up, f"{LIN}.lora_down.weight": down,
                                                                  f"{LIN}.alpha": torch.tensor(2.0)})
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    p1 = g.node("PaRaLoader", model=ck.out(0), para_name="chain_1.safetensors", strength_model=1.0, strength_clip=1.0)
    p2 = g.node("PaRaLoader", model=p1.out(0), para_name="chain_2.safetensors", strength_model=1.0, strength_clip=1.0)
    lo = g.node("LoraLoaderModelOnly", model=p2.out(0), lora_name="style_after.safetensors", strength_model=1.0)
    g.node("PreviewAny", source=lo.out(0))
    g.node("PreviewAny", source=p2.out(0))
    comfy.run(g.finalize())
    seq = project64(w0(base, LIN), [b1, b2])
    got = comfy.patched_state_dict(comfy.output(p2.id, 0), [wkey(LIN), wkey(CONV)])
    assert_fp32_close(got[wkey(LIN)], seq, "chain")
    independent = parallel64(w0(base, LIN), [b1, b2])
    assert float((got[wkey(LIN)].double() - independent).abs().max()) > 1e-3 * float(w0(base, LIN).abs().max())
    got = comfy.patched_state_dict(comfy.output(lo.id, 0), [wkey(LIN)])[wkey(LIN)]
    assert_fp32_close(got, seq + (2.0 / 4) * up.double() @ down.double(), "PaRa, then ComfyUI's LoRA")


# ---- Merge PaRa ----------------------------------------------------------------------------------
def test_merge_sequential_and_union_against_float64(comfy, sd15, base):
    a = {LIN: [rand_b(320, 4, 40)], TEQ: [rand_b(768, 2, 41)], CONV1: [rand_b(320, 3, 42)]}
    b = {LIN: [rand_b(320, 3, 43)], TEQ: [rand_b(768, 2, 44)], FF: [rand_b(2560, 2, 45)]}
    b[LIN][0][:, 0] = a[LIN][0][:, 0] + 0.5 * b[LIN][0][:, 0]  # overlapping (cos ≈ 0.9), still 7 independent directions
    comfy.write_para("merge_a.safetensors", a)
    comfy.write_para("merge_b.safetensors", b)
    results = {}
    for mode in ("sequential", "union"):
        g = comfy.graph()
        ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
        la = g.node("PaRaLoader", model=ck.out(0), para_name="merge_a.safetensors", strength_model=1.0, strength_clip=1.0)
        lb = g.node("PaRaLoader", model=ck.out(0), para_name="merge_b.safetensors", strength_model=1.0, strength_clip=1.0)
        mg = g.node("PaRaMerge", para_a=la.out(2), para_b=lb.out(2), mode=mode)
        ap = g.node("PaRaApply", model=ck.out(0), clip=ck.out(1), para=mg.out(0), strength_model=1.0, strength_clip=1.0)
        g.node("PreviewAny", source=ap.out(0))
        ui = comfy.run(g.finalize())
        text = ui[mg.id]["text"][0]
        assert text.startswith("overlap: 2 shared layers: mean cos² of principal angles") and f"\n{mode} merge: 4 layers, rank " in text, text
        assert "model: 3 layers patched, clip: 1 layer patched" in ui[ap.id]["text"][0]
        results[mode] = (comfy.patched_state_dict(comfy.output(ap.id, 0)), comfy.patched_state_dict(comfy.output(ap.id, 1)))
    unet, te = results["sequential"]
    assert_fp32_close(unet[wkey(LIN)], project64(w0(base, LIN), a[LIN] + b[LIN]), "sequential LIN")
    assert_fp32_close(unet[wkey(CONV1)], project64(w0(base, CONV1), a[CONV1]), "sequential, only in a")
    assert_fp32_close(unet[wkey(FF)], project64(w0(base, FF), b[FF]), "sequential, only in b")
    assert_within_ulp(te[wkey(TEQ)], project64(w0(base, TEQ), a[TEQ] + b[TEQ]), "sequential TEQ")
    unet, te = results["union"]
    qu = union64(a[LIN] + b[LIN])
    assert qu.shape[1] == 7
    assert_fp32_close(unet[wkey(LIN)], project64(w0(base, LIN), [qu]), "union LIN")
    assert_within_ulp(te[wkey(TEQ)], project64(w0(base, TEQ), [union64(a[TEQ] + b[TEQ])]), "union TEQ")
    assert_fp32_close(unet[wkey(FF)], project64(w0(base, FF), b[FF]), "union, only in b")
    # the two modes differ where the subspaces overlap
    seq = results["sequential"][0][wkey(LIN)].double()
    assert float((seq - unet[wkey(LIN)].double()).abs().max()) > 1e-4 * float(seq.abs().max())


# ---- PaRa + LoRA ---------------------------------------------------------------------------------
def _lora_file(comfy, name, layers: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]], **extra):
    sd = {}
    for module, (up, down, alpha) in layers.items():
        sd[f"{module}.lora_up.weight"] = up
        sd[f"{module}.lora_down.weight"] = down
        if alpha is not None:
            sd[f"{module}.alpha"] = torch.tensor(alpha)
    sd.update(extra)
    return comfy.write_safetensors("loras", name, sd)


@pytest.mark.parametrize("mode", ["stacked", "product"])
def test_para_lora_combine_against_float64(comfy, sd15, base, mode):
    g_ = torch.Generator().manual_seed(50)
    para = {LIN: [rand_b(320, 4, 51)], CONV1: [rand_b(320, 4, 52)], TEQ: [rand_b(768, 4, 53)]}
    comfy.write_para("combo.safetensors", para)
    lora = {  # LIN: both; FF: LoRA only; CONV1: PaRa only; TEQ (clip): both; alpha 2 at rank 4 -> scale 0.5
        LIN: (torch.randn(320, 4, generator=g_) * 0.1, torch.randn(4, 768, generator=g_) * 0.1, 2.0),
        FF: (torch.randn(2560, 4, generator=g_) * 0.1, torch.randn(4, 320, generator=g_) * 0.1, None),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (torch.randn(768, 4, generator=g_) * 0.1,
                                                                  torch.randn(4, 768, generator=g_) * 0.1, 4.0),
    }
    _lora_file(comfy, "style.safetensors", lora)
    a1, a2 = 0.8, 1.3
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    lp = g.node("PaRaLoader", model=ck.out(0), para_name="combo.safetensors", strength_model=1.0, strength_clip=1.0)
    cb = g.node("PaRaLoRACombine", model=ck.out(0), clip=ck.out(1), para=lp.out(2), lora_name="style.safetensors",
                alpha_para=a1, alpha_lora=a2, mode=mode)
    g.node("PreviewAny", source=cb.out(0))
    ui = comfy.run(g.finalize())
    text = ui[cb.id]["text"][0]
    assert "model: 3 layers patched, clip: 1 layer patched" in text and "2 with PaRa and LoRA, 1 PaRa only, 1 LoRA only" in text, text
    unet = comfy.patched_state_dict(comfy.output(cb.id, 0))
    te = comfy.patched_state_dict(comfy.output(cb.id, 1))

    def expected(module, lora_up, lora_down, scale):
        w = w0(base, module).double().reshape(OUT[module], -1)
        q = orth64(para[module][0])
        b, a = lora_up.double() * scale, lora_down.double()
        if mode == "stacked":
            dw = -a1 * a1 * q @ (q.T @ w) + a2 * a2 * b @ a
        else:
            dw = (-a1 * q + a2 * b) @ (a1 * q.T @ w + a2 * a)
        return (w + dw).reshape(w0(base, module).shape)

    up, down, _ = lora[LIN]
    assert_fp32_close(unet[wkey(LIN)], expected(LIN, up, down, 0.5), f"{mode} LIN")
    up, down, _ = lora["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    assert_within_ulp(te[wkey(TEQ)], expected(TEQ, up, down, 1.0), f"{mode} TEQ", n=1.0)
    up, down, _ = lora[FF]
    assert_fp32_close(unet[wkey(FF)], w0(base, FF).double() + a2 * a2 * up.double() @ down.double(), f"{mode} LoRA only")
    assert_fp32_close(unet[wkey(CONV1)], project64(w0(base, CONV1), para[CONV1], a1 * a1), f"{mode} PaRa only")
    touched = {wkey(m) for m in (LIN, FF, CONV1)}
    assert all(bits_equal(v, base["unet"][k]) for k, v in unet.items() if k not in touched)


def test_para_lora_combine_refuses_what_it_cannot_combine(comfy, sd15):
    comfy.write_para("combo_r4.safetensors", {LIN: [rand_b(320, 4, 60)]})
    up, down = rand_b(320, 2, 61), torch.randn(2, 768)
    _lora_file(comfy, "rank2.safetensors", {LIN: (up, down, None)})
    _lora_file(comfy, "dora.safetensors", {LIN: (up, down, None)}, **{f"{LIN}.dora_scale": torch.ones(320, 1)})
    _lora_file(comfy, "locon_mid.safetensors", {CONV1: (torch.randn(320, 2, 1, 1), torch.randn(2, 320, 1, 1), None)},
               **{f"{CONV1}.lora_mid.weight": torch.randn(2, 2, 1, 1)})

    def prompt(lora_name, mode):
        g = comfy.graph()
        ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
        lp = g.node("PaRaLoader", model=ck.out(0), para_name="combo_r4.safetensors", strength_model=1.0, strength_clip=1.0)
        cb = g.node("PaRaLoRACombine", model=ck.out(0), para=lp.out(2), lora_name=lora_name, alpha_para=1.0,
                    alpha_lora=1.0, mode=mode)
        g.node("PreviewAny", source=cb.out(0))
        return g.finalize()

    msg = comfy.run_failing(prompt("rank2.safetensors", "product"))
    assert "PaRaLoRACombine" in msg and "product" in msg and "r=4" in msg and "r=2" in msg and "stacked" in msg, msg
    msg = comfy.run_failing(prompt("dora.safetensors", "stacked"))
    assert "dora.safetensors" in msg and "DoRA" in msg and "1 layers are not plain LoRA" in msg, msg
    msg = comfy.run_failing(prompt("locon_mid.safetensors", "stacked"))
    assert "locon_mid.safetensors" in msg and "LoCon mid" in msg, msg
    torch.save({f"{LIN}.lora_up.weight": up}, comfy.path("loras", "pickled.safetensors"))
    msg = comfy.run_failing(prompt("pickled.safetensors", "stacked"))
    assert "cannot read LoRA file" in msg and "pickled.safetensors" in msg and "\n" not in msg, msg
    comfy.run(prompt("rank2.safetensors", "stacked"))  # the same graph with a valid mode runs


# ---- key naming ----------------------------------------------------------------------------------
def test_kohya_and_diffusers_names(comfy, sd15, base):
    names = {  # file module name -> the model module it must patch
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": LIN,  # kohya, from the native path
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q",  # kohya, diffusers path
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v":
            "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v",  # diffusers/PEFT (no `.processor`)
        "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.processor.to_out":
            "diffusion_model.output_blocks.1.1.transformer_blocks.0.attn1.to_out.0",  # diffusers, processor form
        "unet.up_blocks.0.resnets.0.conv1": "diffusion_model.output_blocks.0.0.in_layers.2",  # diffusers conv
        "lora_te_text_model_encoder_layers_0_self_attn_v_proj":
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.v_proj",  # kohya TE
        "text_encoder.text_model.encoder.layers.1.mlp.fc2":
            "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc2",  # diffusers TE
    }
    shapes = {**{k: v.shape for k, v in base["unet"].items()}, **{k: v.shape for k, v in base["clip"].items()}}
    stages = {name: [rand_b(shapes[wkey(m)][0], 3, 70 + i)] for i, (name, m) in enumerate(names.items())}
    comfy.write_para("named.safetensors", stages)
    g, _, para = loader_graph(comfy, sd15["ckpt"], "named.safetensors")
    ui = comfy.run(g.finalize())
    assert ui[para.id]["text"] == ["model: 5 layers patched, clip: 2 layers patched"]
    unet = comfy.patched_state_dict(comfy.output(para.id, 0))
    te = comfy.patched_state_dict(comfy.output(para.id, 1))
    for name, m in names.items():
        if m.startswith("text_encoders."):
            assert_within_ulp(te[wkey(m)], project64(w0(base, m), stages[name]), name)
        else:
            assert_fp32_close(unet[wkey(m)], project64(w0(base, m), stages[name]), name)
    touched = {wkey(m) for m in names.values()}
    assert all(bits_equal(v, base["unet"][k]) for k, v in unet.items() if k not in touched)


def test_text_encoder_modules_without_clip_are_reported_as_skipped(comfy, sd15, base):
    comfy.write_para("te_only_partly.safetensors", {LIN: [rand_b(320, 2, 80)], TEQ: [rand_b(768, 2, 81)]})
    g, _, para = loader_graph(comfy, sd15["ckpt"], "te_only_partly.safetensors", with_clip=False)
    ui = comfy.run(g.finalize())
    text = ui[para.id]["text"][0]
    assert "model: 1 layer patched" in text and "skipped 1 not in this model" in text and TEQ in text and "no CLIP connected" in text
    assert comfy.output(para.id, 1) is None
    comfy.write_para("te_only.safetensors", {TEQ: [rand_b(768, 2, 82)]})
    g, _, para = loader_graph(comfy, sd15["ckpt"], "te_only.safetensors", with_clip=False)
    msg = comfy.run_failing(g.finalize())
    assert "te_only.safetensors" in msg and "connect the CLIP input" in msg, msg


# ---- other architectures and storage -------------------------------------------------------------
def test_sd3_native_fused_and_diffusers_offsets(comfy):
    name = comfy.sd3_unet()
    qkv0 = "diffusion_model.joint_blocks.0.x_block.attn.qkv"  # native: the whole fused 384-row weight
    stages = {qkv0: [rand_b(384, 4, 90)],
              "transformer.transformer_blocks.1.attn.to_q": [rand_b(128, 3, 91)],  # rows 0..128 of block 1's qkv
              "transformer.transformer_blocks.1.attn.to_v": [rand_b(128, 2, 92)],  # rows 256..384
              "transformer.transformer_blocks.1.ff.net.0.proj": [rand_b(512, 2, 93)]}
    comfy.write_para("sd3.safetensors", stages)
    g = comfy.graph()
    ld = g.node("UNETLoader", unet_name=name, weight_dtype="default")
    p = g.node("PaRaLoader", model=ld.out(0), para_name="sd3.safetensors", strength_model=1.0, strength_clip=1.0)
    g.node("PreviewAny", source=p.out(0))
    ui = comfy.run(g.finalize())
    assert ui[p.id]["text"] == ["model: 4 layers patched"]
    base = comfy.base_state_dict(comfy.output(ld.id, 0))
    got = comfy.patched_state_dict(comfy.output(p.id, 0))
    k0, k1 = f"{qkv0}.weight", "diffusion_model.joint_blocks.1.x_block.attn.qkv.weight"
    assert_fp32_close(got[k0], project64(base[k0], stages[qkv0]), "native fused qkv")
    assert_fp32_close(got[k1][:128], project64(base[k1][:128], stages["transformer.transformer_blocks.1.attn.to_q"]), "to_q rows")
    assert torch.equal(got[k1][128:256], base[k1][128:256]), "to_k rows must be untouched"
    assert_fp32_close(got[k1][256:], project64(base[k1][256:], stages["transformer.transformer_blocks.1.attn.to_v"]), "to_v rows")
    kff = "diffusion_model.joint_blocks.1.x_block.mlp.fc1.weight"
    assert_fp32_close(got[kff], project64(base[kff], stages["transformer.transformer_blocks.1.ff.net.0.proj"]), "mlp")
    assert all(bits_equal(v, base[k]) for k, v in got.items() if k not in (k0, k1, kff))


def test_flux_fused_qkv_offsets(comfy):
    """Flux is built directly (detection needs hidden 3072); the node is called as ComfyUI calls it (V3 execute)."""
    model = comfy.flux_model()
    h = 64
    stages = {"transformer.transformer_blocks.0.attn.to_k": [rand_b(h, 3, 100)],  # img_attn.qkv rows 64..128
              "transformer.transformer_blocks.0.attn.add_q_proj": [rand_b(h, 2, 101)],  # txt_attn.qkv rows 0..64
              "diffusion_model.single_blocks.0.linear1_qkv": [rand_b(3 * h, 4, 102)],  # linear1 rows 0..192
              "transformer.single_transformer_blocks.0.proj_mlp": [rand_b(4 * h, 2, 103)],  # linear1 rows 192..448
              "transformer.norm_out.linear": [rand_b(2 * h, 3, 104)]}  # adaLN_modulation with diffusers' shift/scale swap
    comfy.write_para("flux.safetensors", stages)
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["PaRaLoader"]
    with torch.inference_mode():
        out = loader.execute(model=model, para_name="flux.safetensors", strength_model=1.0, strength_clip=1.0)
    patched = out.args[0]
    assert "model: 5 layers patched" in out.ui.as_dict()["text"][0]
    base = comfy.base_state_dict(model)
    got = comfy.patched_state_dict(patched)
    img, txt, lin = ("diffusion_model.double_blocks.0.img_attn.qkv.weight", "diffusion_model.double_blocks.0.txt_attn.qkv.weight",
                     "diffusion_model.single_blocks.0.linear1.weight")
    assert torch.equal(got[img][:h], base[img][:h]) and torch.equal(got[img][2 * h:], base[img][2 * h:])
    assert_fp32_close(got[img][h:2 * h], project64(base[img][h:2 * h], stages["transformer.transformer_blocks.0.attn.to_k"]), "img k")
    assert torch.equal(got[txt][h:], base[txt][h:])
    assert_fp32_close(got[txt][:h], project64(base[txt][:h], stages["transformer.transformer_blocks.0.attn.add_q_proj"]), "txt q")
    assert_fp32_close(got[lin][:3 * h], project64(base[lin][:3 * h], stages["diffusion_model.single_blocks.0.linear1_qkv"]), "linear1 qkv")
    assert_fp32_close(got[lin][3 * h:], project64(base[lin][3 * h:], stages["transformer.single_transformer_blocks.0.proj_mlp"]), "mlp")
    # diffusers orders the final modulation (scale, shift), ComfyUI (shift, scale): the basis rows are in the
    # file's order, so the projection happens on the swapped weight and is swapped back
    ada = "diffusion_model.final_layer.adaLN_modulation.1.weight"
    swap = lambda t: torch.cat([t[h:], t[:h]])  # noqa: E731
    assert_fp32_close(got[ada], swap(project64(swap(base[ada]), stages["transformer.norm_out.linear"])), "norm_out")
    assert all(bits_equal(v, base[k]) for k, v in got.items() if k not in (img, txt, lin, ada))


def test_fp8_storage_patches_within_fp8_rounding(comfy):
    name = comfy.sd15_unet()
    stages = {LIN: [rand_b(320, 32, 110)], FF: [rand_b(2560, 64, 111)]}  # large ranks: a change far above fp8 noise
    comfy.write_para("fp8.safetensors", stages)
    g = comfy.graph()
    ld = g.node("UNETLoader", unet_name=name, weight_dtype="fp8_e4m3fn")
    p = g.node("PaRaLoader", model=ld.out(0), para_name="fp8.safetensors", strength_model=1.0, strength_clip=1.0)
    g.node("PreviewAny", source=p.out(0))
    comfy.run(g.finalize())
    base = comfy.base_state_dict(comfy.output(ld.id, 0))
    got = comfy.patched_state_dict(comfy.output(p.id, 0))
    for m in (LIN, FF):
        k = wkey(m)
        assert got[k].dtype == torch.float8_e4m3fn
        ref = project64(base[k].to(torch.float32), stages[m])
        # ComfyUI's stochastic fp8 rounding picks one of the two fp8 neighbours, but it takes the exponent
        # from an fp16 log2, which can land one step further just below a power of two: 2 ulp
        assert_within_ulp(got[k], ref, f"fp8 {m}", n=2.0)
        change = float((ref - base[k].double()).norm() / base[k].double().norm())
        err = float((got[k].double() - ref).norm() / ref.norm())
        assert change > 0.15 and err < 0.06, (change, err)
    assert all(bits_equal(v, base[k]) for k, v in got.items() if k not in (wkey(LIN), wkey(FF)))


# ---- sampling --------------------------------------------------------------------------------------
def test_para_changes_the_generated_image_and_unpatching_restores_it(comfy, sd15):
    comfy.write_para("visible.safetensors", {
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": [rand_b(320, 32, 120)],
        "diffusion_model.output_blocks.1.1.transformer_blocks.0.ff.net.2": [rand_b(320, 32, 121)],
        "diffusion_model.out.2": [rand_b(4, 2, 122)],
        TEQ: [rand_b(768, 16, 123)]})

    def generate(with_para: bool, fresh_cache: bool = False):
        g = comfy.graph()
        ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
        model, clip = ck.out(0), ck.out(1)
        if with_para:
            p = g.node("PaRaLoader", model=model, clip=clip, para_name="visible.safetensors", strength_model=1.0, strength_clip=1.0)
            model, clip = p.out(0), p.out(1)
        pos = g.node("CLIPTextEncode", clip=clip, text="a photo of sks dog")
        neg = g.node("CLIPTextEncode", clip=clip, text="")
        lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
        ks = g.node("KSampler", model=model, positive=pos.out(0), negative=neg.out(0), latent_image=lat.out(0), seed=7,
                    steps=2, cfg=4.0, sampler_name="euler", scheduler="normal", denoise=1.0)
        dec = g.node("VAEDecode", samples=ks.out(0), vae=ck.out(2))
        preview = g.node("PreviewImage", images=dec.out(0))
        ui = comfy.run(g.finalize(), fresh_cache=fresh_cache)
        assert ui[preview.id]["images"]
        return comfy.output(ks.id, 0)["samples"].clone(), comfy.output(dec.id, 0).clone()

    lat0, img0 = generate(False)
    lat1, img1 = generate(True)
    lat2, img2 = generate(False, fresh_cache=True)  # everything again, from a freshly loaded checkpoint
    assert torch.isfinite(lat1).all() and torch.isfinite(img1).all()
    assert img0.shape == (1, 64, 64, 3)
    assert float((lat1 - lat0).abs().mean()) > 0.05 * float(lat0.abs().mean())
    assert float((img1 - img0).abs().max()) > 1e-3
    # the session's shared model, patched and unpatched by every test before, samples exactly like a fresh load
    assert torch.equal(lat2, lat0) and torch.equal(img2, img0)


# ---- bad files -------------------------------------------------------------------------------------
def _write_pickle(path):
    torch.save({f"{LIN}.para_q": torch.randn(320, 4)}, path)


def test_bad_files_fail_cleanly_and_the_next_prompt_succeeds(comfy, sd15):
    good = {LIN: [rand_b(320, 4, 130)]}
    cases = {
        "pickle": (lambda p: _write_pickle(p), "pickle"),
        "wrong_shape": (lambda p: comfy.write_para(os.path.basename(p), {LIN: [rand_b(999, 4, 131)], FF: [rand_b(7, 2, 132)],
                                                                          CONV: [rand_b(320, 2, 133)]}),
                        "does not fit this model"),
        "lora": (lambda p: comfy.write_safetensors("para", os.path.basename(p), {f"{LIN}.lora_up.weight": torch.randn(320, 4),
                                                                                  f"{LIN}.lora_down.weight": torch.randn(4, 768)}),
                 "LoRA"),
        "nan": (lambda p: comfy.write_safetensors("para", os.path.basename(p), {f"{LIN}.para_q": torch.full((320, 4), float("nan"))}),
                "NaN"),
        "no_match": (lambda p: comfy.write_para(os.path.basename(p), {"diffusion_model.not_a_layer": [rand_b(8, 2, 134)]}),
                     "matches no layer"),
        "same_layer_twice": (lambda p: comfy.write_para(os.path.basename(p), {
            LIN: [rand_b(320, 2, 135)], "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": [rand_b(320, 2, 136)]}),
            "both name the layer"),
    }
    for case, (write, expect) in cases.items():
        name = f"bad_{case}.safetensors"
        path = comfy.path("para", name)
        if os.path.exists(path):
            os.remove(path)
        write(path)
        g, _, para = loader_graph(comfy, sd15["ckpt"], name)
        prompt = g.finalize()
        msg = comfy.run_failing(prompt)
        assert msg.startswith(f"PaRaLoader (node {para.id}): ValueError:"), msg
        assert path in msg or name in msg, msg
        assert expect in msg, msg
        assert "\n" not in msg, f"one line expected: {msg}"
        if case == "wrong_shape":
            assert "2 shape mismatches" in msg and "(999, 4)" in msg and "weight out-dim 320" in msg, msg
        # fix the file in place: the same graph runs now (the file cache is keyed by mtime and size)
        os.remove(path)
        comfy.write_para(name, good)
        ui = comfy.run(prompt)
        assert "model: 1 layer patched" in ui[para.id]["text"][0]


def test_missing_para_folder_file_is_a_validation_error(comfy, sd15):
    g, _, _ = loader_graph(comfy, sd15["ckpt"], "does_not_exist.safetensors")
    msg = comfy.run_failing(g.finalize())
    assert msg.startswith("validation failed") and "does_not_exist.safetensors" in msg, msg


# ---- Save PaRa -------------------------------------------------------------------------------------
def test_save_numbered_reload_byte_exact_and_never_overwrite(comfy, sd15):
    comfy.write_para("to_save.safetensors", {LIN: [rand_b(320, 4, 140)], TEQ: [rand_b(768, 2, 141)]},
                     metadata={"name": "to_save"})
    out_dir = os.path.join(comfy.dirs["output"], "para")
    os.makedirs(out_dir, exist_ok=True)
    squatter = os.path.join(out_dir, "saved_test_00001_.safetensors")
    with open(squatter, "wb") as f:
        f.write(b"not mine")

    def save(strength):  # a different upstream input, or ComfyUI would reuse the cached (already saved) result
        g = comfy.graph()
        ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
        lp = g.node("PaRaLoader", model=ck.out(0), para_name="to_save.safetensors", strength_model=strength, strength_clip=1.0)
        sv = g.node("PaRaSave", para=lp.out(2), filename_prefix="para/saved_test")
        return comfy.run(g.finalize())[sv.id]["text"][0]

    assert save(1.0).startswith("saved para/saved_test_00002_.safetensors")
    assert save(0.5).startswith("saved para/saved_test_00003_.safetensors")
    with open(squatter, "rb") as f:
        assert f.read() == b"not mine"
    with open(comfy.path("para", "to_save.safetensors"), "rb") as f:
        original = f.read()
    for n in (2, 3):
        with open(os.path.join(out_dir, f"saved_test_{n:05}_.safetensors"), "rb") as f:
            assert f.read() == original
    assert not [f for f in os.listdir(out_dir) if f.endswith(".partial")]
    # output/para is a `para` folder: the saved file loads by name
    g, _, para = loader_graph(comfy, sd15["ckpt"], "saved_test_00002_.safetensors")
    ui = comfy.run(g.finalize())
    assert "model: 1 layer patched, clip: 1 layer patched" in ui[para.id]["text"][0]


def test_saved_merge_reloads_to_the_same_weights(comfy, sd15):
    comfy.write_para("sm_a.safetensors", {LIN: [rand_b(320, 3, 150)]})
    comfy.write_para("sm_b.safetensors", {LIN: [rand_b(320, 2, 151)], CONV: [rand_b(320, 2, 152)]})
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    la = g.node("PaRaLoader", model=ck.out(0), para_name="sm_a.safetensors", strength_model=1.0, strength_clip=1.0)
    lb = g.node("PaRaLoader", model=ck.out(0), para_name="sm_b.safetensors", strength_model=1.0, strength_clip=1.0)
    mg = g.node("PaRaMerge", para_a=la.out(2), para_b=lb.out(2), mode="sequential")
    ap = g.node("PaRaApply", model=ck.out(0), para=mg.out(0), strength_model=1.0, strength_clip=1.0)
    sv = g.node("PaRaSave", para=mg.out(0), filename_prefix="para/merged_ab")
    g.node("PreviewAny", source=ap.out(0))
    ui = comfy.run(g.finalize())
    assert ui[sv.id]["text"][0].startswith("saved para/merged_ab_00001_.safetensors")
    direct = comfy.patched_state_dict(comfy.output(ap.id, 0))
    g2, _, para = loader_graph(comfy, sd15["ckpt"], "merged_ab_00001_.safetensors", with_clip=False)
    comfy.run(g2.finalize())
    reloaded = comfy.patched_state_dict(comfy.output(para.id, 0))
    assert all(torch.equal(direct[k], reloaded[k]) for k in direct)
    assert not torch.equal(direct[wkey(LIN)], comfy.base_state_dict(sd15["model"], [wkey(LIN)])[wkey(LIN)])


# ---- the pack's surface ------------------------------------------------------------------------------
def test_node_contract_and_tooltips(comfy):
    expected = {
        "PaRaLoader": (["model", "para_name", "strength_model", "strength_clip"], ["clip", "block_strength"], ["MODEL", "CLIP", "PARA"]),
        "PaRaLoadFile": (["para_name"], [], ["PARA"]),
        "PaRaApply": (["model", "para", "strength_model", "strength_clip"], ["clip", "block_strength"], ["MODEL", "CLIP"]),
        "PaRaHook": (["para", "strength_model", "strength_clip"], ["block_strength", "prev_hooks"], ["HOOKS"]),
        "PaRaMerge": (["para_a", "para_b", "mode"], [], ["PARA"]),
        "PaRaLoRACombine": (["model", "para", "lora_name", "alpha_para", "alpha_lora", "mode"], ["clip"], ["MODEL", "CLIP"]),
        "PaRaSave": (["para", "filename_prefix"], [], []),
    }
    names = {"PaRaLoader": "Load PaRa", "PaRaLoadFile": "Load PaRa File", "PaRaHook": "Hook PaRa", "PaRaApply": "Apply PaRa", "PaRaMerge": "Merge PaRa",
             "PaRaLoRACombine": "PaRa + LoRA", "PaRaSave": "Save PaRa"}
    for node_id, (req, opt, outs) in expected.items():
        cls = comfy.nodes.NODE_CLASS_MAPPINGS[node_id]
        assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == names[node_id]
        spec = cls.INPUT_TYPES()
        assert list(spec["required"]) == req and list(spec.get("optional", {})) == opt, node_id
        for section in ("required", "optional"):
            for name, s in spec.get(section, {}).items():
                assert s[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert list(cls.RETURN_TYPES) == outs, node_id
    for node_id in expected:  # every node reports its text on the canvas: it needs its own node id
        assert comfy.nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["hidden"]["unique_id"] == ("UNIQUE_ID",), node_id
    assert comfy.nodes.NODE_CLASS_MAPPINGS["PaRaSave"].OUTPUT_NODE is True
    assert comfy.nodes.NODE_CLASS_MAPPINGS["PaRaMerge"].INPUT_TYPES()["required"]["mode"][1]["default"] == "sequential"
    assert comfy.nodes.NODE_CLASS_MAPPINGS["PaRaLoRACombine"].INPUT_TYPES()["required"]["mode"][1]["default"] == "stacked"


def test_para_folder_registration(comfy):
    import folder_paths
    paths, exts = folder_paths.folder_names_and_paths["para"]
    assert paths[0] == comfy.dirs["para"]  # an entry made before the pack loaded (extra_model_paths.yaml) is kept
    assert os.path.join(folder_paths.models_dir, "para") in paths
    assert os.path.join(comfy.dirs["output"], "para") in paths
    assert exts == {".safetensors"}
    with open(comfy.path("para", "ignored.pt"), "wb") as f:
        f.write(b"x")
    comfy.write_para("listed.safetensors", {LIN: [rand_b(320, 1, 160)]})
    names = folder_paths.get_filename_list("para")
    assert "listed.safetensors" in names and "ignored.pt" not in names
    opts = comfy.nodes.NODE_CLASS_MAPPINGS["PaRaLoader"].INPUT_TYPES()["required"]["para_name"][1]["options"]
    assert "listed.safetensors" in opts



def test_para_list_shows_final_files_first_then_checkpoints_newest_step_first(comfy):
    """Train PaRa's save_every checkpoints do not crowd out the files a user saved: Save PaRa's files (and any
    other file) first by name, then each run's `<run>_<step>_steps_NNNNN_` files, highest step first."""
    names = ["order/zz_final_00001_.safetensors", "order/aa_run_5_steps_00001_.safetensors",
             "order/aa_run_10_steps_00001_.safetensors", "order/aa_run_100_steps_00001_.safetensors",
             "order/aa_run_100_steps_00002_.safetensors", "order/bb_run_20_steps_00001_.safetensors",
             "order/aa_final_00001_.safetensors", "order/mine.safetensors"]
    os.makedirs(comfy.path("para", "order"), exist_ok=True)
    for n in names:
        comfy.write_para(n, {LIN: [rand_b(320, 1, 161)]})
    for node in ("PaRaLoader", "PaRaLoadFile"):
        opts = comfy.nodes.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["required"]["para_name"][1]["options"]
        ours = [o.replace("\\", "/") for o in opts if o.replace("\\", "/").startswith("order/")]
        assert ours == ["order/aa_final_00001_.safetensors", "order/mine.safetensors", "order/zz_final_00001_.safetensors",
                        "order/aa_run_100_steps_00001_.safetensors", "order/aa_run_100_steps_00002_.safetensors",
                        "order/aa_run_10_steps_00001_.safetensors", "order/aa_run_5_steps_00001_.safetensors",
                        "order/bb_run_20_steps_00001_.safetensors"], ours
        finals = [o for o in opts if "_steps_" not in o]
        assert opts[:len(finals)] == finals  # every final file before every checkpoint
    existing = comfy.nodes.NODE_CLASS_MAPPINGS["PaRaTrainer"].INPUT_TYPES()["optional"]["existing_para"][1]["options"]
    assert existing[0] == "[None]" and existing[1:] == opts


@pytest.mark.parametrize("node", ["PaRaLoader", "PaRaLoadFile"])
def test_para_name_placeholder_and_missing_file_fail_validation(comfy, sd15, node):
    """With no PaRa file the list holds one placeholder (the front end shows it instead of `undefined`);
    validation refuses it, and a file that is not there, in one line naming the folders."""
    placeholder = next(m for k, m in sys.modules.items() if k.endswith("nodes.paths") and hasattr(m, "NO_FILE")).NO_FILE
    assert not placeholder.endswith(".safetensors")  # never taken for a model file by the front end
    import folder_paths
    where = ", ".join(folder_paths.get_folder_paths("para"))
    for name, needle in ((placeholder, "no PaRa file chosen: put a .safetensors PaRa file in one of " + where),
                         ("gone.safetensors", "PaRa file 'gone.safetensors' not found in the para folders: " + where)):
        g = comfy.graph()
        if node == "PaRaLoader":
            ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
            n = g.node(node, model=ck.out(0), para_name=name, strength_model=1.0, strength_clip=1.0)
        else:
            n = g.node(node, para_name=name)
        g.node("PreviewAny", source=n.out(0))
        msg = comfy.run_failing(g.finalize())
        label = {"PaRaLoader": "Load PaRa", "PaRaLoadFile": "Load PaRa File"}[node]
        assert msg.startswith("validation failed: ") and "\n" not in msg, msg
        assert f"node {n.id} ({node}): Custom validation failed for node: para_name - {label}: {needle}" in msg, msg


# ---- Load PaRa File ----------------------------------------------------------------------------------
def test_load_para_file_needs_no_model(comfy, sd15, base):
    stages = {LIN: [rand_b(320, 4, 170)], TEQ: [rand_b(768, 2, 171)]}
    comfy.write_para("file_only.safetensors", stages)
    g = comfy.graph()
    lf = g.node("PaRaLoadFile", para_name="file_only.safetensors")
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    ap = g.node("PaRaApply", model=ck.out(0), para=lf.out(0), strength_model=1.0, strength_clip=1.0)
    g.node("PreviewAny", source=ap.out(0))
    ui = comfy.run(g.finalize())
    assert ui[lf.id]["text"] == ["2 layers, rank 2-4"]
    assert ui[ap.id]["text"] == ["model: 1 layer patched; skipped 1 not in this model (first: "
                                 f"{TEQ}); text-encoder layers skipped: no CLIP connected"]
    assert sorted(comfy.output(lf.id, 0).stages) == sorted(stages)
    got = comfy.patched_state_dict(comfy.output(ap.id, 0), [wkey(LIN)])[wkey(LIN)]
    assert_fp32_close(got, project64(w0(base, LIN), stages[LIN]), "Apply PaRa of a Load PaRa File")


def test_node_text_goes_to_the_canvas_and_the_history(comfy, sd15, monkeypatch):
    """Each node sends its text as progress text for its own node id (what the front end draws on the node)."""
    import server

    class Recorder:  # the in-process harness has no PromptServer instance: record what the node sends
        client_id = "client-1"
        sent: list = []

        def send_progress_text(self, text, node_id, sid=None):
            self.sent.append((text, node_id, sid))

    rec = Recorder()
    monkeypatch.setattr(server.PromptServer, "instance", rec, raising=False)
    comfy.write_para("canvas.safetensors", {LIN: [rand_b(320, 2, 175)]})
    g = comfy.graph()
    lf = g.node("PaRaLoadFile", para_name="canvas.safetensors")
    sv = g.node("PaRaSave", para=lf.out(0), filename_prefix="para/canvas_text")
    ui = comfy.run(g.finalize(), fresh_cache=True)
    assert ui[sv.id]["text"][0].startswith("saved para/canvas_text_00001_.safetensors\n1 layer, rank 2")
    assert sorted(rec.sent) == sorted([(ui[lf.id]["text"][0], lf.id, "client-1"), (ui[sv.id]["text"][0], sv.id, "client-1")])


# ---- per-block strength ---------------------------------------------------------------------------------
def test_block_strength_against_float64(comfy, sd15, base):
    stages = {LIN: [rand_b(320, 4, 180)], CONV: [rand_b(320, 2, 181)], FF: [rand_b(2560, 4, 182)], TEQ: [rand_b(768, 2, 183)]}
    comfy.write_para("blocks.safetensors", stages)
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    lp = g.node("PaRaLoader", model=ck.out(0), clip=ck.out(1), para_name="blocks.safetensors", strength_model=0.8,
                strength_clip=1.0, block_strength="input:0.5, input.0:-1, output:0")
    g.node("PreviewAny", source=lp.out(0))
    ui = comfy.run(g.finalize())
    assert ui[lp.id]["text"] == ["model: 2 layers patched, clip: 1 layer patched; block strength: input ×-1/0.5, output ×0"]
    unet = comfy.patched_state_dict(comfy.output(lp.id, 0))
    assert_fp32_close(unet[wkey(LIN)], project64(w0(base, LIN), stages[LIN], 0.8 * 0.5), "input block at 0.5")
    assert_fp32_close(unet[wkey(CONV)], project64(w0(base, CONV), stages[CONV], -0.8), "input.0 at -1")
    assert torch.equal(unet[wkey(FF)], base["unet"][wkey(FF)]), "output blocks at 0 are left unpatched"
    te = comfy.patched_state_dict(comfy.output(lp.id, 1), [wkey(TEQ)])
    assert_within_ulp(te[wkey(TEQ)], project64(w0(base, TEQ), stages[TEQ]), "the text encoder ignores block strength")
    # Apply PaRa: an unknown block is one clear error naming it
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    lf = g.node("PaRaLoadFile", para_name="blocks.safetensors")
    ap = g.node("PaRaApply", model=ck.out(0), para=lf.out(0), strength_model=1.0, strength_clip=1.0,
                block_strength="input:1, midle:0.5, single:0")
    g.node("PreviewAny", source=ap.out(0))
    msg = comfy.run_failing(g.finalize())
    assert msg.startswith(f"PaRaApply (node {ap.id}): ValueError: Apply PaRa (") and "\n" not in msg, msg
    assert "'midle', 'single' match no layer of this unet model (blocks input, middle, output, other, *" in msg, msg


# ---- Save PaRa numbering and prefix -------------------------------------------------------------------------
def _save_graph(comfy, para_name, prefix):
    g = comfy.graph()
    lf = g.node("PaRaLoadFile", para_name=para_name)
    sv = g.node("PaRaSave", para=lf.out(0), filename_prefix=prefix)
    return g.finalize(), sv


def test_save_numbers_only_its_own_files(comfy, sd15):
    """The trainer writes <prefix>_<step>_steps_<n>_ with the same prefix: it must not shift Save PaRa's numbers."""
    comfy.write_para("numbered.safetensors", {LIN: [rand_b(320, 2, 190)]})
    out = os.path.join(comfy.dirs["output"], "para", "numbering")  # a folder of its own: other tests save para/sks_dog too
    os.makedirs(out, exist_ok=True)
    for name in ("sks_dog_5_steps_00001_.safetensors", "sks_dog_1000_steps_00002_.safetensors", "sks_dog_5_steps_00001_.para_state",
                 "sks_dog_00007_.png", "sks_dog_extra_00009_.safetensors", "sks_dog_0042_.safetensors", "my_sks_dog_00011_.safetensors"):
        with open(os.path.join(out, name), "wb") as f:
            f.write(b"not a PaRa")
    prompt, sv = _save_graph(comfy, "numbered.safetensors", "para/numbering/sks_dog")
    assert comfy.run(prompt, fresh_cache=True)[sv.id]["text"][0].startswith("saved para/numbering/sks_dog_00001_.safetensors\n")
    assert comfy.run(prompt, fresh_cache=True)[sv.id]["text"][0].startswith("saved para/numbering/sks_dog_00002_.safetensors\n")
    with open(os.path.join(out, "sks_dog_00005_.safetensors"), "wb") as f:  # one of its own numbers, from an older session
        f.write(b"older")
    assert comfy.run(prompt, fresh_cache=True)[sv.id]["text"][0].startswith("saved para/numbering/sks_dog_00006_.safetensors\n")
    with open(comfy.path("para", "numbered.safetensors"), "rb") as f:
        original = f.read()
    for n in (1, 2, 6):
        with open(os.path.join(out, f"sks_dog_{n:05}_.safetensors"), "rb") as f:
            assert f.read() == original
    # a prefix without a folder writes to the output folder itself
    prompt, sv = _save_graph(comfy, "numbered.safetensors", "top_level_para")
    assert comfy.run(prompt, fresh_cache=True)[sv.id]["text"][0].startswith("saved top_level_para_00001_.safetensors\n")
    assert os.path.isfile(os.path.join(comfy.dirs["output"], "top_level_para_00001_.safetensors"))


@pytest.mark.parametrize("prefix, why", [
    ("", "it is empty"), ("  ", "it is empty"), (".", "plain name"), ("..", "plain name"), ("../../x", "plain name"),
    ("../escape", "plain name"), ("para/../../x", "plain name"), ("para//x", "plain name"), ("para/", "plain name"),
    ("/tmp/x", "absolute path"), ("C:/x", "absolute path"), ("para/a\0b", "NUL character"),
    ("p" * 300, "300 bytes long (at most 200)"), ("para/" + "é" * 100, "205 bytes long (at most 200)")])
def test_save_rejects_a_bad_prefix_with_one_clear_line(comfy, sd15, prefix, why):
    """Refused when ComfyUI validates the prompt, before any node runs, in one line naming the prefix."""
    comfy.write_para("prefix.safetensors", {LIN: [rand_b(320, 2, 191)]})

    def files():
        return sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.dirname(comfy.dirs["output"])) for f in fs)

    before = files()
    prompt, sv = _save_graph(comfy, "prefix.safetensors", prefix)
    msg = comfy.run_failing(prompt)
    shown = prefix if len(prefix) <= 80 else prefix[:77] + "..."
    assert msg.startswith("validation failed: ") and "\n" not in msg, msg
    assert f"node {sv.id} (PaRaSave): Custom validation failed for node: filename_prefix - Save PaRa: " \
           f"filename_prefix {shown!r} cannot be used: " in msg, msg
    assert why in msg and "such as 'para/my_subject' (plain names, at most 200 bytes)" in msg, msg
    assert files() == before, "a rejected prefix wrote something"


def test_one_prefix_rule_for_save_and_train(comfy):
    """Save PaRa and Train PaRa refuse the same prefixes with the same words (only the node name differs)."""
    m = comfy.nodes.NODE_CLASS_MAPPINGS
    for prefix in ("../escape", "", "/abs", "p" * 201, "para/ok/../x"):
        save, train = m["PaRaSave"].validate_inputs(filename_prefix=prefix), m["PaRaTrainer"].validate_inputs(filename_prefix=[prefix])
        assert isinstance(save, str) and save.startswith("Save PaRa: filename_prefix "), save
        assert train == "Train PaRa" + save[len("Save PaRa"):], (save, train)
    for prefix in ("para/my_subject", "p" * 200, "a/b/c d", None):
        assert m["PaRaSave"].validate_inputs(filename_prefix=prefix) is True
        assert m["PaRaTrainer"].validate_inputs(filename_prefix=[prefix]) is True


def test_saved_file_keeps_the_process_umask(comfy, sd15):
    """Like ComfyUI's saved images (0644 under the usual umask 022), not mkstemp's private 0600."""
    import stat
    mask = os.umask(0o022)
    os.umask(mask)
    comfy.write_para("mode.safetensors", {LIN: [rand_b(320, 2, 192)]})
    prompt, sv = _save_graph(comfy, "mode.safetensors", "para/mode_test")
    comfy.run(prompt, fresh_cache=True)
    mode = stat.S_IMODE(os.stat(os.path.join(comfy.dirs["output"], "para", "mode_test_00001_.safetensors")).st_mode)
    assert mode == 0o666 & ~mask, oct(mode)


def test_block_strength_on_flux_double_and_single_blocks(comfy):
    """Flux vocabulary on a real (tiny) Flux: fused offsets keep their block's multiplier."""
    model = comfy.flux_model()
    h = 64
    stages = {"transformer.transformer_blocks.0.attn.to_k": [rand_b(h, 3, 200)],  # double_blocks.0.img_attn.qkv[64:128]
              "diffusion_model.single_blocks.0.linear1_qkv": [rand_b(3 * h, 4, 201)]}  # single_blocks.0.linear1[0:192]
    comfy.write_para("flux_blocks.safetensors", stages)
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["PaRaLoader"]
    with torch.inference_mode():
        out = loader.execute(model=model, para_name="flux_blocks.safetensors", strength_model=1.0, strength_clip=1.0,
                             block_strength="double:1, single:0.5")
    assert out.ui.as_dict()["text"][0] == "model: 2 layers patched; block strength: single ×0.5"
    base = comfy.base_state_dict(model)
    got = comfy.patched_state_dict(out.args[0])
    img, lin = "diffusion_model.double_blocks.0.img_attn.qkv.weight", "diffusion_model.single_blocks.0.linear1.weight"
    assert_fp32_close(got[img][h:2 * h], project64(base[img][h:2 * h], stages["transformer.transformer_blocks.0.attn.to_k"]), "double at 1")
    assert_fp32_close(got[lin][:3 * h], project64(base[lin][:3 * h], stages["diffusion_model.single_blocks.0.linear1_qkv"], 0.5), "single at 0.5")
    assert torch.equal(got[lin][3 * h:], base[lin][3 * h:])
    with pytest.raises(ValueError, match="'input' matches no layer of this flux model \\(blocks double, single, other, \\*"):
        with torch.inference_mode():
            loader.execute(model=model, para_name="flux_blocks.safetensors", strength_model=1.0, strength_clip=1.0, block_strength="input:0")

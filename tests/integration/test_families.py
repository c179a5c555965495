"""The family matrix: every generator family the running ComfyUI loads (0.8's; on 0.33 also its newer ones), as a
tiny instance (families.py), through the pack's nodes in a real ComfyUI.

Per family:
* Load PaRa with a native name, a LoRA-style alias (kohya / diffusers, from ComfyUI's own LoRA key map) and,
  where the family has fused projections, a sliced alias: patched weights against float64; Merge PaRa
  (sequential) then Apply PaRa, and PaRa then ComfyUI's LoRA loader on the same layer: against float64.
* The presets are decided from the model's classes, and ExCA drops the family's cross-attention and
  time-embedding analogues (issue 7's groups; for 0.33's families, those in para_core/families.py).
* Train PaRa through ComfyUI's executor: finite losses; on SD1.5, SDXL, Flux, Qwen-Image and Wan 24 steps
  whose loss falls; checkpointing and dtype spread over the families; video families on multi-frame latents.
  The denoiser evaluated on fixed inputs after training equals, bit for bit, the one before (nothing the
  trainer or training_compat changed is left behind). Save PaRa -> Load PaRa gives bit-identical weights.
* Gradient checkpointing computes the same losses, bit for bit, as plain backward (in-place and other
  families), and without training_compat Flux, LTX and Qwen-Image fail at backward with ComfyUI's error.
* A model that caches across calls (HiDream-O1's text K/V): training neither uses nor leaves such a cache,
  and sampling base and PaRa (Load PaRa, or a PaRa Hook on the positive of the same prompt) gives what each
  gives on an empty one.

Three test-only input nodes (input_nodes.py: ParaTestFamilyModel, ...Latents, ...Conditioning) hand the tiny
model, latents and conditioning to the graph; nothing of the pack or of ComfyUI is replaced.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

import families as F
from harness import bits_equal
from reference import assert_rel_close, project64

FAMILY_KEYS = F.available()  # families the running ComfyUI has a class for (0.8 lacks the later ones)

# Train PaRa settings per family: (steps, gradient_checkpointing, training_dtype). 24 steps where the loss
# must fall; elsewhere 3 steps; checkpointing and bf16 spread so that each occurs on several layouts.
TRAIN = {
    "sd15": (24, False, "fp32"), "sdxl": (24, True, "fp32"), "flux_dev": (24, False, "fp32"),
    "qwen_image": (24, True, "fp32"), "wan21": (24, False, "bf16"),
    "sd35": (3, True, "bf16"), "auraflow": (3, False, "bf16"), "cosmos_predict2": (3, True, "fp32"),
    "cascade_c": (3, False, "fp32"), "pixart_sigma": (3, True, "bf16"), "flux_schnell": (3, True, "bf16"),
    "chroma": (3, True, "fp32"), "lumina2": (3, False, "bf16"), "z_image": (3, True, "fp32"),
    "hidream": (3, False, "fp32"), "hunyuan_video": (3, True, "bf16"), "hunyuan_image21": (3, False, "fp32"),
    "wan22_5b": (3, True, "fp32"), "ltxv": (3, True, "bf16"),
    # families added with ComfyUI 0.33's (OmniGen2, Kandinsky 5, HunyuanDiT and Cosmos 1 are in 0.8 too): 2 steps, fp32/bf16 and checkpointing spread
    "longcat_image": (2, True, "bf16"), "z_image_pixel": (2, False, "fp32"), "lens": (2, True, "fp32"),
    "mage_flow": (2, False, "bf16"), "ernie_image": (2, True, "bf16"), "joyimage": (2, False, "fp32"),
    "krea2": (2, True, "fp32"), "ideogram4": (2, False, "bf16"), "boogu": (2, True, "fp32"),
    "omnigen2": (2, False, "bf16"), "kandinsky5": (2, True, "fp32"), "hunyuan_dit": (2, True, "bf16"),
    "cosmos1": (2, False, "fp32"),
    "cogvideox": (2, False, "bf16"), "pixeldit": (2, True, "bf16"), "hidream_o1": (2, True, "fp32"),
    "anima": (2, True, "bf16"), "wan21_causal": (2, True, "fp32"), "wan_animate2": (2, False, "bf16"),
    "flux2": (2, True, "bf16"), "chroma_radiance": (2, False, "fp32"), "hunyuan_video15": (2, True, "fp32"),
    "mochi": (2, False, "bf16"),
}
# Joint audio + video generators (LTX-2 AV, MiniMax H3): ComfyUI hands them one packed [video, audio] latent
# (comfy.nested_tensor), which Train PaRa does not take (nor does core Train LoRA: its code has no NestedTensor
# path); the matrix patches them only.
AUDIO_VIDEO = {"ltxav", "minimax_h3"}
TRAIN_KEYS = [k for k in FAMILY_KEYS if k not in AUDIO_VIDEO]

# (family key in para_core.targets, name fragments ExCA must drop: issue 7's list per family)
EXCA_DROPS = {
    "sd15": ("unet", ["attn2.", "time_embed.", "emb_layers."]),
    "sdxl": ("unet", ["attn2.", "time_embed.", "label_emb.", "emb_layers."]),
    "sd35": ("mmdit", ["context_block.", "context_embedder", "t_embedder.", "y_embedder.", "adaLN_modulation"]),
    "auraflow": ("auraflow", ["cond_seq_linear", "modC.", "modX.", "modCX.", "modF.", "double_layers.0.attn.w1",
                              "double_layers.0.mlpC.", "t_embedder."]),
    "cosmos_predict2": ("cosmos_predict2", [".cross_attn.", "adaln_modulation", "t_embedder."]),
    "cascade_c": ("cascade", ["clip_txt_mapper", "clip_txt_pooled_mapper", "clip_img_mapper", "kv_mapper", ".mapper",
                              "mapper_sca", "mapper_crp"]),
    "pixart_sigma": ("pixart", ["t_block.", "t_embedder.", "y_embedder.", "cross_attn."]),
    "flux_dev": ("flux", ["txt_in", "txt_attn.", "txt_mlp.", "txt_mod.", "img_mod.", "modulation", "time_in.",
                          "vector_in.", "guidance_in."]),
    "flux_schnell": ("flux", ["txt_in", "txt_attn.", "txt_mlp.", "txt_mod.", "img_mod.", "modulation", "time_in.",
                              "vector_in."]),
    "chroma": ("flux", ["distilled_guidance_layer", "txt_in", "txt_attn.", "txt_mlp."]),
    "lumina2": ("lumina2", ["context_refiner.", "cap_embedder.", "t_embedder.", "adaLN_modulation"]),
    "z_image": ("lumina2", ["context_refiner.", "cap_embedder.", "t_embedder.", "adaLN_modulation"]),
    "qwen_image": ("qwen_image", ["txt_in", "img_mod.", "txt_mod.", "txt_mlp.", "add_q_proj", "add_k_proj",
                                  "add_v_proj", "to_add_out", "time_text_embed."]),
    "hidream": ("hidream", ["caption_projection", "t_embedder.", "p_embedder.", "adaLN_modulation", "_t", "ff_t."]),
    "hunyuan_video": ("flux", ["txt_in.", "txt_attn.", "txt_mlp.", "txt_mod.", "img_mod.", "modulation", "time_in.",
                               "vector_in.", "guidance_in."]),
    "hunyuan_image21": ("flux", ["txt_in.", "txt_attn.", "txt_mlp.", "txt_mod.", "img_mod.", "modulation", "time_in."]),
    "wan21": ("wan", ["text_embedding", "time_embedding", "time_projection", ".cross_attn."]),
    "wan22_5b": ("wan", ["text_embedding", "time_embedding", "time_projection", ".cross_attn."]),
    "ltxv": ("ltxv", ["adaln_single", "caption_projection", "attn2."]),
    "longcat_image": ("flux", ["txt_in", "txt_attn.", "txt_mlp.", "txt_mod.", "img_mod.", "modulation", "time_in."]),
    "z_image_pixel": ("lumina2", ["context_refiner.", "cap_embedder.", ".t_embedder.", "layers.0.adaLN_modulation",
                                  "noise_refiner.0.adaLN_modulation"]),
    "lens": ("qwen_image", ["txt_in", "txt_qkv", "to_add_out", "txt_mlp.", "img_mod.", "txt_mod.", "time_text_embed.",
                            "norm_out."]),
    "mage_flow": ("qwen_image", ["txt_in", "txt_mlp.", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "img_mod.",
                                 "txt_mod.", "time_text_embed.", "norm_out."]),
    "ernie_image": ("ernie", ["text_proj", "time_embedding.", "adaLN_modulation", "final_norm."]),
    "joyimage": ("joyimage", ["text_embedder.", "txt_attn_", "txt_mlp.", "time_embedder.", "time_proj"]),
    "krea2": ("krea2", ["txtfusion.", "txtmlp.", "tmlp.", "tproj."]),
    "ideogram4": ("ideogram4", ["llm_cond_proj", "t_embedding.", "adaln_proj", "adaln_modulation"]),
    "omnigen2": ("omnigen2", ["caption_embedder.", "context_refiner.", "timestep_embedder.", "norm1.linear", "norm_out."]),
    "kandinsky5": ("kandinsky5", ["text_embeddings.", "text_transformer_blocks.", "cross_attention.", "time_embeddings.",
                                  "pooled_text_embeddings.", "modulation."]),
    "hunyuan_dit": ("hunyuan_dit", ["attn2.", "mlp_t5.", "t_embedder.", "pooler.", "extra_embedder.", "default_modulation.",
                                    "adaLN_modulation."]),
    "cosmos1": ("cosmos1", ["blocks.1.block.", "t_embedder.", "adaLN_modulation"]),
    "boogu": ("omnigen2", ["caption_embedder.", "context_refiner.", "instruct_to_", "instruct_out", "instruct_feed_forward.",
                        "timestep_embedder.", "norm1.linear", "img_norm2.linear", "img_norm3.linear", "norm_out."]),
    "cogvideox": ("cogvideox", ["text_proj", "time_embedding_linear", "norm1.linear", "norm2.linear", "norm_out."]),
    "pixeldit": ("pixeldit", ["y_embedder.", "qkv_y", "proj_y", "mlp_y.", "t_embedder.", "adaLN_modulation"]),
    "hidream_o1": ("hidream_o1", ["embed_tokens", "visual.", "t_embedder1."]),
    "anima": ("cosmos_predict2", ["llm_adapter.", ".cross_attn.", "adaln_modulation", "t_embedder."]),
    "wan21_causal": ("wan", ["text_embedding", "time_embedding", "time_projection", ".cross_attn."]),
    "wan_animate2": ("wan", ["text_embedding", "time_embedding", "time_projection", ".cross_attn.", "img_emb."]),
    "flux2": ("flux", ["txt_in", "txt_attn.", "txt_mlp.", "modulation", "time_in.", "guidance_in."]),
    "chroma_radiance": ("flux", ["distilled_guidance_layer", "txt_in", "txt_attn.", "txt_mlp."]),
    "hunyuan_video15": ("flux", ["txt_in.", "txt_attn.", "txt_mlp.", "txt_mod.", "img_mod.", "modulation", "time_in.",
                                 "vision_in.", "cond_type_embedding"]),
    "mochi": ("mochi", ["t5_yproj", "qkv_y", "proj_y", "mlp_y.", "t_embedder.", "t5_y_embedder.", ".mod"]),
    "ltxav": ("ltxv", ["adaln_single", "caption_projection", "attn2.", "embeddings_connector."]),
    "minimax_h3": ("minimax_h3", ["condition_proj", "token_refiner.", "time_embedder.", "adaln_proj."]),
}


def _candidates(patcher) -> dict[str, torch.Size]:
    """{module name: weight shape} of the modules the trainer (and ComfyUI's LoRA trainer) can train."""
    return {n: m.weight.shape for n, m in patcher.model.named_modules()
            if hasattr(m, "weight_function") and getattr(m, "weight", None) is not None and m.weight.ndim >= 2}


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _aliases(patcher, linears: list[str]):
    """From ComfyUI's LoRA key map: a LoRA-style alias (kohya, else diffusers) of one of `linears`, and a
    sliced alias ((key, (dim, start, size)) target: fused qkv / linear1) if the family has one."""
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    plain = None
    for prefer in ("lora_unet_", "transformer.", ""):
        for alias, target in key_map.items():
            if (isinstance(target, str) and alias.startswith(prefer) and not alias.startswith("diffusion_model.")
                    and target[:-len(".weight")] in linears[1:]):
                plain = (alias, target)
                break
        if plain:
            break
    sliced = next(((a, t) for a, t in key_map.items() if isinstance(t, tuple) and len(t) == 2), None)
    return plain, sliced


# ---- Load PaRa, PaRa + LoRA --------------------------------------------------------------------------
@pytest.mark.parametrize("fam", FAMILY_KEYS)
def test_apply_native_and_lora_names_merge_and_lora_after_para(comfy, fam):
    model = F.build(fam)
    shapes = _candidates(model)
    linears = [n for n, s in shapes.items() if len(s) == 2 and s[0] >= 8]
    native = linears[0]
    plain, sliced = _aliases(model, linears)
    assert plain is not None, f"{fam}: ComfyUI's LoRA key map has no alias for a linear layer"
    stages = {native: [_rand((shapes[native][0], 3), 1)], plain[0]: [_rand((shapes[plain[1][:-7]][0], 2), 2)]}
    expect = {native + ".weight": (None, stages[native]), plain[1]: (None, stages[plain[0]])}
    if sliced is not None:
        key, (dim, start, size) = sliced[1][0], sliced[1][1]
        assert dim == 0
        stages[sliced[0]] = [_rand((size, 2), 3)]
        expect[key] = ((start, size), stages[sliced[0]])
    comfy.write_para(f"fam_{fam}.safetensors", stages)
    up, down = _rand((shapes[native][0], 2), 4) * 0.05, _rand((2, shapes[native][1]), 5) * 0.05
    comfy.write_safetensors("loras", f"fam_{fam}_lora.safetensors", {
        f"{native}.lora_up.weight": up, f"{native}.lora_down.weight": down, f"{native}.alpha": torch.tensor(1.0)})
    second = [_rand((shapes[native][0], 2), 6)]
    comfy.write_para(f"fam_{fam}_b.safetensors", {native: second})
    nodes = comfy.nodes.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        out = nodes["PaRaLoader"].execute(model=model, para_name=f"fam_{fam}.safetensors", strength_model=1.0, strength_clip=1.0)
        patched = out.args[0]
        lora_after = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(patched, f"fam_{fam}_lora.safetensors", 1.0)[0]
        para_b = nodes["PaRaLoader"].execute(model=model, para_name=f"fam_{fam}_b.safetensors", strength_model=1.0,
                                             strength_clip=1.0).args[2]
        merged = nodes["PaRaMerge"].execute(para_a=out.args[2], para_b=para_b, mode="sequential").args[0]
        merged_model = nodes["PaRaApply"].execute(model=model, para=merged, strength_model=1.0, strength_clip=1.0).args[0]
    n = len(stages)
    assert f"model: {n} layers patched" in out.ui.as_dict()["text"][0]
    base = comfy.base_state_dict(model)
    got = comfy.patched_state_dict(patched)
    for key, (rows, chain) in expect.items():
        if rows is None:
            assert_rel_close(got[key], project64(base[key], chain), f"{fam} {key}")
        else:
            s, size = rows
            assert_rel_close(got[key][s:s + size], project64(base[key][s:s + size], chain), f"{fam} {key} rows {s}..{s + size}")
            assert torch.equal(got[key][:s], base[key][:s]) and torch.equal(got[key][s + size:], base[key][s + size:])
    assert all(bits_equal(v, base[k]) for k, v in got.items() if k not in expect)
    w = comfy.patched_state_dict(lora_after, [native + ".weight"])[native + ".weight"]
    assert_rel_close(w, project64(base[native + ".weight"], stages[native]) + (1.0 / 2) * up.double() @ down.double(), f"{fam} PaRa + LoRA")
    w = comfy.patched_state_dict(merged_model, [native + ".weight"])[native + ".weight"]
    assert_rel_close(w, project64(base[native + ".weight"], stages[native] + second), f"{fam} Merge PaRa (sequential)")


# ---- presets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", FAMILY_KEYS)
def test_presets_follow_the_model_class(fam):
    from para_core.targets import family_for_model, plan
    model = F.build(fam)
    key, drops = EXCA_DROPS[fam]
    base = model.model
    assert family_for_model(type(base.model_config).__name__, type(base.diffusion_model).__name__) == key
    out_dims = {n: s[0] for n, s in _candidates(model).items()}
    exca = set(plan(out_dims, "ExCA", layout=key).names)
    dropped = {n for n in out_dims if any(d in n for d in drops)}
    assert dropped and exca and not (dropped & exca), sorted(dropped & exca)
    self_attn = set(plan(out_dims, "self_attention", layout=key).names)
    attn = set(plan(out_dims, "attention", layout=key).names)
    assert self_attn and self_attn < attn <= set(out_dims)


# ---- Train PaRa --------------------------------------------------------------------------------------
def _train_host(comfy):
    """The pack's nodes/train_host.py (where training_compat lives), as ComfyUI imported it."""
    package = comfy.nodes.NODE_CLASS_MAPPINGS["PaRaTrainer"].__module__.rsplit(".", 1)[0]
    return sys.modules[f"{package}.train_host"]


def _train_graph(g, fam, steps, ckpt, dtype, seed=0):
    model = g.node("ParaTestFamilyModel", family=fam)
    lat = g.node("ParaTestFamilyLatents", family=fam, n=2, seed=0)
    cond = g.node("ParaTestFamilyConditioning", family=fam, seed=1)
    tr = g.node("PaRaTrainer", model=model.out(0), latents=lat.out(0), positive=cond.out(0), batch_size=2,
                grad_accumulation_steps=1, steps=steps, learning_rate=0.02, rank=4, optimizer="AdamW",
                loss_function="MSE", seed=seed, training_dtype=dtype, gradient_checkpointing=ckpt, targets="ExCA",
                include="", exclude="", rank_boundary=0.25, loss_space="prediction", existing_para="[None]",
                save_every=0, preview_every=0)
    return model, tr


def _fixed_forward(fam):
    m = F.build(fam)
    x = m.model.process_latent_in(F.latents(fam, 2, seed=7))
    return F.forward(m, fam, x, 0.4)


@pytest.mark.parametrize("fam", TRAIN_KEYS)
def test_train_save_load_and_model_restored(comfy, fam):
    steps, ckpt, dtype = TRAIN[fam]
    before = _fixed_forward(fam)
    g = comfy.graph(f"tr_{fam}.")
    _, tr = _train_graph(g, fam, steps, ckpt, dtype)
    sv = g.node("PaRaSave", para=tr.out(1), filename_prefix=f"para/fam_{fam}_trained")
    g.node("PreviewAny", source=tr.out(0))
    ui = comfy.run(g.finalize())
    key = EXCA_DROPS[fam][0]
    assert f"(ExCA, {key})" in ui[tr.id]["text"][0]
    losses = comfy.output(tr.id, 2)["loss"]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), losses
    if steps >= 20:
        assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8, losses  # per-step noise and σ differ: compare means
    trained = comfy.output(tr.id, 0)
    saved = ui[sv.id]["text"][0].split()[1].rstrip(":")  # "saved para/<name>: ..."
    assert saved.startswith("para/")
    g2 = comfy.graph(f"ld_{fam}.")
    m = g2.node("ParaTestFamilyModel", family=fam)
    ld = g2.node("PaRaLoader", model=m.out(0), para_name=saved[len("para/"):], strength_model=1.0, strength_clip=1.0)
    g2.node("PreviewAny", source=ld.out(0))
    comfy.run(g2.finalize())
    a = comfy.patched_state_dict(trained)
    b = comfy.patched_state_dict(comfy.output(ld.id, 0))
    assert a.keys() == b.keys() and all(bits_equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in comfy.base_state_dict(trained).items())  # training changed weights
    after = _fixed_forward(fam)
    assert torch.equal(before, after), f"{fam}: the model computes differently after training"


@pytest.mark.parametrize("fam", TRAIN_KEYS)
def test_train_in_the_other_dtype_and_checkpointing(comfy, fam):
    """With TRAIN's run, every family trains in fp32 and in bf16, with and without gradient checkpointing:
    here the other dtype and the other checkpointing setting, 2 steps: finite losses, weights changed, and
    the model's forward afterwards bit-identical to before."""
    _, ckpt, dtype = TRAIN[fam]
    before = _fixed_forward(fam)
    g = comfy.graph(f"tro_{fam}.")
    _, tr = _train_graph(g, fam, 2, not ckpt, "fp32" if dtype == "bf16" else "bf16", seed=5)
    g.node("PreviewAny", source=tr.out(0))
    comfy.run(g.finalize())
    losses = comfy.output(tr.id, 2)["loss"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    trained = comfy.output(tr.id, 0)
    a = comfy.patched_state_dict(trained)
    assert any(not torch.equal(a[k], v) for k, v in comfy.base_state_dict(trained).items())
    assert torch.equal(before, _fixed_forward(fam)), f"{fam}: the model computes differently after training"


def _cross_call_cache_families() -> list[str]:
    """The families of the running ComfyUI whose diffusion model caches across calls (a `clear_kv_cache` method,
    which ComfyUI never calls): HiDream-O1 keeps the text prefix's K/V and the reference images' ViT output,
    keyed by prompt, not by weights. None on 0.8.0. Checked against the one the README names, so that a new
    family with such a cache fails here until its tests below run on it."""
    found = [k for k in TRAIN_KEYS if callable(getattr(F.build(k).model.diffusion_model, "clear_kv_cache", None))]
    assert found == [k for k in ("hidream_o1",) if k in TRAIN_KEYS], found
    return found


def _write_attention_para(comfy, fam, name, seed):
    """A PaRa file on every k/v/o projection of `fam`'s transformer (text and image tokens both pass them)."""
    shapes = _candidates(F.build(fam))
    layers = [n for n in shapes if n.endswith(("self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"))]
    assert layers, sorted(shapes)
    comfy.write_para(name, {n: [_rand((shapes[n][0], 4), seed + i)] for i, n in enumerate(layers)})


def _ksample(comfy, g, fam, model, positive, negative):
    """KSampler (3 euler steps, cfg 2) on `fam`'s latent, the whole graph run on an empty ComfyUI cache."""
    lat = g.node("ParaTestFamilyLatents", family=fam, n=1, seed=0).out(0)
    ks = g.node("KSampler", model=model, positive=positive, negative=negative, latent_image=lat, seed=3, steps=3,
                cfg=2.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    g.node("PreviewAny", source=ks.out(0))
    comfy.run(g.finalize(), fresh_cache=True)
    return comfy.output(ks.id, 0)["samples"].clone()


@pytest.mark.parametrize("ckpt", [False, True])
def test_training_neither_uses_nor_leaves_a_cross_call_cache(comfy, ckpt):
    """Train PaRa on a model that caches across calls: from a model that never ran (before the fix the second
    step's backward failed: the first step's forward had cached K/V still tied to its freed graph), and from
    one that just ran the same prompt with other weights (its cache then held stale K/V, which the trainer
    used): the same losses, bit for bit. Afterwards the model's next call equals a cold one bit for bit: the
    trainer left no K/V of its own weights in the cache."""
    for fam in _cross_call_cache_families():
        m = F.build(fam)
        dm = m.model.diffusion_model
        x = m.model.process_latent_in(F.latents(fam, 2, seed=0))  # the training latents' shape: the same positions
        weight = next(w for n, w in dm.named_parameters() if n.endswith("self_attn.k_proj.weight"))
        losses = []
        for warm in (False, True):
            dm.clear_kv_cache()
            if warm:  # sample with other weights: the cache holds K/V that the base weights do not give
                kept = weight.detach().clone()
                with torch.no_grad():
                    weight.mul_(3.0)
                    m.model.apply_model(x, torch.full((2,), 0.5), transformer_options={"cond_or_uncond": [0, 0]},
                                        **F.model_conds(m, fam, x))
                    weight.copy_(kept)
            g = comfy.graph(f"cc_{fam}_{ckpt}_{warm}.")
            _, tr = _train_graph(g, fam, 3, ckpt, "fp32")
            g.node("PreviewAny", source=tr.out(0))
            comfy.run(g.finalize(), fresh_cache=True)
            losses.append(comfy.output(tr.id, 2)["loss"])
            assert len(losses[-1]) == 3 and all(math.isfinite(v) for v in losses[-1]), losses
        assert losses[0] == losses[1], (fam, losses)
        with torch.no_grad():
            kw = F.model_conds(m, fam, x)
            s = torch.full((2,), 0.5)
            next_call = m.model.apply_model(x, s, transformer_options={"cond_or_uncond": [0, 0]}, **kw)
            dm.clear_kv_cache()
            cold = m.model.apply_model(x, s, transformer_options={"cond_or_uncond": [0, 0]}, **kw)
        assert torch.equal(next_call, cold), f"{fam}: the trainer left K/V of its weights in the cache"


def test_sampling_uses_no_cache_made_with_other_weights(comfy):
    """KSampler on a model that caches text K/V across calls (HiDream-O1), base and Load PaRa (k/v/o of the
    text-and-image transformer) on the same prompt, one run after the other: each gives bit for bit what it
    gives on an empty cache. Before the fix a PaRa run after a base run reused the base K/V (the patch reached
    only the image tokens) and a base run after a PaRa run reused PaRa's."""
    for fam in _cross_call_cache_families():
        _write_attention_para(comfy, fam, f"cc_{fam}.safetensors", 0)
        clear = F.build(fam).model.diffusion_model.clear_kv_cache

        def sample(with_para):
            g = comfy.graph(f"ccs_{fam}_{with_para}.")
            model = g.node("ParaTestFamilyModel", family=fam).out(0)
            if with_para:
                model = g.node("PaRaLoader", model=model, para_name=f"cc_{fam}.safetensors", strength_model=1.0,
                               strength_clip=1.0).out(0)
            cond = g.node("ParaTestFamilyConditioning", family=fam, seed=1).out(0)
            return _ksample(comfy, g, fam, model, cond, cond)

        clear()
        base_cold = sample(False)
        clear()
        para_cold = sample(True)
        assert not torch.equal(base_cold, para_cold), fam
        base_after_para = sample(False)  # the PaRa run before it ended on this prompt
        para_after_base = sample(True)  # and this base run
        assert torch.equal(base_after_para, base_cold), f"{fam}: a base run after a PaRa run"
        assert torch.equal(para_after_base, para_cold), f"{fam}: a PaRa run after a base run"


def test_hooked_sampling_uses_no_cache_made_with_other_weights(comfy):
    """A PaRa Hook on the positive conditioning, the same prompt as the negative: within each step the hooked
    and the plain call run with other weights. Sampled with the pack's nodes it equals, bit for bit, the same
    graph on a model whose every call starts on an empty cache (the test's own wrapper), and a plain run after
    it equals one from an empty cache. Before the fix the plain call reused the hooked call's K/V."""
    for fam in _cross_call_cache_families():
        _write_attention_para(comfy, fam, f"cch_{fam}.safetensors", 10)

        def sample(model_node, hooked):
            g = comfy.graph(f"cch_{fam}_{model_node}_{hooked}.")
            model = g.node(model_node, family=fam).out(0)
            cond = g.node("ParaTestFamilyConditioning", family=fam, seed=1).out(0)
            positive = cond
            if hooked:
                lf = g.node("PaRaLoadFile", para_name=f"cch_{fam}.safetensors")
                hk = g.node("PaRaHook", para=lf.out(0), strength_model=1.0, strength_clip=1.0)
                positive = g.node("ConditioningSetProperties", cond_NEW=cond, strength=1.0, set_cond_area="default",
                                  hooks=hk.out(0)).out(0)
            return _ksample(comfy, g, fam, model, positive, cond)

        F.build(fam).model.diffusion_model.clear_kv_cache()
        plain = sample("ParaTestFamilyModel", False)  # ComfyUI's own run from an empty cache
        reference = sample("ParaTestFamilyModelColdCalls", True)
        assert not torch.equal(plain, reference), fam
        assert torch.equal(sample("ParaTestFamilyModel", True), reference), f"{fam}: hooked sampling"
        assert torch.equal(sample("ParaTestFamilyModel", False), plain), f"{fam}: plain sampling after hooked"


@pytest.mark.parametrize("fam", ["flux_dev", "hunyuan_video", "ltxv", "qwen_image", "wan21", "sd35"])
def test_checkpointing_gives_the_same_losses_bit_for_bit(comfy, fam):
    """Checkpointed and plain backward give the same losses bit for bit: in the in-place families (Flux,
    Hunyuan, LTX) the recomputation works on copies; in the others nothing needs copying."""
    runs = {}
    for ckpt in (False, True):
        g = comfy.graph(f"ck_{fam}_{ckpt}.")
        _, tr = _train_graph(g, fam, 4, ckpt, "fp32", seed=3)
        g.node("PreviewAny", source=tr.out(0))
        comfy.run(g.finalize())
        runs[ckpt] = comfy.output(tr.id, 2)["loss"]
    assert runs[False] == runs[True]


@pytest.mark.parametrize("fam", ["flux_dev", "ltxv", "qwen_image"])
def test_without_training_compat_backward_fails(comfy, fam):
    """What training_compat fixes: without it the run fails at backward with ComfyUI's error (kitchen's RoPE
    op has no autograd formula; Flux and LTX update saved tensors in place). Qwen-Image needs only the RoPE
    fix, which ComfyUI makes itself where it has `model_management.in_training` (0.33: the trainer sets it,
    as core Train LoRA does, and flux/math.py then takes its pure-torch RoPE) or where comfy_kitchen is
    missing: there it trains without training_compat, and the test checks that it does."""
    trainer_module = _train_host(comfy)
    import contextlib
    import importlib

    import comfy.model_management as mm
    kitchen = getattr(importlib.import_module("comfy.quant_ops"), "ck", None) is not None
    host_fixes_rope = not kitchen or hasattr(mm, "in_training")
    saved = trainer_module.training_compat
    trainer_module.training_compat = lambda model: contextlib.nullcontext()
    try:
        g = comfy.graph(f"nc_{fam}.")
        _, tr = _train_graph(g, fam, 2, False, "fp32", seed=4)
        g.node("PreviewAny", source=tr.out(0))
        if fam == "qwen_image" and host_fixes_rope:
            comfy.run(g.finalize())
            losses = comfy.output(tr.id, 2)["loss"]
            assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
            return
        msg = comfy.run_failing(g.finalize())
    finally:
        trainer_module.training_compat = saved
    assert "no autograd formula" in msg or "modified by an inplace operation" in msg, msg


def test_training_compat_restores_everything_also_on_error(comfy):
    """Inside: RoPE bindings point to kitchen's eager functions (when kitchen is installed), composite modules
    have a forward wrapper and a saved-tensor hook is active; after an exception inside, every binding and
    forward is the exact object it was, and the hook stack is as before."""
    import importlib
    flux_math = importlib.import_module("comfy.ldm.flux.math")
    wan_model = importlib.import_module("comfy.ldm.wan.model")
    quant_ops = importlib.import_module("comfy.quant_ops")
    llama = importlib.import_module("comfy.text_encoders.llama")
    trainer_module = _train_host(comfy)
    model = F.build("flux_dev")
    dm = model.model.diffusion_model
    bindings = (flux_math.apply_rope, flux_math.apply_rope1, wan_model.apply_rope1)
    forwards = {id(m): ("forward" in m.__dict__, m.__dict__.get("forward")) for m in dm.modules()}
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    ck = getattr(quant_ops, "ck", None)
    ck_bindings = {n: getattr(ck, n) for n in ("apply_rope", "apply_rope1", "rms_adaln") if hasattr(ck, n)} if ck else {}

    def eager(fn) -> bool:
        return getattr(fn, "__module__", "").startswith("comfy_kitchen.backends.eager")
    with pytest.raises(RuntimeError, match="boom"):
        with trainer_module.training_compat(model):
            if ck is not None:
                # the RoPE Flux's attention reaches is kitchen's differentiable eager code: ComfyUI 0.8 binds the
                # kitchen op into flux/math.py, later versions call comfy.quant_ops.ck.apply_rope from a wrapper
                assert eager(flux_math.apply_rope) or eager(ck.apply_rope)
                assert all(eager(getattr(ck, n)) for n in ck_bindings)
            assert "forward" in dm.double_blocks[0].__dict__
            assert llama.torch is not torch and llama.torch.add is not torch.add  # out= dropped while recording
            assert torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
            raise RuntimeError("boom")
    assert (flux_math.apply_rope, flux_math.apply_rope1, wan_model.apply_rope1) == bindings
    assert all(bindings[i] is b for i, b in enumerate((flux_math.apply_rope, flux_math.apply_rope1, wan_model.apply_rope1)))
    assert all(getattr(ck, n) is fn for n, fn in ck_bindings.items())
    assert {id(m): ("forward" in m.__dict__, m.__dict__.get("forward")) for m in dm.modules()} == forwards
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) == top
    assert llama.torch is torch

"""Areas the rest of the integration suite did not guard (issue 13, item 8), in real ComfyUI prompts: Hook PaRa
with one of its two strengths at 0, Merge PaRa on files of different base models, training on an input model
that carries an object patch from an upstream node (loaded before training), and which caption each sample
gets when the training images have different sizes.

What the diffusion model runs with is recorded by a forward pre-hook on the shared torch model (weights,
timesteps, inputs and text conditioning of every call); references are float64 projections of base weights.
"""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
from harness import project64
from test_hooks import QKEY, Q, _sample, recording
from test_nodes_para import assert_fp32_close, rand_b
from test_train_isolation import TRAIN

TE = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"


# ---- Hook PaRa with one strength at 0 -------------------------------------------------------------------
@pytest.mark.parametrize("strength_model,strength_clip", [(0.0, 1.0), (1.0, 0.0)])
def test_hook_para_with_one_strength_at_zero_applies_only_the_other(comfy, sd15, strength_model, strength_clip):
    """One file with a UNet and a text-encoder layer, one Hook PaRa on both the conditioning (model side) and
    Set CLIP Hooks (clip side): the side at strength 0 runs with its base weights bit for bit, the other side
    is patched exactly as at strength 1 alone."""
    b_unet, b_te = rand_b(320, 8, 330), rand_b(768, 16, 331)
    comfy.write_para("hook_one_zero.safetensors", {Q: [b_unet], TE: [b_te]})
    w0 = comfy.base_state_dict(sd15["model"], [QKEY])[QKEY]
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    lf = g.node("PaRaLoadFile", para_name="hook_one_zero.safetensors")
    hk = g.node("PaRaHook", para=lf.out(0), strength_model=strength_model, strength_clip=strength_clip)
    hooked_clip = g.node("SetClipHooks", clip=ck.out(1), apply_to_conds=False, schedule_clip=False, hooks=hk.out(0))
    loader = g.node("PaRaLoader", model=ck.out(0), clip=ck.out(1), para_name="hook_one_zero.safetensors",
                    strength_model=0.0, strength_clip=1.0)
    encs = [g.node("CLIPTextEncode", clip=c, text="a photo of sks dog") for c in (hooked_clip.out(0), loader.out(1), ck.out(1))]
    for e in encs:
        g.node("PreviewAny", source=e.out(0))
    csp = g.node("ConditioningSetProperties", cond_NEW=encs[2].out(0), strength=1.0, set_cond_area="default", hooks=hk.out(0))
    _sample(comfy, g, ck, csp.out(0), steps=2)
    with recording(sd15["model"]) as calls:
        ui = comfy.run(g.finalize())

    hooked, patched, base = (comfy.output(e.id, 0)[0][0] for e in encs)
    assert float((patched - base).abs().max()) > 1e-2, "the PaRa should change the text encoding"
    if strength_clip:
        torch.testing.assert_close(hooked, patched, rtol=0, atol=2e-3 * float(patched.abs().max()))
    else:
        assert torch.equal(hooked, base), "strength_clip 0: the text encoder must run with its base weights"

    assert sorted(c for _, c, _ in calls) == [(0,), (0,), (1,), (1,)]
    ref = project64(w0, [b_unet])
    for sigma, which, w in calls:
        if which == (0,) and strength_model:
            assert_fp32_close(w, ref, f"hooked cond at sigma {sigma:.3f}")
        else:
            assert torch.equal(w, w0), f"{which} at sigma {sigma:.3f}: expected the base weight"
    assert f"strength model {strength_model:g}, clip {strength_clip:g}" in ui[hk.id]["text"][0]


# ---- Merge PaRa on files of different base models ----------------------------------------------------
def test_merge_node_refuses_files_of_different_base_models(comfy):
    """Same layer shapes, metadata naming sd15 and sdxl: the node fails with both files and both models named."""
    comfy.write_para("merge_base_sd15.safetensors", {Q: [rand_b(320, 4, 340)]}, metadata={"base_model": "sd15"})
    comfy.write_para("merge_base_sdxl.safetensors", {Q: [rand_b(320, 4, 341)]}, metadata={"base_model": "sdxl"})
    g = comfy.graph()
    a = g.node("PaRaLoadFile", para_name="merge_base_sd15.safetensors")
    b = g.node("PaRaLoadFile", para_name="merge_base_sdxl.safetensors")
    m = g.node("PaRaMerge", para_a=a.out(0), para_b=b.out(0), mode="sequential")
    g.node("PreviewAny", source=m.out(0))
    msg = comfy.run_failing(g.finalize())
    assert msg.startswith(f"PaRaMerge (node {m.id}): ValueError: Merge PaRa ("), msg
    assert (f"{comfy.path('para', 'merge_base_sd15.safetensors')} was trained on base model 'sd15', "
            f"{comfy.path('para', 'merge_base_sdxl.safetensors')} on 'sdxl'") in msg, msg


# ---- training on a model with an upstream object patch, loaded before training --------------------------
@contextlib.contextmanager
def _recording_timesteps(diffusion_model):
    """[(sigma, timestep)] of every call of the diffusion model while the block runs."""
    calls = []

    def pre(module, args, kwargs):
        calls.append((kwargs["transformer_options"]["sigmas"].detach().clone(), args[1].detach().clone()))
    handle = diffusion_model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize("loaded", [True, False], ids=["loaded", "unloaded"])
def test_training_uses_the_upstream_object_patch(comfy, sd15, loaded):
    """ModelSamplingDiscrete (v_prediction, zsnr) replaces the model's model_sampling by an object patch, and the
    model was sampled with it (loaded: patch applied; or unloaded again) before Train PaRa runs on it. Training
    must run with the patched schedule (every timestep the patched one's, the loss in v space); afterwards the
    model is as before (patched while loaded, the original schedule once unloaded) and samples bit-identically."""
    import comfy.model_management as mm
    from test_train_isolation import _sample as sample_once
    mm.unload_all_models()
    torch_model = sd15["model"].model
    original = torch_model.model_sampling
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    msd = g.node("ModelSamplingDiscrete", model=ck.out(0), sampling="v_prediction", zsnr=True)
    te = g.node("CLIPTextEncode", clip=ck.out(1), text="a photo of sks")
    g.node("PreviewAny", source=msd.out(0))
    g.node("PreviewAny", source=te.out(0))
    comfy.run(g.finalize())
    upstream, positive = comfy.output(msd.id, 0), comfy.output(te.id, 0)
    patched = upstream.object_patches["model_sampling"]
    before = sample_once(comfy, upstream, positive)
    assert torch_model.model_sampling is patched, "sampling should have loaded the model with its object patch"
    if not loaded:
        mm.unload_all_models()
        assert torch_model.model_sampling is original
    schedule_before = torch_model.model_sampling

    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=2)
    tr = g.node("PaRaTrainer", model=msd.out(0), latents=lat.out(0), positive=te.out(0),
                **dict(TRAIN, steps=2, seed=41 if loaded else 42, gradient_checkpointing=False))  # not cached
    g.node("PreviewAny", source=tr.out(0))
    with _recording_timesteps(torch_model.diffusion_model) as calls:
        comfy.run(g.finalize())
    assert comfy.output(msd.id, 0) is upstream and comfy.output(tr.id, 3) == 2
    assert json.loads(comfy.output(tr.id, 1).metadata["training"])["loss_space"] == "v"
    assert len(calls) == 2
    differs = 0
    for sigma, t in calls:
        assert torch.equal(t, patched.timestep(sigma).float()), (sigma, t)
        differs += not torch.equal(t, original.timestep(sigma).float())
    assert differs == 2, "the zsnr schedule maps these sigmas to other timesteps than the original one"

    assert torch_model.model_sampling is schedule_before
    assert torch.equal(sample_once(comfy, upstream, positive), before)
    mm.unload_all_models()
    assert torch_model.model_sampling is original


# ---- captions with mixed image sizes --------------------------------------------------------------------
def test_each_training_sample_gets_its_own_caption_with_mixed_image_sizes(comfy, sd15):
    """Images of two sizes, interleaved (8, 6, 8, 6), each with its own caption: training groups them by size, and
    every sample of every step must still be conditioned on its own image's caption. An image is recognised in
    the model's input by its size and by its sign (latents +60 and -60: far outside the noise's mean)."""
    sizes, values = (8, 6, 8, 6), (60, 60, -60, -60)
    image_of = {((s, s), v > 0): i for i, (s, v) in enumerate(zip(sizes, values))}
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    texts = [g.node("CLIPTextEncode", clip=ck.out(1), text=f"a photo of sks, image {i}") for i in range(4)]
    both = texts[0].out(0)
    for t in texts[1:]:
        both = g.node("ConditioningCombine", conditioning_1=both, conditioning_2=t.out(0)).out(0)
    lat = g.node("ParaTestSizedLatents", sizes=",".join(map(str, sizes)), values=",".join(map(str, values)))
    tr = g.node("PaRaTrainer", model=ck.out(0), latents=lat.out(0), positive=both,
                **dict(TRAIN, steps=4, seed=5, batch_size=2, learning_rate=1e-3, gradient_checkpointing=False))
    g.node("PreviewAny", source=tr.out(0))
    for t in texts:
        g.node("PreviewAny", source=t.out(0))
    calls = []

    def pre(module, args, kwargs):
        x = args[0]
        calls.append((tuple(x.shape[-2:]), (x.flatten(1).mean(1) > 0).tolist(), kwargs["context"].detach().clone()))
    handle = sd15["model"].model.diffusion_model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        comfy.run(g.finalize())
    finally:
        handle.remove()
    captions = [comfy.output(t.id, 0)[0][0][0] for t in texts]
    assert all(not torch.equal(captions[0], c) for c in captions[1:])
    assert len(calls) == 4
    seen = []
    for shape, positive, context in calls:
        assert context.shape[0] == len(positive) == 2
        for row, pos in enumerate(positive):
            i = image_of[(shape, pos)]
            seen.append(i)
            assert torch.equal(context[row], captions[i]), f"image {i} ({shape}, {values[i]:+}) got another caption"
    assert sorted(set(seen)) == [0, 1, 2, 3]

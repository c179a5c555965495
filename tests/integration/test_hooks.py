"""Hook PaRa inside ComfyUI's hook system, in a real KSampler run: the weights the UNet actually runs with.

A forward pre-hook on the diffusion model records, for every model call, the sigma, which conditionings
are in the batch (cond/uncond) and a copy of one weight as the module holds it at that moment (ComfyUI bakes
hook patches into the module's weights in place before the call). References are float64 projections of
the base weight.
"""
from __future__ import annotations

import contextlib

import torch

from reference import project64
from test_nodes_para import assert_fp32_close, rand_b

Q = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # Linear 320 x 320 (self-attention)
QKEY = Q + ".weight"


@contextlib.contextmanager
def recording(model_patcher):
    """[(sigma, cond_or_uncond, weight copy)] for every call of the diffusion model while the block runs."""
    import comfy.utils
    dm = model_patcher.model.diffusion_model
    calls = []

    def pre(module, args, kwargs):
        opts = kwargs.get("transformer_options", {})
        w = comfy.utils.get_attr(module, QKEY[len("diffusion_model."):])
        calls.append((float(opts["sigmas"][0]), tuple(opts["cond_or_uncond"]), w.detach().to(torch.float32, copy=True)))

    handle = dm.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _loaded_model(comfy, ckpt):
    """The ModelPatcher CheckpointLoaderSimple gives for `ckpt` (the next prompt's loader is served from the cache)."""
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    g.node("PreviewAny", source=ck.out(0))
    comfy.run(g.finalize())
    return comfy.output(ck.id, 0)


def _sample(comfy, g, ck, positive, steps=4):
    neg = g.node("CLIPTextEncode", clip=ck.out(1), text="")
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = g.node("KSampler", model=ck.out(0), positive=positive, negative=neg.out(0), latent_image=lat.out(0), seed=3,
                steps=steps, cfg=3.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    g.node("PreviewAny", source=ks.out(0))
    return ks


def test_scheduled_hook_patches_only_the_hooked_cond_during_its_keyframes(comfy, sd15):
    b = rand_b(320, 8, 300)
    comfy.write_para("hook_sched.safetensors", {Q: [b]})
    w0 = comfy.base_state_dict(sd15["model"], [QKEY])[QKEY]
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    lf = g.node("PaRaLoadFile", para_name="hook_sched.safetensors")
    hk = g.node("PaRaHook", para=lf.out(0), strength_model=1.0, strength_clip=1.0)
    kf1 = g.node("CreateHookKeyframe", strength_mult=1.0, start_percent=0.0)
    kf2 = g.node("CreateHookKeyframe", strength_mult=0.0, start_percent=0.5, prev_hook_kf=kf1.out(0))
    sh = g.node("SetHookKeyframes", hooks=hk.out(0), hook_kf=kf2.out(0))
    pos = g.node("CLIPTextEncode", clip=ck.out(1), text="a photo of sks dog")
    csp = g.node("ConditioningSetProperties", cond_NEW=pos.out(0), strength=1.0, set_cond_area="default", hooks=sh.out(0))
    _sample(comfy, g, ck, csp.out(0))
    model = _loaded_model(comfy, sd15["ckpt"])
    with recording(model) as calls:
        ui = comfy.run(g.finalize())
    assert ui[lf.id]["text"] == ["1 layer, rank 8"]
    assert ui[hk.id]["text"][0].startswith("hook: 1 layer, rank 8; strength model 1, clip 1\n")
    threshold = float(model.model.model_sampling.percent_to_sigma(0.5))
    patched = project64(w0, [b])
    steps = sorted({s for s, _, _ in calls}, reverse=True)
    assert len(steps) == 4
    active_steps = [s for s in steps if s > threshold]
    assert 0 < len(active_steps) < len(steps), (steps, threshold)
    for sigma, which, w in calls:
        assert len(which) == 1, "a hooked and an unhooked conditioning must run as separate model calls"
        if which == (0,) and sigma > threshold:
            assert_fp32_close(w, patched, f"hooked cond at sigma {sigma:.3f}")
        else:
            assert torch.equal(w, w0), f"{'uncond' if which == (1,) else 'cond after its keyframe'} at sigma {sigma:.3f} is not the base weight"
    assert {(s, c) for s, c, _ in calls} == {(s, c) for s in steps for c in ((0,), (1,))}
    # after sampling the model holds its base weight again
    assert torch.equal(comfy.base_state_dict(model, [QKEY])[QKEY], w0)


def test_regional_hooks_each_region_with_its_own_para(comfy, sd15):
    """Two subjects by region (Cond Set Props with a mask), no merge: each cond runs with its own PaRa, the
    negative with the base; subject B's hook also has a per-block strength (input blocks at 0.5)."""
    ba, bb = rand_b(320, 6, 310), rand_b(320, 6, 311)
    comfy.write_para("hook_a.safetensors", {Q: [ba]})
    comfy.write_para("hook_b.safetensors", {Q: [bb]})
    w0 = comfy.base_state_dict(sd15["model"], [QKEY])[QKEY]
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    conds = []
    for name, x, blocks in (("hook_a.safetensors", 0, ""), ("hook_b.safetensors", 32, "input:0.5")):
        lf = g.node("PaRaLoadFile", para_name=name)
        hk = g.node("PaRaHook", para=lf.out(0), strength_model=1.0, strength_clip=1.0, block_strength=blocks)
        empty = g.node("SolidMask", value=0.0, width=64, height=64)
        half = g.node("SolidMask", value=1.0, width=32, height=64)
        mask = g.node("MaskComposite", destination=empty.out(0), source=half.out(0), x=x, y=0, operation="add")
        text = g.node("CLIPTextEncode", clip=ck.out(1), text=f"subject {name}")
        conds.append(g.node("ConditioningSetProperties", cond_NEW=text.out(0), strength=1.0, set_cond_area="default",
                            mask=mask.out(0), hooks=hk.out(0)))
    both = g.node("ConditioningCombine", conditioning_1=conds[0].out(0), conditioning_2=conds[1].out(0))
    ks = _sample(comfy, g, ck, both.out(0), steps=2)
    with recording(_loaded_model(comfy, sd15["ckpt"])) as calls:
        comfy.run(g.finalize())
    ref_a, ref_b = project64(w0, [ba]), project64(w0, [bb], 0.5)
    seen = {"a": 0, "b": 0, "base": 0}
    for sigma, which, w in calls:
        if which == (1,):
            assert torch.equal(w, w0), f"uncond at {sigma:.3f}"
            seen["base"] += 1
            continue
        err_a = float((w.double() - ref_a).abs().max())
        err_b = float((w.double() - ref_b).abs().max())
        kind = "a" if err_a < err_b else "b"
        assert_fp32_close(w, ref_a if kind == "a" else ref_b, f"cond {kind} at {sigma:.3f}")
        seen[kind] += 1
    assert seen == {"a": 2, "b": 2, "base": 2}, seen
    latent = comfy.output(ks.id, 0)["samples"]
    assert torch.isfinite(latent).all() and latent.shape == (1, 4, 8, 8)


def test_clip_hook_encodes_like_load_para_on_the_clip(comfy, sd15):
    """Set CLIP Hooks with Hook PaRa (text-encoder layers): the prompt is encoded with the PaRa-patched text
    encoder, the same conditioning Load PaRa's patched CLIP gives (apply_to_conds=False: compare text only)."""
    te = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    comfy.write_para("hook_clip.safetensors", {te: [rand_b(768, 16, 320)]})
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    lf = g.node("PaRaLoadFile", para_name="hook_clip.safetensors")
    hk = g.node("PaRaHook", para=lf.out(0), strength_model=1.0, strength_clip=1.0)
    hooked_clip = g.node("SetClipHooks", clip=ck.out(1), apply_to_conds=False, schedule_clip=False, hooks=hk.out(0))
    lp = g.node("PaRaLoader", model=ck.out(0), clip=ck.out(1), para_name="hook_clip.safetensors", strength_model=0.0, strength_clip=1.0)
    encs = [g.node("CLIPTextEncode", clip=c, text="a photo of sks dog") for c in (hooked_clip.out(0), lp.out(1), ck.out(1))]
    for e in encs:
        g.node("PreviewAny", source=e.out(0))
    comfy.run(g.finalize())
    hooked, patched, base = (comfy.output(e.id, 0)[0][0] for e in encs)
    assert float((patched - base).abs().max()) > 1e-2, "the PaRa should change the text encoding"
    torch.testing.assert_close(hooked, patched, rtol=0, atol=2e-3 * float(patched.abs().max()))

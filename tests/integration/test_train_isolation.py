"""Train PaRa leaves the input (shared) model exactly as it was - finished, failed or cancelled run; model
loaded before or not; an input that carries patches of its own.

Checked on the torch model every other node shares: every parameter and buffer is the same object with the
same bits, the module flags ComfyUI's loader sets (comfy_cast_weights, prev_comfy_cast_weights,
weight_function, bias_function, comfy_patched_weights) and forward attributes are the same, and so are the
model attributes (object patches such as manual_cast_dtype, device, loaded-weight bookkeeping), the input
ModelPatcher's patches and ComfyUI's list of loaded models (its entries for this model). Runs set a compute
dtype (the loader then forces weight casting on every comfy op, fp32 included) and gradient checkpointing
(forward attributes on every block).
"""
from __future__ import annotations

import pytest
import torch

FLAGS = ("comfy_cast_weights", "prev_comfy_cast_weights", "weight_function", "bias_function", "comfy_patched_weights", "forward")
MODEL_ATTRS = ("device", "model_loaded_weight_memory", "model_offload_buffer_memory", "model_lowvram", "lowvram_patch_counter",
               "current_weight_patches_uuid", "current_patcher", "manual_cast_dtype")
MISSING = object()
TRAIN = dict(batch_size=2, grad_accumulation_steps=1, steps=2, learning_rate=0.01, rank=4, optimizer="AdamW", loss_function="MSE",
             seed=0, training_dtype="fp32", gradient_checkpointing=True, targets="ExCA", include="", exclude="",
             rank_boundary=0.025, loss_space="prediction", existing_para="[None]", save_every=0, preview_every=0)


def _snapshot(patcher) -> dict:
    import comfy.model_management as mm
    model = patcher.model
    mods = {}
    for name, m in model.named_modules():
        with torch.inference_mode(False):
            tensors = {f"p.{k}": (t, t.detach().clone()) for k, t in m._parameters.items() if t is not None}
            tensors.update({f"b.{k}": (t, t.detach().clone()) for k, t in m._buffers.items() if t is not None})
        flags = {}
        for k in FLAGS:
            v = m.__dict__.get(k, MISSING)
            flags[k] = (v, list(v) if isinstance(v, list) else None)
        mods[name] = (tensors, flags)
    attrs = {k: model.__dict__.get(k, MISSING) for k in MODEL_ATTRS}
    return {"mods": mods, "attrs": attrs, "patches": {k: list(v) for k, v in patcher.patches.items()},
            "uuid": patcher.patches_uuid, "object_patches": dict(patcher.object_patches),
            "backup": dict(patcher.backup), "object_patches_backup": dict(patcher.object_patches_backup),
            "loaded": [lm for lm in mm.current_loaded_models if lm.model is not None and lm.model.model is model]}


def _assert_same(before: dict, patcher) -> None:
    after = _snapshot(patcher)
    assert before["mods"].keys() == after["mods"].keys()
    n_tensors = 0
    for name, (tensors, flags) in before["mods"].items():
        tensors2, flags2 = after["mods"][name]
        assert tensors.keys() == tensors2.keys(), name
        for k, (t, bits) in tensors.items():
            t2, bits2 = tensors2[k]
            assert t2 is t, f"{name}.{k[2:]}: another tensor object after training"
            assert bits2.dtype == bits.dtype and bits2.device == bits.device and torch.equal(bits2, bits), f"{name}.{k[2:]}: values changed"
            n_tensors += 1
        for k, (v, contents) in flags.items():
            v2, contents2 = flags2[k]
            assert v2 is v or (v2 == v and not isinstance(v, list)), f"{name}.{k}: {v!r} -> {v2!r}"
            if contents is not None:
                assert len(contents2) == len(contents) and all(a is b for a, b in zip(contents, contents2)), f"{name}.{k}"
    assert n_tensors > 100
    for k, v in before["attrs"].items():
        v2 = after["attrs"][k]
        assert v2 is v or v2 == v, f"model.{k}: {v!r} -> {v2!r}"
    assert after["patches"].keys() == before["patches"].keys()
    for k, lst in before["patches"].items():
        assert all(a is b for a, b in zip(lst, after["patches"][k])) and len(lst) == len(after["patches"][k]), k
    assert after["uuid"] == before["uuid"] and after["object_patches"] == before["object_patches"]
    assert after["backup"].keys() == before["backup"].keys()
    assert all(after["backup"][k] is v for k, v in before["backup"].items())
    assert after["object_patches_backup"] == before["object_patches_backup"]
    loaded = after["loaded"]
    assert len(loaded) == len(before["loaded"]) and all(a is b for a, b in zip(before["loaded"], loaded)), \
        (before["loaded"], loaded)


def _cast_flags(patcher) -> int:
    return sum(1 for m in patcher.model.modules() if "prev_comfy_cast_weights" in m.__dict__)


@pytest.fixture
def progress_hook():
    """Install a ComfyUI progress-bar hook for one test (ComfyUI's own mechanism; the server uses it too)."""
    import comfy.model_management as mm
    import comfy.utils as cu
    old = cu.PROGRESS_BAR_HOOK
    calls = []

    def install(action=None):
        def hook(value, total, preview, node_id=None):
            calls.append(value)
            if action is not None:
                action(value)
        cu.set_progress_bar_global_hook(hook)
        return calls
    yield install
    cu.set_progress_bar_global_hook(old)
    mm.interrupt_current_processing(False)


def _input_model(comfy, sd15, kind: str):
    """(graph, MODEL output, the ModelPatcher it will be) for an input model of this kind."""
    g = comfy.graph()
    ld = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    if kind == "patched":
        lo = g.node("PaRaLoader", model=ld.out(0), para_name="isolation_in.safetensors", strength_model=1.0, strength_clip=1.0)
        g.node("PreviewAny", source=lo.out(0))
        comfy.run(g.finalize())
        patcher = comfy.output(lo.id, 0)
        assert patcher.patches
        g = comfy.graph()
        ld = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
        lo = g.node("PaRaLoader", model=ld.out(0), para_name="isolation_in.safetensors", strength_model=1.0, strength_clip=1.0)
        return g, lo.out(0), patcher
    return g, ld.out(0), sd15["model"]


@pytest.fixture(scope="module")
def input_para(comfy, sd15):
    gen = torch.Generator().manual_seed(3)
    diff = sd15["model"].model.diffusion_model
    mods = [n for n, m in diff.named_modules() if n.endswith(("attn1.to_q", "ff.net.2"))][:3]
    comfy.write_para("isolation_in.safetensors", {f"diffusion_model.{n}": [torch.randn(diff.get_submodule(n).weight.shape[0], 2,
                                                                                          generator=gen)] for n in mods})
    return mods


CASES = [(s, o) for s in ("unloaded", "loaded") for o in ("finished", "failed", "cancelled")] + [("patched", "finished"), ("patched", "failed")]


@pytest.mark.parametrize("state,outcome", CASES)
def test_training_leaves_the_input_model_as_it_was(comfy, sd15, input_para, progress_hook, state, outcome):
    import comfy.model_management as mm
    mm.unload_all_models()
    g, model_out, patcher = _input_model(comfy, sd15, "patched" if state == "patched" else "plain")
    assert patcher.model is sd15["model"].model
    if state == "loaded":  # as after sampling with this model: it is in ComfyUI's loaded list, flags set
        mm.load_models_gpu([patcher], force_full_load=True)
        assert mm.current_loaded_models and mm.current_loaded_models[0].model is patcher
    before = _snapshot(patcher)
    flags_before = _cast_flags(patcher)

    cond = g.node("CLIPTextEncode", clip=g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"]).out(1), text="a photo of sks")
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=2)
    seed = 100 + 10 * ["unloaded", "loaded", "patched"].index(state) + ["finished", "failed", "cancelled"].index(outcome)
    tr = g.node("PaRaTrainer", model=model_out, latents=lat.out(0), positive=cond.out(0), **dict(TRAIN, seed=seed))  # not cached
    g.node("PreviewAny", source=tr.out(0))
    prompt = g.finalize()

    if outcome == "finished":
        calls = progress_hook()
        comfy.run(prompt)
        assert comfy.output(tr.id, 3) == 2
    elif outcome == "failed":
        def fail(value):
            if value >= 1:
                raise RuntimeError("planted failure in the progress hook")
        calls = progress_hook(fail)
        msg = comfy.run_failing(prompt)
        assert "planted failure" in msg, msg
    else:
        calls = progress_hook(lambda v: mm.interrupt_current_processing() if v >= 1 else None)
        comfy.run_failing(prompt)
        assert any(ev == "execution_interrupted" for ev, _ in comfy.server.messages)
    assert calls, "the run did not reach a training step"
    assert _cast_flags(patcher) == flags_before
    _assert_same(before, patcher)

    # the model still samples as before: a KSampler on the input model (loads it again) works
    g2 = comfy.graph()
    ck = g2.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    m2 = ck.out(0) if state != "patched" else g2.node("PaRaLoader", model=ck.out(0), para_name="isolation_in.safetensors",
                                                         strength_model=1.0, strength_clip=1.0).out(0)
    te = g2.node("CLIPTextEncode", clip=ck.out(1), text="a photo of sks")
    ks = g2.node("KSampler", model=m2, seed=1, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple", positive=te.out(0),
                 negative=te.out(0), latent_image=g2.node("EmptyLatentImage", width=64, height=64, batch_size=1).out(0), denoise=1.0)
    g2.node("PreviewAny", source=ks.out(0))
    comfy.run(g2.finalize())
    assert torch.isfinite(comfy.output(ks.id, 0)["samples"]).all()


def _sample(comfy, model, positive) -> torch.Tensor:
    """One Euler step of ComfyUI's own KSampler path (nodes.common_ksampler), under the executor's inference mode."""
    with torch.inference_mode():
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        out = comfy.nodes.common_ksampler(model, 5, 2, 1.0, "euler", "simple", positive, positive, latent, denoise=1.0)
    return out[0]["samples"].clone()


def test_model_loaded_with_other_patches_is_unloaded_cleanly(comfy, sd15, input_para, progress_hook):
    """A clone with other patches (PaRa applied) sampled last, so its patches are in the shared weights; then
    the plain model is trained. The model cannot be given back 'patched by someone else' consistently, so it
    is unloaded as ComfyUI unloads on a model switch: base values, the original tensor objects (except where
    ComfyUI's unpatch re-wraps a patched key), no cast flags, not in the loaded list - and the patched clone samples bit-identically to before the training."""
    import comfy.model_management as mm
    mm.unload_all_models()
    base = sd15["model"]
    with torch.inference_mode(False):
        s0 = {n: (t, t.detach().clone()) for n, t in list(base.model.named_parameters()) + list(base.model.named_buffers())}
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    lo = g.node("PaRaLoader", model=ck.out(0), para_name="isolation_in.safetensors", strength_model=1.0, strength_clip=1.0)
    te = g.node("CLIPTextEncode", clip=ck.out(1), text="a photo of sks")
    g.node("PreviewAny", source=lo.out(0))
    g.node("PreviewAny", source=te.out(0))
    comfy.run(g.finalize())
    patched, positive = comfy.output(lo.id, 0), comfy.output(te.id, 0)
    before = _sample(comfy, patched, positive)
    assert base.model.current_weight_patches_uuid == patched.patches_uuid != base.patches_uuid

    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    te = g.node("CLIPTextEncode", clip=ck.out(1), text="a photo of sks")
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=2)
    tr = g.node("PaRaTrainer", model=ck.out(0), latents=lat.out(0), positive=te.out(0), **dict(TRAIN, seed=77))
    g.node("PreviewAny", source=tr.out(0))
    calls = progress_hook()
    comfy.run(g.finalize())
    assert calls and comfy.output(ck.id, 0) is base

    now = dict(list(base.model.named_parameters()) + list(base.model.named_buffers()))
    assert now.keys() == s0.keys()
    patched_keys = set(patched.patches)
    assert len(patched_keys) == 3
    for n, (t, bits) in s0.items():
        # ComfyUI's own unpatch wraps the backed-up tensor of a patched key in a new Parameter: same values
        assert (n in patched_keys or now[n] is t) and torch.equal(now[n], bits), n
    assert _cast_flags(base) == 0 and base.model.current_weight_patches_uuid is None
    assert not [lm for lm in mm.current_loaded_models if lm.model is not None and lm.model.model is base.model]
    assert not [n for n, m in base.model.named_modules() if "forward" in m.__dict__]
    assert torch.equal(_sample(comfy, patched, positive), before)

"""Train PaRa beside the host's core Train LoRA: the same-named inputs where the host's trainer has them
(feature-detected: ComfyUI 0.8 has bucket_mode only, 0.33 adds training_dtype 'none', quantized_backward,
checkpoint_depth, offloading, bypass_mode), and what they do; plus the learning-rate schedule and the
validation loss at fixed noise.

The runs call the node's execute directly under inference_mode (as the executor does) on the tiny SD1.5
model, so each costs a few tenths of a second per step.
"""
from __future__ import annotations

import importlib
import sys

import pytest
import torch
from test_train_isolation import _assert_same, _snapshot

PARITY = ("checkpoint_depth", "offloading", "bucket_mode", "bypass_mode", "quantized_backward")
TRAIN = dict(batch_size=2, grad_accumulation_steps=1, steps=3, learning_rate=0.01, rank=4, optimizer="AdamW", loss_function="MSE",
             seed=0, training_dtype="fp32", gradient_checkpointing=False, targets="ExCA", include="", exclude="",
             rank_boundary=0.025, loss_space="prediction", existing_para="[None]", save_every=0, preview_every=0)


def _lat(n, h, w, seed):
    return {"samples": torch.randn(n, 4, h, w, generator=torch.Generator().manual_seed(seed))}


def _cond(seed=1):
    return [[torch.randn(1, 8, 768, generator=torch.Generator().manual_seed(seed)), {}]]


def _train(comfy, model, latents=None, positive=None, **kw):
    """Run Train PaRa's execute as the executor does; returns (model, para, loss_map, steps, ui)."""
    cls = comfy.nodes.NODE_CLASS_MAPPINGS["PaRaTrainer"]
    args = {k: [v] for k, v in dict(TRAIN, **kw).items() if k not in ("validation_latents", "validation_positive")}
    for k in ("validation_latents", "validation_positive"):
        if k in kw:
            args[k] = kw[k]
    with torch.inference_mode():
        out = cls.execute(model=[model], latents=latents or [_lat(4, 8, 8, 0)], positive=positive or [_cond()], **args)
    return tuple(out.result) + (out.ui,)


def _host_module(comfy, name):
    package = comfy.nodes.NODE_CLASS_MAPPINGS["PaRaTrainer"].__module__.rsplit(".", 1)[0]
    return sys.modules[f"{package}.{name}"]


def _q(para):
    return {m: chain[0] for m, chain in para.stages.items()}


# ---- the inputs, per host ---------------------------------------------------------------------------------
def test_parity_inputs_follow_the_hosts_train_lora(comfy):
    """An input of core Train LoRA that this ComfyUI has is on Train PaRa with the same name and type, with a
    tooltip; one it lacks is absent. training_dtype offers 'none' exactly where core's does."""
    core = comfy.nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"].INPUT_TYPES()
    core_inputs = {**core["required"], **core.get("optional", {})}
    spec = comfy.nodes.NODE_CLASS_MAPPINGS["PaRaTrainer"].INPUT_TYPES()
    ours = {**spec["required"], **spec.get("optional", {})}
    for name in PARITY:
        assert (name in ours) == (name in core_inputs), name
        if name in ours:
            assert ours[name][0] == core_inputs[name][0], name  # same type (INT / BOOLEAN)
            assert ours[name][1]["tooltip"], name
    core_none = "none" in core_inputs["training_dtype"][1]["options"]
    assert ("none" in ours["training_dtype"][1]["options"]) == core_none
    if core_none:
        assert "none:" in ours["training_dtype"][1]["tooltip"]
    assert "bucket_mode" in ours  # every supported ComfyUI's Train LoRA has it (0.8.0 on)
    if "bypass_mode" in ours:
        assert "forward hooks" in ours["bypass_mode"][1]["tooltip"]
    if "checkpoint_depth" in ours:
        assert ours["checkpoint_depth"][1]["default"] == 2 and core_inputs["checkpoint_depth"][1]["max"] == ours["checkpoint_depth"][1]["max"]
    for name in ("lr_schedule", "warmup_steps", "validation_latents", "validation_positive", "validation_split", "validation_every"):
        assert ours[name][1]["tooltip"], name


# ---- bucket_mode -----------------------------------------------------------------------------------------
def test_bucket_mode_trains_two_resolutions(comfy, sd15):
    """Two buckets (8x8 and 6x10 latents, as ResolutionBucket emits them): bucket_mode trains, and on such input
    it draws exactly what PaRa's own grouping by shape draws. Two inputs of one shape are two buckets."""
    buckets = [_lat(3, 8, 8, 0), _lat(2, 6, 10, 1)]
    on = _train(comfy, sd15["model"], buckets, bucket_mode=True, steps=4)
    off = _train(comfy, sd15["model"], buckets, bucket_mode=False, steps=4)
    assert on[3] == 4 and len(on[2]["loss"]) == 4 and all(torch.isfinite(torch.tensor(on[2]["loss"])))
    assert on[2]["loss"] == off[2]["loss"]
    assert all(torch.equal(q, _q(off[1])[m]) for m, q in _q(on[1]).items())
    same_shape = _train(comfy, sd15["model"], [_lat(2, 8, 8, 0), _lat(2, 8, 8, 1)], bucket_mode=True, steps=2)
    assert all(torch.isfinite(torch.tensor(same_shape[2]["loss"])))


# ---- bypass_mode -----------------------------------------------------------------------------------------
def test_bypass_mode_trains_the_same_para_and_leaves_the_model_alone(comfy, sd15):
    """Forward hooks give the same PaRa as the forward wrappers (output space: the same bits; weight space:
    within fp16 rounding of the stored Q); during the run no targeted module's forward is replaced (a hook
    is registered instead), and after it the shared model is exactly as before."""
    import comfy.utils as cu
    model = sd15["model"]
    seen = []

    def spy(value, total, preview, node_id=None):
        dm = model.model.diffusion_model
        layer = dm.input_blocks[1][1].transformer_blocks[0].attn1.to_q  # an ExCA target
        seen.append(("forward" in layer.__dict__, len(layer._forward_hooks)))
    before = _snapshot(model)
    old = cu.PROGRESS_BAR_HOOK
    cu.set_progress_bar_global_hook(spy)
    try:
        bypass = _train(comfy, model, bypass_mode=True, gradient_checkpointing=True)
    finally:
        cu.set_progress_bar_global_hook(old)
    _assert_same(before, model)
    # ComfyUI may throttle progress updates by time (0.33): at least one, and every one sees a hook, not a wrapper
    assert seen and all(s == (False, 1) for s in seen), seen
    wrapped = _train(comfy, model, projection="output", gradient_checkpointing=True)
    weight = _train(comfy, model, projection="weight", gradient_checkpointing=True)
    assert bypass[2]["loss"] == wrapped[2]["loss"]
    assert all(torch.equal(q, _q(wrapped[1])[m]) for m, q in _q(bypass[1]).items())
    for m, q in _q(bypass[1]).items():
        assert float((q - _q(weight[1])[m]).abs().max()) < 2e-3, m  # fp16-stored bases of fp32 runs
    assert "bypass mode" in bypass[4]["text"][0]


# ---- learning-rate schedule and validation -------------------------------------------------------------
def test_validation_loss_is_deterministic_and_at_fixed_noise(comfy, sd15):
    """Measured at the start, every validation_every steps and at the end; the same run gives the same
    values; other training data gives another training loss but the same step-0 validation loss (the draw
    depends on the held-out images only); the last value is the loss of the trained MODEL output at
    para_core.train.validation_points, recomputed here through the trainer's own loss forward."""
    train_mod = importlib.import_module(_host_module(comfy, "nodes_train").__name__.rsplit(".", 2)[0] + ".para_core.train")
    host = _host_module(comfy, "train_host")
    model = sd15["model"]
    held = [_lat(2, 8, 8, 7)]
    kw = dict(validation_latents=held, validation_every=2, steps=4, lr_schedule="cosine", warmup_steps=2)
    a = _train(comfy, model, **kw)
    b = _train(comfy, model, **kw)
    other = _train(comfy, model, latents=[_lat(4, 8, 8, 3)], **kw)
    lm = a[2]
    assert lm["validation_step"] == [0, 2, 4] and len(lm["validation_loss"]) == 3
    assert lm["validation_loss"] == b[2]["validation_loss"] and lm["loss"] == b[2]["loss"]
    assert other[2]["validation_loss"][0] == lm["validation_loss"][0] and other[2]["loss"] != lm["loss"]
    assert len(a[4]["images"]) == 1  # the loss plot
    assert "validation loss" in a[4]["text"][0]
    import json
    meta = json.loads(a[1].metadata["training"])
    assert (meta["lr_schedule"], meta["warmup_steps"]) == ("cosine", 2)

    import comfy.model_management as mm
    import comfy.samplers
    import comfy.sampler_helpers

    def loss_at_points(patcher, noise_scale=1.0):
        with torch.inference_mode():
            mm.load_models_gpu([patcher], force_full_load=True)
            base = patcher.model
            x0 = base.process_latent_in(held[0]["samples"].float())
            points = train_mod.validation_points([tuple(x0.shape[1:])] * x0.shape[0], 4)
            c = comfy.samplers.process_conds(base, torch.zeros((1,) + tuple(x0.shape[1:])),
                                             {"positive": comfy.sampler_helpers.convert_cond(_cond())}, base.device if hasattr(base, "device") else "cpu", seed=0)
            kw_ = host.batch_conds([c["positive"][0]])
            losses = []
            for p in points:
                sigma = torch.tensor([float(base.model_sampling.percent_to_sigma(p.timestep))])
                r = host.prediction_error(base, x0[p.image:p.image + 1], p.noise * noise_scale, sigma, kw_)
                losses.append(train_mod.loss_value("MSE", r))
            return float(torch.stack(losses).double().mean())
    final = loss_at_points(a[0])
    # the MODEL output carries the fp16-stored bases, training used fp32 ones: agreement to that rounding
    assert abs(final - lm["validation_loss"][-1]) <= 2e-3 * abs(final), (final, lm["validation_loss"][-1])
    assert abs(loss_at_points(a[0], 0.5) - final) > 5e-2 * abs(final)  # another noise gives another value


def test_validation_split_holds_images_out(comfy, sd15):
    """validation_split 0.25 of 4 images: one held out (by seed), trained on three."""
    out = _train(comfy, sd15["model"], validation_split=0.25, steps=2)
    assert out[2]["validation_step"] == [0, 2] and "(1 held-out images)" in out[4]["text"][0]
    with pytest.raises(ValueError, match="validation_latents without validation_positive needs one training caption"):
        _train(comfy, sd15["model"], positive=[_cond(1) + _cond(2) + _cond(3) + _cond(4)], validation_latents=[_lat(1, 8, 8, 0)])


# ---- training_dtype none, checkpoint_depth, offloading, quantized_backward --------------------------------
def test_checkpoint_depth_counts_as_core_and_keeps_the_losses(comfy, sd15):
    """Core's find_modules_at_depth and para_core's checkpoint_units pick the same modules at every depth (where
    the host has it); checkpointing at depth 1, 2 or 3 gives the losses of a run without it, bit for bit."""
    nt = importlib.import_module("comfy_extras.nodes_train")
    units = importlib.import_module(_host_module(comfy, "nodes_train").__name__.rsplit(".", 2)[0] + ".para_core.train").checkpoint_units
    dm = sd15["model"].model.diffusion_model
    if hasattr(nt, "find_modules_at_depth"):
        for depth in (1, 2, 3, 4):
            assert [id(m) for m in units(dm, depth)] == [id(m) for m in nt.find_modules_at_depth(dm, depth=depth)], depth
    plain = _train(comfy, sd15["model"], steps=2)[2]["loss"]
    spec = comfy.nodes.NODE_CLASS_MAPPINGS["PaRaTrainer"].INPUT_TYPES()
    if "checkpoint_depth" not in spec.get("optional", {}):
        # this ComfyUI's Train LoRA has no checkpoint_depth (0.8): neither has Train PaRa, which then checkpoints
        # at core's fixed depth; checkpointed == plain there bit for bit
        core = comfy.nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"].INPUT_TYPES()
        assert "checkpoint_depth" not in {**core["required"], **core.get("optional", {})}
        assert _train(comfy, sd15["model"], steps=2, gradient_checkpointing=True)[2]["loss"] == plain
        return
    for depth in (1, 3):
        assert _train(comfy, sd15["model"], steps=2, gradient_checkpointing=True, checkpoint_depth=depth)[2]["loss"] == plain


def test_training_dtype_none_offloading_and_quantized_backward(comfy, sd15):
    """Where the host offers them: 'none' on an fp32 model trains in fp32 (the fp32 run's losses bit for bit);
    offloading loads through ComfyUI's partial load (on this CPU machine nothing moves: the same losses);
    quantized_backward sets ComfyUI's training flag during the run only."""
    import comfy.model_management as mm
    import comfy.utils as cu
    spec = comfy.nodes.NODE_CLASS_MAPPINGS["PaRaTrainer"].INPUT_TYPES()
    optional = spec.get("optional", {})
    if "none" not in spec["required"]["training_dtype"][1]["options"]:
        # this ComfyUI's Train LoRA has no training_dtype 'none', offloading or quantized_backward (0.8): absent here too
        assert "offloading" not in optional and "quantized_backward" not in optional
        return
    fp32 = _train(comfy, sd15["model"], steps=2)[2]["loss"]
    assert _train(comfy, sd15["model"], steps=2, training_dtype="none")[2]["loss"] == fp32
    assert _train(comfy, sd15["model"], steps=2, offloading=True)[2]["loss"] == fp32
    flags = []
    old = cu.PROGRESS_BAR_HOOK
    cu.set_progress_bar_global_hook(lambda *a, **k: flags.append((mm.training_fp8_bwd, mm.in_training)))
    try:
        before = (mm.training_fp8_bwd, mm.in_training)
        _train(comfy, sd15["model"], steps=2, training_dtype="none", quantized_backward=True)
    finally:
        cu.set_progress_bar_global_hook(old)
    # progress updates may be throttled by time (0.33): at least one, each inside the run with both flags set
    assert flags and all(f == (True, True) for f in flags), flags
    assert (mm.training_fp8_bwd, mm.in_training) == before

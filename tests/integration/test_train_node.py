"""Train PaRa (PaRaTrainer) through ComfyUI's validation and executor: loss goes down and runs are
deterministic, save/reload is bit-exact, resume continues the same trajectory (optimizer state), cancel
leaves nothing behind, the presets on the real SD1.5 / SD3 layouts, the core dataset path, SD3 (flow).

Two test-only input nodes (input_nodes.py: ParaTestLatents, ParaTestConditioning) make fixed synthetic latents
and conditionings, so SD3 can be fed without a text encoder; nothing of the trainer or of ComfyUI is replaced.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from harness import bits_equal

PARA_DIR_FILES = re.compile(r".*\.(safetensors|para_state)$")

TRAIN_DEFAULTS = dict(batch_size=2, grad_accumulation_steps=1, steps=4, learning_rate=0.01, rank=4, optimizer="AdamW",
                      loss_function="MSE", seed=0, training_dtype="fp32", gradient_checkpointing=False,
                      targets="ExCA", include="", exclude="", rank_boundary=0.025, loss_space="prediction",
                      existing_para="[None]", save_every=0, preview_every=0)


def _train_graph(g, model, latent=None, cond=None, latent_seed=0, **kw):
    if latent is None:
        latent = g.node("ParaTestLatents", n=4, channels=4, size=8, seed=latent_seed).out(0)
    if cond is None:
        cond = g.node("ParaTestConditioning", tokens=8, dim=768, pooled=0, seed=1).out(0)
    return g.node("PaRaTrainer", model=model, latents=latent, positive=cond, **dict(TRAIN_DEFAULTS, **kw))


def _sd15_model(g, sd15):
    return g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])


def _q_of(para) -> dict[str, torch.Tensor]:
    return {m: chain[0].float() for m, chain in para.stages.items()}


def _para_files(comfy) -> list[str]:
    d = os.path.join(comfy.dirs["output"], "para")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


# ---- 1. loss goes down, deterministic --------------------------------------------------------------
def test_training_lowers_loss_and_is_deterministic(comfy, sd15):
    g = comfy.graph("loss.")
    tr = _train_graph(g, _sd15_model(g, sd15).out(0), steps=30, learning_rate=0.01, batch_size=4, seed=3)
    g.node("PreviewAny", source=tr.out(0))
    prompt = g.finalize()
    comfy.run(prompt)
    losses = list(comfy.output(tr.id, 2)["loss"])
    para1 = comfy.output(tr.id, 1)
    assert comfy.output(tr.id, 3) == 30 and len(losses) == 30
    tenth = len(losses) // 10
    first, last = np.mean(losses[:tenth]), np.mean(losses[-tenth:])
    assert first > 1.3 * last, f"loss did not drop clearly: first tenth {first:.4f}, last tenth {last:.4f}"

    comfy.run(prompt, fresh_cache=True)  # the same prompt again, every node executed anew
    assert list(comfy.output(tr.id, 2)["loss"]) == losses
    para2 = comfy.output(tr.id, 1)
    assert para1.stages.keys() == para2.stages.keys()
    for m, q in _q_of(para1).items():
        assert torch.equal(q, _q_of(para2)[m]), m


# ---- 2. MODEL output == saved file reloaded, != base ------------------------------------------------
def test_saved_para_reloads_to_the_trained_weights(comfy, sd15):
    g = comfy.graph("save.")
    tr = _train_graph(g, _sd15_model(g, sd15).out(0), steps=3, seed=5)
    g.node("PaRaSave", para=tr.out(1), filename_prefix="para/trained_rt")
    g.node("PreviewAny", source=tr.out(0))
    comfy.run(g.finalize())
    trained_model, para = comfy.output(tr.id, 0), comfy.output(tr.id, 1)
    names = [f for f in _para_files(comfy) if f.startswith("trained_rt_")]
    assert len(names) == 1, names
    keys = [m + ".weight" for m in para.stages]
    assert len(keys) > 10

    g2 = comfy.graph("reload.")
    lo = g2.node("PaRaLoader", model=_sd15_model(g2, sd15).out(0), para_name=names[0], strength_model=1.0, strength_clip=1.0)
    g2.node("PreviewAny", source=lo.out(0))
    comfy.run(g2.finalize())
    loaded = comfy.output(lo.id, 0)

    w_trained = comfy.patched_state_dict(trained_model, keys)
    w_loaded = comfy.patched_state_dict(loaded, keys)
    w_base = comfy.base_state_dict(sd15["model"], keys)
    for k in keys:
        assert torch.equal(w_trained[k], w_loaded[k]), k
    assert all(not torch.equal(w_trained[k], w_base[k]) for k in keys)


# ---- 3. resume -----------------------------------------------------------------------------------------
def _sidecar_b(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return {k[2:]: v for k, v in load_file(path).items() if k.startswith("b.")}


def test_resume_continues_the_same_trajectory(comfy, sd15):
    n, m = 3, 2
    common = dict(seed=7, learning_rate=0.01, optimizer="AdamW")
    g = comfy.graph("full.")
    tr = _train_graph(g, _sd15_model(g, sd15).out(0), steps=n + m, save_every=n + m, filename_prefix="para/resume_full", **common)
    g.node("PreviewAny", source=tr.out(0))
    comfy.run(g.finalize())
    full_losses = list(comfy.output(tr.id, 2)["loss"])
    full_para = comfy.output(tr.id, 1)

    g = comfy.graph("first.")
    tr1 = _train_graph(g, _sd15_model(g, sd15).out(0), steps=n, save_every=n, filename_prefix="para/resume_part", **common)
    g.node("PreviewAny", source=tr1.out(0))
    comfy.run(g.finalize())
    part = [f for f in _para_files(comfy) if f.startswith(f"resume_part_{n}_steps_") and f.endswith(".safetensors")]
    assert len(part) == 1, _para_files(comfy)
    assert part[0][:-len(".safetensors")] + ".para_state" in _para_files(comfy)

    g = comfy.graph("second.")
    tr2 = _train_graph(g, _sd15_model(g, sd15).out(0), steps=m, save_every=m, existing_para=part[0],
                       filename_prefix="para/resume_part", **common)
    g.node("PreviewAny", source=tr2.out(0))
    comfy.run(g.finalize())
    assert comfy.output(tr2.id, 3) == n + m
    resumed_losses = list(comfy.output(tr2.id, 2)["loss"])
    assert len(resumed_losses) == n + m
    assert resumed_losses == full_losses  # float equality: B, optimizer state and loss history are restored exactly

    out = os.path.join(comfy.dirs["output"], "para")
    full_state = [f for f in os.listdir(out) if f.startswith(f"resume_full_{n + m}_steps_") and f.endswith(".para_state")]
    res_state = [f for f in os.listdir(out) if f.startswith(f"resume_part_{n + m}_steps_") and f.endswith(".para_state")]
    assert len(full_state) == 1 and len(res_state) == 1, os.listdir(out)
    b_full, b_res = _sidecar_b(os.path.join(out, full_state[0])), _sidecar_b(os.path.join(out, res_state[0]))
    assert b_full.keys() == b_res.keys()
    for k in b_full:
        assert torch.equal(b_res[k], b_full[k]), k
    res_para = comfy.output(tr2.id, 1)
    for k, q in _q_of(full_para).items():
        assert torch.equal(q, _q_of(res_para)[k]), k


def test_para_state_of_another_file_is_ignored_and_reported(comfy, sd15):
    """A sidecar that was not written with its file (here: another run's, copied beside it) is not used: the
    run continues from the file's bases with a fresh optimizer state and says so on the node."""
    import shutil
    common = dict(steps=2, save_every=2, learning_rate=0.01)
    g = comfy.graph("foreign_a.")
    a = _train_graph(g, _sd15_model(g, sd15).out(0), seed=21, filename_prefix="para/foreign_a", **common)
    b = _train_graph(g, _sd15_model(g, sd15).out(0), seed=22, filename_prefix="para/foreign_b", **common)
    g.node("PreviewAny", source=a.out(0))
    g.node("PreviewAny", source=b.out(0))
    comfy.run(g.finalize())
    out = os.path.join(comfy.dirs["output"], "para")
    fa = [f for f in os.listdir(out) if f.startswith("foreign_a_2_steps_") and f.endswith(".safetensors")]
    fb = [f for f in os.listdir(out) if f.startswith("foreign_b_2_steps_") and f.endswith(".para_state")]
    assert len(fa) == 1 and len(fb) == 1
    side = os.path.join(out, fa[0][:-len(".safetensors")] + ".para_state")
    shutil.copyfile(os.path.join(out, fb[0]), side)
    g = comfy.graph("foreign_resume.")
    tr = _train_graph(g, _sd15_model(g, sd15).out(0), steps=1, seed=21, existing_para=fa[0])
    g.node("PreviewAny", source=tr.out(0))
    ui = comfy.run(g.finalize())
    text = ui[tr.id]["text"][0]
    assert "ignored training state" in text and side in text and "not its training state" in text, text
    assert comfy.output(tr.id, 3) == 3 and len(comfy.output(tr.id, 2)["loss"]) == 1  # no foreign loss history


# ---- bad inputs fail before any step ---------------------------------------------------------------------
class _Steps:
    """Counts training steps through ComfyUI's progress-bar hook (the mechanism the server uses)."""

    def __enter__(self):
        import comfy.utils as cu
        self.cu, self.old, self.calls = cu, cu.PROGRESS_BAR_HOOK, []
        cu.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: self.calls.append(value))
        return self.calls

    def __exit__(self, *exc):
        self.cu.set_progress_bar_global_hook(self.old)


@pytest.mark.parametrize("prefix", ["../../x", "../escape", "para/a\0b", "", ".", "..", "para/..", "para/", "/tmp/x",
                                    "para/" + "x" * 300])
def test_bad_filename_prefix_fails_before_training(comfy, sd15, prefix):
    """Refused by ComfyUI's validation of the prompt (validate_inputs), with the one prefix message Save PaRa uses."""
    before = set(os.listdir(comfy.dirs["output"]))
    g = comfy.graph()
    tr = _train_graph(g, _sd15_model(g, sd15).out(0), steps=50, save_every=1, filename_prefix=prefix)
    g.node("PreviewAny", source=tr.out(0))
    with _Steps() as steps:
        msg = comfy.run_failing(g.finalize())
    assert steps == [], f"training started before the prefix was refused: {msg}"
    shown = prefix if len(prefix) <= 80 else prefix[:77] + "..."
    assert msg.startswith("validation failed: ") and "\n" not in msg, msg
    assert f"node {tr.id} (PaRaTrainer): Custom validation failed for node: filename_prefix - Train PaRa: " \
           f"filename_prefix {shown!r} cannot be used: " in msg, msg
    assert "such as 'para/my_subject' (plain names, at most 200 bytes)" in msg, msg
    assert set(os.listdir(comfy.dirs["output"])) == before


@pytest.mark.parametrize("other_output", [False, True])
def test_bad_save_para_prefix_downstream_stops_training_before_it_starts(comfy, sd15, other_output):
    """Train PaRa -> Save PaRa('../escape'): Save PaRa fails ComfyUI's validation, so nothing runs; with another
    valid output (ComfyUI then runs the rest of the prompt) Train PaRa refuses to start, naming the Save node."""
    before = set(os.listdir(comfy.dirs["output"]))
    g = comfy.graph()
    tr = _train_graph(g, _sd15_model(g, sd15).out(0), steps=50)
    sv = g.node("PaRaSave", para=tr.out(1), filename_prefix="../escape")
    if other_output:
        g.node("PreviewAny", source=tr.out(3))
    with _Steps() as steps:
        msg = comfy.run_failing(g.finalize())
    assert steps == [], f"training ran: {msg}"
    if other_output:
        assert msg == (f"PaRaTrainer (node {tr.id}): ValueError: Train PaRa: not started: Save PaRa (node {sv.id}) cannot "
                       "save what this node trains: filename_prefix '../escape' cannot be used: every part between slashes "
                       "must be a plain name (no empty part, '.' or '..'); use a relative path under the output folder "
                       "such as 'para/my_subject' (plain names, at most 200 bytes)"), msg
    else:
        assert msg.startswith("validation failed: ") and "\n" not in msg, msg
        assert (f"node {sv.id} (PaRaSave): Custom validation failed for node: filename_prefix - Save PaRa: filename_prefix "
                "'../escape' cannot be used: every part between slashes must be a plain name") in msg, msg
    assert set(os.listdir(comfy.dirs["output"])) == before


def test_existing_para_that_does_not_fit_fails_before_training(comfy, sd15):
    diff = sd15["model"].model.diffusion_model
    name, mod = next((n, m) for n, m in diff.named_modules() if n.endswith("attn1.to_q"))
    key = f"diffusion_model.{name}"
    out = mod.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    cases = {
        "para_wrong_rows.safetensors": ({key: [torch.randn(out + 3, 2, generator=g)]},
                                        [f"{key}.para_q has shape ({out + 3}, 2)", f"{tuple(mod.weight.shape)}"]),
        "para_rank_out.safetensors": ({key: [torch.randn(out, out, generator=g)]}, [f"{key}.para_q", f"({out}, {out})"]),
        "para_other_model.safetensors": ({"diffusion_model.joint_blocks.0.x_block.attn.qkv": [torch.randn(8, 1, generator=g)]},
                                         ["diffusion_model.joint_blocks.0.x_block.attn.qkv.para_q", "another model"]),
    }
    for fname, (stages, needles) in cases.items():
        if fname == "para_rank_out.safetensors":  # the format refuses to write r = out, so write the raw tensor
            comfy.write_safetensors("para", fname, {f"{m}.para_q": bs[0].half() for m, bs in stages.items()})
        else:
            comfy.write_para(fname, stages)
        gr = comfy.graph()
        tr = _train_graph(gr, _sd15_model(gr, sd15).out(0), steps=50, existing_para=fname)
        gr.node("PreviewAny", source=tr.out(0))
        with _Steps() as steps:
            msg = comfy.run_failing(gr.finalize())
        assert steps == [], f"{fname}: training started: {msg}"
        assert "\n" not in msg and comfy.path("para", fname) in msg and all(n in msg for n in needles), msg


# ---- 4. cancel -----------------------------------------------------------------------------------------
def test_cancel_stops_cleanly(comfy, sd15, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils as cu
    import server

    class Recorder:  # the in-process harness has no PromptServer instance: record the node's progress text
        client_id = None
        sent: list = []

        def send_progress_text(self, text, node_id, sid=None):
            self.sent.append((node_id, text))

    monkeypatch.setattr(server.PromptServer, "instance", Recorder(), raising=False)

    # Newer ComfyUI throttles progress updates by wall time: turn that off, so the hook sees every step on any machine
    for name in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT"):
        if hasattr(cu, name):
            monkeypatch.setattr(cu, name, 0)

    base_before = comfy.base_state_dict(sd15["model"])
    before_files = set(_para_files(comfy))
    calls = []

    def hook(value, total, preview, node_id=None):
        calls.append(value)
        if value >= 2:
            mm.interrupt_current_processing()

    old = cu.PROGRESS_BAR_HOOK
    cu.set_progress_bar_global_hook(hook)
    try:
        g = comfy.graph("cancel.")
        tr = _train_graph(g, _sd15_model(g, sd15).out(0), steps=50, save_every=1, seed=11, filename_prefix="para/cancelled")
        g.node("PreviewAny", source=tr.out(0))
        msg = comfy.run_failing(g.finalize())
    finally:
        cu.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    assert any(ev == "execution_interrupted" for ev, _ in comfy.server.messages), msg
    assert max(calls) == 2, calls  # stopped within the step after the interrupt
    # the node's last words: the cancel, the step, the checkpoint it kept (not "step 2/50 loss ...")
    last = [t for nid, t in Recorder.sent if nid == tr.id][-1]
    assert re.fullmatch(r"cancelled at step 2/50\nkept para/cancelled_2_steps_\d{5}_\.safetensors\n"
                        r"\(continue it with existing_para\)", last), last
    assert os.path.isfile(os.path.join(comfy.dirs["output"], last.split("\n")[1][len("kept "):]))

    after_files = set(_para_files(comfy)) - before_files
    assert all(PARA_DIR_FILES.match(f) and not re.search(r"tmp|partial", f) for f in after_files), after_files
    stems = {f.rsplit(".", 1)[0] for f in after_files}
    for s in stems:  # only complete pairs: the file and its training state
        assert {s + ".safetensors", s + ".para_state"} <= after_files, after_files
    assert len(stems) <= 2

    diffusion = sd15["model"].model.diffusion_model
    assert not [n for n, mod in diffusion.named_modules() if "forward" in mod.__dict__]  # wrappers removed
    base_after = comfy.base_state_dict(sd15["model"])
    for k, v in base_before.items():
        assert bits_equal(v, base_after[k]), k

    g = comfy.graph("after_cancel.")
    tr = _train_graph(g, _sd15_model(g, sd15).out(0), steps=2, seed=12)
    g.node("PreviewAny", source=tr.out(0))
    comfy.run(g.finalize())
    assert comfy.output(tr.id, 3) == 2


# ---- 5. presets on the real layouts --------------------------------------------------------------------
def _candidate_names(model) -> list[str]:
    return [n for n, m in model.model.named_modules()
            if hasattr(m, "weight_function") and getattr(m, "weight", None) is not None and m.weight.ndim >= 2]


SD15_EXPECT = {
    "ExCA": lambda n: not re.search(r"\.attn2\.|^diffusion_model\.time_embed\.|\.emb_layers\.|label_emb", n),
    "self_attention": lambda n: ".attn1." in n,
    "attention": lambda n: ".attn1." in n or ".attn2." in n,
    "all": lambda n: True,
}
SD3_EXPECT = {
    "ExCA": lambda n: not re.search(r"\.context_block\.|t_embedder|y_embedder|context_embedder|adaLN_modulation", n),
    "self_attention": lambda n: re.search(r"\.x_block\.attn2?\.", n) is not None,
    "attention": lambda n: re.search(r"\.x_block\.attn2?\.|\.context_block\.attn2?\.", n) is not None,
    "all": lambda n: True,
}


def _sd3_loader(comfy, g):
    return g.node("UNETLoader", unet_name=comfy.sd3_unet(), weight_dtype="default")


def _sd3_inputs(g):
    lat = g.node("ParaTestLatents", n=2, channels=16, size=8, seed=2).out(0)
    cond = g.node("ParaTestConditioning", tokens=6, dim=4096, pooled=2048, seed=3).out(0)
    return lat, cond


@pytest.mark.parametrize("layout", ["sd15", "sd3"])
def test_presets_select_documented_layers(comfy, sd15, layout):
    expect = SD15_EXPECT if layout == "sd15" else SD3_EXPECT
    g = comfy.graph(f"presets_{layout}.")
    if layout == "sd15":
        ld, lat, cond = _sd15_model(g, sd15), None, None
    else:
        ld = _sd3_loader(comfy, g)
        lat, cond = _sd3_inputs(g)
    trainers = {p: _train_graph(g, ld.out(0), latent=lat, cond=cond, steps=1, batch_size=1, targets=p, seed=1) for p in expect}
    for t in trainers.values():
        g.node("PreviewAny", source=t.out(0))
    comfy.run(g.finalize())
    names = _candidate_names(comfy.output(ld.id, 0))
    assert len(names) > 20
    for preset, rule in expect.items():
        got = sorted(comfy.output(trainers[preset].id, 1).stages)
        want = sorted(n for n in names if rule(n))
        assert got == want, f"{layout} {preset}: extra {sorted(set(got) - set(want))[:3]}, missing {sorted(set(want) - set(got))[:3]}"
    exca = set(comfy.output(trainers["ExCA"].id, 1).stages)
    if layout == "sd15":
        assert not any(".attn2." in n or "time_embed" in n or "emb_layers" in n for n in exca)
        assert any(".attn1." in n for n in exca) and any(".ff." in n for n in exca)
    else:
        assert not any(re.search(r"context_block|adaLN_modulation|t_embedder|y_embedder|context_embedder", n) for n in exca)
        assert any(".x_block.attn." in n for n in exca) and any(".x_block.mlp." in n for n in exca)


# ---- 6. core dataset path -------------------------------------------------------------------------------
def _pngs(folder: str, n: int) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(n):
        cx, cy = rng.integers(16, 48, size=2)
        blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < 120)[..., None] * rng.integers(60, 255, size=3)
        Image.fromarray((blob + rng.integers(0, 30, size=(64, 64, 3))).clip(0, 255).astype(np.uint8)).save(
            os.path.join(folder, f"p{i}.png"))


def test_core_dataset_nodes_feed_the_trainer(comfy, sd15):
    _pngs(os.path.join(comfy.dirs["input"], "para_train_ds"), 3)
    g = comfy.graph("dataset.")
    ld = _sd15_model(g, sd15)
    imgs = g.node("LoadImageDataSetFromFolder", folder="para_train_ds")
    ds = g.node("MakeTrainingDataset", images=imgs.out(0), vae=ld.out(2), clip=ld.out(1), texts="a photo of sks")
    tr = g.node("PaRaTrainer", model=ld.out(0), latents=ds.out(0), positive=ds.out(1), **dict(TRAIN_DEFAULTS, steps=3))
    plot = g.node("LossGraphNode", loss=tr.out(2), filename_prefix="para_loss")
    g.node("PreviewAny", source=tr.out(0))
    ui = comfy.run(g.finalize())
    assert ui[plot.id]["images"]
    assert comfy.output(tr.id, 3) == 3
    losses = comfy.output(tr.id, 2)["loss"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert "steps 3," in ui[tr.id]["text"][0]


# ---- 7. SD3 (flow) --------------------------------------------------------------------------------------
def test_sd3_trains_in_flow_space(comfy):
    g = comfy.graph("sd3train.")
    ld = _sd3_loader(comfy, g)
    lat, cond = _sd3_inputs(g)
    tr = _train_graph(g, ld.out(0), latent=lat, cond=cond, steps=3, batch_size=2, training_dtype="bf16",
                      gradient_checkpointing=True)
    g.node("PreviewAny", source=tr.out(0))
    ui = comfy.run(g.finalize())
    losses = comfy.output(tr.id, 2)["loss"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert "(flow space)" in ui[tr.id]["text"][0]
    assert comfy.output(tr.id, 1).stages

"""sd-scripts trains a PaRa, ComfyUI loads it: the weights Load PaRa patches equal the network's merged weights.

A generated full-architecture SD1.5 checkpoint (sd-scripts' own UNet / CLIP-L / VAE configs, random weights,
fp16) is trained for 2 steps by sd-scripts' real ``train_network.py --network_module para_core.kohya`` (batch 2,
64 px, text encoder trained too). sd-scripts then merges the file with the network's `merge_to`
(`tests/kohya/sd_tools.py merge`, as sd-scripts' --base_weights does), and ComfyUI loads the same checkpoint and
the same file through CheckpointLoaderSimple -> Load PaRa. Every patched UNet weight (fp32 in ComfyUI on CPU) must
agree with the merged one to fp32 rounding, every CLIP weight (fp16 in ComfyUI on CPU) to one fp16 ulp; the set of
patched layers is the file's; `para inspect` and Merge PaRa read the file.

Needs sd-scripts (KOHYA_PATH: its source tree) and ComfyUI (COMFYUI_PATH) in one Python with both their
requirements, as `.ci/kohya` builds it. Skipped with the reason when absent; COMFYUI_PARA_REQUIRE_KOHYA=1 (CI)
makes that a failure.
``init=random``: the default small_sv init of a full-size SD1.5 takes minutes on a CPU and is tested on its own
(tests/test_kohya.py); the file format and the merge do not depend on the init.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


from kohya_env import KOHYA, REPO, TOOLS, load_para_on_checkpoint, needs_kohya
from kohya_env import run_python as _run

pytestmark = needs_kohya()


def _train(ckpt: str, work: str, out_dir: str, name: str, *extra: str, steps: int = 2, lr: str = "1e-3"):
    """sd-scripts' train_network.py on the generated SD1.5: batch 2 of the 4 images, text encoder trained, seed 1."""
    return _run(os.path.join(KOHYA, "train_network.py"), "--pretrained_model_name_or_path", ckpt,
                "--train_data_dir", os.path.join(work, "data"), "--resolution", "64", "--output_dir", out_dir,
                "--output_name", name, "--save_model_as", "safetensors", "--network_module", "para_core.kohya",
                "--network_dim", "4", "--network_args", "init=random", "projection=output",
                "--max_train_steps", str(steps), "--learning_rate", lr, "--optimizer_type", "AdamW",
                "--mixed_precision", "no", "--tokenizer_cache_dir", os.path.join(work, "tok"), "--seed", "1",
                "--train_batch_size", "2", "--caption_extension", ".txt", "--max_data_loader_n_workers", "0",
                "--cache_latents", *extra, cwd=work)


@pytest.fixture(scope="module")
def trained(comfy, tmp_path_factory):
    """Checkpoint in ComfyUI's checkpoints folder, the trained PaRa in its para folder, sd-scripts' merged weights."""
    work = str(tmp_path_factory.mktemp("kohya"))
    ckpt = comfy.path("checkpoints", "kohya_sd15.safetensors")
    _run(TOOLS, "tokenizer", os.path.join(work, "tok"))
    _run(TOOLS, "images", os.path.join(work, "data"), "4")
    _run(TOOLS, "sd15", ckpt)
    _train(ckpt, work, comfy.dirs["para"], "kohya_para")
    para = comfy.path("para", "kohya_para.safetensors")
    merged = os.path.join(work, "merged.safetensors")
    _run(TOOLS, "merge", ckpt, para, merged)
    import safetensors.torch
    return {"ckpt": os.path.basename(ckpt), "ckpt_path": ckpt, "para": para, "work": work,
            "merged": safetensors.torch.load_file(merged)}


def _comfy_key(ckpt_key: str) -> tuple[str, str]:
    if ckpt_key.startswith("model.diffusion_model."):
        return "model", ckpt_key[len("model."):]
    assert ckpt_key.startswith("cond_stage_model.transformer."), ckpt_key
    return "clip", "clip_l." + ckpt_key[len("cond_stage_model."):]


def test_load_para_patches_what_sd_scripts_merged(comfy, trained):
    from harness import ulp  # tests/integration/harness.py, on sys.path once the comfy fixture ran

    from para_core import ParaModel
    para = ParaModel.load(trained["para"])
    assert all(n.startswith(("lora_unet_", "lora_te_")) for n in para.stages), "sd-scripts module names"
    n_te = sum(n.startswith("lora_te_") for n in para.stages)
    assert n_te == 72 and len(para.stages) == 266, (n_te, len(para.stages))  # ExCA on SD1.5 + CLIP-L attention/MLP

    lp_id, text = load_para_on_checkpoint(comfy, trained["ckpt"], trained["para"])
    assert "model: 194 layers patched, clip: 72 layers patched" in text, text

    keys = {"model": {}, "clip": {}}
    for k in trained["merged"]:
        part, ck_key = _comfy_key(k)
        keys[part][ck_key] = k
    assert len(keys["model"]) == 194 and len(keys["clip"]) == 72
    from safetensors import safe_open
    with safe_open(trained["ckpt_path"], "pt") as f:  # W0 as stored (fp16)
        w0 = {k: f.get_tensor(k) for k in trained["merged"]}
    for part, index in ((0, "model"), (1, "clip")):
        patcher = comfy.output(lp_id, part)
        got = comfy.patched_state_dict(patcher, list(keys[index]))
        moved = 0
        for ckey, mkey in keys[index].items():
            want = trained["merged"][mkey].to(torch.float64)
            have = got[ckey].to(torch.float64)
            assert have.shape == want.shape, (ckey, have.shape, want.shape)
            if got[ckey].dtype == torch.float32:  # UNet: the same fp32 math on the same fp16-stored W0 and Q
                tol = 4 * ulp(want.abs().max(), torch.float32)
            else:  # CLIP on CPU is fp16 in ComfyUI: its patched weight is the fp32 result rounded to fp16
                tol = ulp(want, got[ckey].dtype) + 4 * ulp(want.abs().max(), torch.float32)
            err = (have - want).abs()
            assert bool((err <= tol).all()), f"{ckey}: max |ComfyUI - sd-scripts merge| = {float(err.max()):.3e}"
            moved += bool((want - w0[mkey].to(torch.float64)).abs().max() > 1e-3 * want.abs().max())
        assert moved == len(keys[index]), f"{index}: only {moved} of {len(keys[index])} merged weights differ from W0"


def test_inspect_and_merge_accept_the_file(comfy, trained):
    r = subprocess.run([sys.executable, "-m", "para_core", "inspect", trained["para"]], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "layers:      266" in r.stdout and "ss_network_module: para_core.kohya" in r.stdout, r.stdout[:2000]
    g = comfy.graph()
    lf = g.node("PaRaLoadFile", para_name=os.path.basename(trained["para"]))
    mg = g.node("PaRaMerge", para_a=lf.out(0), para_b=lf.out(0), mode="union")
    g.node("PreviewAny", source=mg.out(0))
    ui = comfy.run(g.finalize())
    assert "union merge: 266 layers" in ui[mg.id]["text"][0], ui[mg.id]["text"]


def test_network_weights_resumes_from_the_saved_bases(comfy, trained):
    """``--network_weights <saved file>`` in the real train_network.py continues from the file.

    N steps + resume M steps is not bit-identical to N+M continuous steps in sd-scripts, and cannot be: a resumed
    run restarts its data order and noise from --seed (it sees the batches and noise of steps 1..M again, not
    N+1..N+M), AdamW's moments start at zero, and the file stores Q in fp16 while the continuous run keeps B in fp32.
    What resuming must guarantee is checked instead:

    * it starts exactly at the saved bases: resumed with learning rate 0 for one step, the saved Q equals the
      file's to one fp16 ulp of its largest entry (B = the file's Q, re-orthonormalised in fp32, stored in fp16 again), for all 266 layers,
      and sd-scripts reports that every layer continued from the file;
    * training then continues from there: resumed with the run's learning rate, every layer that gets a gradient
      moves away from the file (a run that ignored the file would reproduce the file itself: same seed, init, data).
    """
    from harness import ulp

    from para_core import ParaModel
    work, saved = trained["work"], ParaModel.load(trained["para"])
    out = os.path.join(work, "resume")
    r = _train(trained["ckpt_path"], work, out, "lr0", "--network_weights", trained["para"], steps=1, lr="0")
    assert "PaRa: 266 of 266 layers continue from kohya_para.safetensors" in r.stdout + r.stderr
    lr0 = ParaModel.load(os.path.join(out, "lr0.safetensors"))
    assert set(lr0.stages) == set(saved.stages) and len(saved.stages) == 266
    for n, (q,) in saved.stages.items():
        err = (lr0.stages[n][0].double() - q.double()).abs()
        tol = ulp(q.double().abs().max(), torch.float16)  # the file's fp16 rounding at the scale of the basis
        assert bool((err <= tol).all()), f"{n}: resumed at lr 0 moved by {float(err.max()):.3e} (> {float(tol):.1e})"

    _train(trained["ckpt_path"], work, out, "more", "--network_weights", trained["para"], steps=2)
    more = ParaModel.load(os.path.join(out, "more.safetensors"))
    moved = {n: float((more.stages[n][0].double() - q.double()).abs().max()) for n, (q,) in saved.stages.items()}
    # At 64 px the mid block sees a 1x1 latent: its self-attention has one token, softmax over one key is 1 whatever
    # q and k are, so to_q and to_k get no gradient (AdamW's weight decay alone moves them, ~1e-6). Every other layer
    # moves by the run's learning rate.
    no_gradient = {f"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_{p}" for p in "qk"}
    assert {n for n, d in moved.items() if d <= 2e-4} == no_gradient, sorted(moved.items(), key=lambda kv: kv[1])[:4]
    assert min(d for n, d in moved.items() if n not in no_gradient) > 2e-4

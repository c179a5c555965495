"""sd-scripts' Flux and SD3 trainers -> ComfyUI: the check of test_kohya_comfy.py on the two DiT families.

sd-scripts reads a DiT's depth from its checkpoint (`flux_utils.analyze_checkpoint_state`; SD3 also its width,
64·depth: `sd3_utils.analyze_state_dict_state`), so the models here are small and real: a Flux.1-dev at full width
(3072) with 1 double and 1 single block, an SD3.5-large-layout MMDiT of depth 2 (`sd_tools.py flux` / `sd3`, random,
bf16). Both trainers load a full T5-XXL whatever the data (a fixed config in `flux_utils.load_t5xxl`, 4.7B
parameters); it is generated as a sparse file of zeros, which sd-scripts mmaps (no disk, reclaimable page cache)
and runs once per caption under --cache_text_encoder_outputs. The CLIPs are random (CLIP-G at its full 32 layers,
1.4 GB bf16: `sd3_utils.load_clip_g` has a fixed config, and a trained layer on a zero W0 would not move).

sd-scripts' real ``flux_train_network.py`` / ``sd3_train_network.py --network_module para_core.kohya`` trains 2 steps
(bf16 weights as sd-scripts loads them under --mixed_precision bf16, the only way its T5 is not copied to fp32; 64 px,
batch 1, --network_train_unet_only: Flux's and SD3's text encoders are cached, as their guides advise), the
network's `merge_to` merges the file (`sd_tools.py merge_dit`, fp32 on the bf16 W0), and ComfyUI loads the same
diffusion model (UNETLoader) and the file (Load PaRa): every patched weight must agree with the merged one to fp32
rounding, every one moved away from W0, the set of patched layers the file's (ExCA: Flux 8, SD3 10 layers).

``flux_te`` is the same Flux run without --network_train_unet_only: flux_train_network.py then trains CLIP-L
(``lora_te1_``: 12 layers x q/k/v/out/fc1/fc2 = 72) and never T5 (``train_t5xxl`` stays False), so T5's outputs are
still cached (a partial cache: CLIP-L runs each step). ComfyUI loads that CLIP-L with CLIPLoader and Load PaRa
patches it (``lora_te1_`` -> ``clip_l.*`` in ComfyUI's key map, for every model holding a CLIP-L), compared with the
network's merge of the same file into sd-scripts' CLIP-L like the diffusion model's layers.

``sd3_te`` is the same for SD3: sd3_train_network.py without --network_train_unet_only trains CLIP-L
(``lora_te1_``, 72 layers) and CLIP-G (``lora_te2_``: 32 layers x 6 = 192), never T5 (``train_t5xxl`` False; T5's
outputs cached, the CLIPs run each step). ComfyUI loads both with DualCLIPLoader (type "sd3": clip-l + clip-g, no
T5) and Load PaRa patches them (``lora_te1_`` -> ``clip_l.*``, ``lora_te2_`` -> ``clip_g.*`` where a CLIP-L is
beside it, as in SDXL); each is compared with the network's merge into sd-scripts' CLIP-L / CLIP-G.

The tests run in sd-scripts' Python or, with KOHYA_PYTHON naming that Python, in ComfyUI's (the trainers and the
merge are subprocesses): e.g. ComfyUI 0.33.0's own venv.
"""
from __future__ import annotations

import os

import pytest
import torch
from kohya_env import KOHYA, TOOLS, needs_kohya
from kohya_env import run_python as _run

pytestmark = needs_kohya()

_FLUX = dict(trainer="flux_train_network.py", ckpt="flux.safetensors", models="flux",
             files=("--clip_l", "clip_l.safetensors", "--t5xxl", "t5xxl.safetensors", "--ae", "ae.safetensors"),
             args=("--guidance_scale", "1.0", "--timestep_sampling", "sigmoid", "--model_prediction_type", "raw",
                   "--discrete_flow_shift", "1.0"),
             layers=8, comfy_class="Flux")
_SD3 = dict(trainer="sd3_train_network.py", ckpt="sd3.safetensors", models="sd3",
            files=("--clip_l", "clip_l.safetensors", "--clip_g", "clip_g.safetensors", "--t5xxl", "t5xxl.safetensors"),
            args=("--training_shift", "1.0", "--weighting_scheme", "uniform"), layers=10, comfy_class="SD3")
FAMILIES = {
    "flux": _FLUX,
    # the same Flux with its CLIP-L trained too (flux_train_network.py trains CLIP-L unless
    # --network_train_unet_only; T5 never by default, so T5's outputs stay cached: a partial cache)
    "flux_te": {**_FLUX, "te_layers": {"lora_te1_": 72}, "te_files": ("clip_l",)},
    "sd3": _SD3,
    # the same SD3 with CLIP-L and CLIP-G trained (sd3_train_network.py trains both unless --network_train_unet_only;
    # T5 never by default: T5's outputs stay cached, the CLIPs run each step)
    "sd3_te": {**_SD3, "te_layers": {"lora_te1_": 72, "lora_te2_": 192}, "te_files": ("clip_l", "clip_g")},
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def trained_dit(request, comfy, tmp_path_factory):
    family, spec = request.param, FAMILIES[request.param]
    work = str(tmp_path_factory.mktemp(f"kohya_{family}"))
    models = os.path.join(str(tmp_path_factory.getbasetemp()), f"kohya_models_{spec['models']}")
    if not os.path.isdir(models):  # generated once, shared by flux and flux_te, sd3 and sd3_te
        _run(TOOLS, spec["models"], models)
    ckpt = comfy.path("diffusion_models", f"kohya_{family}.safetensors")
    if not os.path.exists(ckpt):
        os.symlink(os.path.join(models, spec["ckpt"]), ckpt)
    tok = os.path.join(work, "tok")
    _run(TOOLS, "tokenizer", tok)
    _run(TOOLS, "t5tok", tok)
    _run(TOOLS, "images", os.path.join(work, "data"), "2")
    files = [a if a.startswith("--") else os.path.join(models, a) for a in spec["files"]]
    name = f"kohya_{family}_para"
    r = _run(os.path.join(KOHYA, spec["trainer"]), "--pretrained_model_name_or_path", ckpt, *files,
         "--train_data_dir", os.path.join(work, "data"), "--resolution", "64", "--output_dir", comfy.dirs["para"],
         "--output_name", name, "--save_model_as", "safetensors", "--network_module", "para_core.kohya",
         "--network_dim", "4", "--network_args", "init=random", "projection=output",
         *(() if spec.get("te_layers") else ("--network_train_unet_only",)), "--cache_text_encoder_outputs", "--cache_latents", "--max_train_steps", "2", "--learning_rate", "1e-3",
         "--optimizer_type", "AdamW", "--mixed_precision", "bf16", "--tokenizer_cache_dir", tok, "--seed", "1",
         "--train_batch_size", "1", "--caption_extension", ".txt", "--max_data_loader_n_workers", "0",
         "--t5xxl_max_token_length", "16", *spec["args"], cwd=work)
    progress = [p for p in (r.stdout + r.stderr).replace("\r", "\n").splitlines() if p.startswith("steps: 100%")]
    print(f"\n{spec['trainer']} ({family}):", progress[-1] if progress else "(no progress line)")
    para = comfy.path("para", f"{name}.safetensors")
    merged = os.path.join(work, "merged.safetensors")
    # the trained CLIPs by ComfyUI's name for them (clip_l, clip_g: its key prefixes); merge_dit takes them in order
    te_files = {te: os.path.join(models, f"{te}.safetensors") for te in spec.get("te_files", ())}
    _run(TOOLS, "merge_dit", spec["models"], ckpt, para, merged, *te_files.values())
    if te_files:  # ComfyUI's text_encoders folder gets a folder of the test's own, holding these CLIPs
        te_dir = os.path.join(work, "text_encoders")
        os.makedirs(te_dir)
        for te, path in te_files.items():
            os.symlink(path, os.path.join(te_dir, f"kohya_{family}_{te}.safetensors"))
        comfy.folder_paths.add_model_folder_path("text_encoders", te_dir)
    return family, {"ckpt": os.path.basename(ckpt), "ckpt_path": ckpt, "para": para, "merged": merged,
                    "te_files": te_files}


def _compare(got: dict, merged: dict, keys: dict, w0: dict) -> int:
    """Every patched weight equal to sd-scripts' merge to fp32 rounding; returns how many moved away from W0."""
    from harness import ulp
    moved = 0
    for n, key in keys.items():
        want, have = merged[n].to(torch.float64), got[key].to(torch.float64)
        assert have.shape == want.shape, (n, key, have.shape, want.shape)
        # ComfyUI computes in fp32 on the same bf16-stored W0 and Q; where it keeps the weight in bf16 / fp16 (a
        # host that stores the model in its file's dtype, CLIP on CPU) the patched weight is the fp32 result rounded
        tol = 4 * ulp(want.abs().max(), torch.float32)
        if got[key].dtype != torch.float32:
            tol = tol + ulp(want, got[key].dtype)
        err = (have - want).abs()
        assert bool((err <= tol).all()), f"{n} ({key}): max |ComfyUI - sd-scripts merge| = {float(err.max()):.3e}"
        moved += bool((want - w0[n].to(torch.float64)).abs().max() > 1e-3 * want.abs().max())
    return moved


def test_dit_load_para_patches_what_sd_scripts_merged(comfy, trained_dit):
    from comfy.lora import model_lora_keys_clip, model_lora_keys_unet  # (not `import comfy.lora`: `comfy` is the harness fixture)
    from safetensors import safe_open
    from safetensors.torch import load_file

    from para_core import ParaModel
    family, t = trained_dit
    spec = FAMILIES[family]
    para = ParaModel.load(t["para"])
    unet_names = sorted(n for n in para.stages if n.startswith("lora_unet_"))
    te_names = sorted(n for n in para.stages if n.startswith("lora_te"))  # the CLIPs' (T5 is never trained)
    te_layers = spec.get("te_layers", {})
    assert len(unet_names) == spec["layers"], len(unet_names)
    assert {p: sum(n.startswith(p) for n in te_names) for p in te_layers} == te_layers
    assert len(te_names) == sum(te_layers.values()), te_names
    assert len(unet_names) + len(te_names) == len(para.stages), sorted(para.stages)
    assert para.metadata["ss_network_module"] == "para_core.kohya"
    merged = load_file(t["merged"])
    assert set(merged) == set(para.stages)

    g = comfy.graph()
    un = g.node("UNETLoader", unet_name=t["ckpt"], weight_dtype="default")
    # ComfyUI's LoRA key map sends lora_te1_ to clip_l.* in every model holding a CLIP-L (SDXL, SD3, Flux), and
    # lora_te2_ to clip_g.* where a CLIP-L is beside it (SDXL, SD3); the CLIPs loaded without T5 are those same
    # modules without the 9.8 GB T5 (DualCLIPLoader's "sd3" recipe: clip-l, clip-g)
    clip_names = [f"kohya_{family}_{te}.safetensors" for te in t["te_files"]]
    cl = None
    if len(clip_names) == 1:
        cl = g.node("CLIPLoader", clip_name=clip_names[0], type="stable_diffusion")
    elif clip_names:
        cl = g.node("DualCLIPLoader", clip_name1=clip_names[0], clip_name2=clip_names[1], type="sd3")
    clip = {"clip": cl.out(0)} if cl else {}
    lp = g.node("PaRaLoader", model=un.out(0), para_name=os.path.basename(t["para"]), strength_model=1.0,
                strength_clip=1.0, **clip)
    g.node("PreviewAny", source=lp.out(0))
    ui = comfy.run(g.finalize())
    report = f"model: {len(unet_names)} layers patched" + (f", clip: {len(te_names)} layers patched" if cl else "")
    assert report in ui[lp.id]["text"][0], ui[lp.id]["text"]
    patcher = comfy.output(lp.id, 0)
    assert type(patcher.model.model_config).__name__.startswith(spec["comfy_class"]), type(patcher.model.model_config)
    key_of = model_lora_keys_unet(patcher.model, {})
    keys = {n: key_of[n] for n in unet_names}
    got = comfy.patched_state_dict(patcher, sorted(set(keys.values())))
    prefix = "model.diffusion_model." if spec["comfy_class"] == "SD3" else ""
    with safe_open(t["ckpt_path"], "pt") as f:  # W0 as stored (bf16)
        w0 = {n: f.get_tensor(prefix + k[len("diffusion_model."):]) for n, k in keys.items()}
    moved = _compare(got, merged, keys, w0)
    assert moved == len(keys), f"only {moved} of {len(keys)} merged weights differ from W0"
    print(f"\n{family}: {len(keys)} patched weights equal sd-scripts' merge ({got[keys[unet_names[-1]]].dtype} in ComfyUI)")
    if cl:
        clip_out = comfy.output(lp.id, 1)
        te_key_of = model_lora_keys_clip(clip_out.patcher.model, {})
        te_keys = {n: te_key_of[n] for n in te_names}
        te_got = comfy.patched_state_dict(clip_out, sorted(set(te_keys.values())))
        assert all(k.startswith(tuple(f"{te}.transformer." for te in t["te_files"])) for k in te_keys.values()), te_keys
        for te, path in t["te_files"].items():  # ComfyUI's key: <te>.transformer.<HF name in the file>
            keys_te = {n: k for n, k in te_keys.items() if k.startswith(f"{te}.transformer.")}
            with safe_open(path, "pt") as f:  # W0 as stored (bf16)
                te_w0 = {n: f.get_tensor(k[len(f"{te}.transformer."):]) for n, k in keys_te.items()}
            te_moved = _compare(te_got, merged, keys_te, te_w0)
            assert te_moved == len(keys_te), f"only {te_moved} of {len(keys_te)} merged {te} weights differ from W0"
            print(f"{family}: {len(keys_te)} {te} weights equal sd-scripts' merge "
                  f"({te_got[next(iter(keys_te.values()))].dtype} in ComfyUI)")

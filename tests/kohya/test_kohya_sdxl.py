"""sd-scripts' SDXL trainer -> ComfyUI: the same check as test_kohya_comfy.py, on a full-architecture SDXL.

A full SDXL checkpoint (sd-scripts' SDXL UNet, CLIP-L, OpenCLIP bigG, SD VAE; random weights, fp16 on disk, 6.9 GB;
`sd_tools.py sdxl`) is generated once into a cache folder outside the repo (PARA_KOHYA_CACHE, default
~/.cache/comfyui-para-kohya), trained for 2 steps by sd-scripts' real ``sdxl_train_network.py --network_module
para_core.kohya`` (--mixed_precision bf16 --full_bf16: the UNet in bf16, the text encoders fp32 on CPU; batch 1,
64 px, both text encoders trained, as sd-scripts does without
--network_train_unet_only), merged by the network's own `merge_to` (`sd_tools.py merge_sdxl`), and loaded in ComfyUI
through CheckpointLoaderSimple -> Load PaRa. Every one of the 757 patched weights (493 UNet, 72 CLIP-L, 192 bigG) must
agree with sd-scripts' merged weight: UNet (fp32 in ComfyUI on CPU) to fp32 rounding, CLIP (fp16) to one fp16 ulp.

Opt-in (PARA_KOHYA_SDXL=1), run by hand: measured here on 2 shared CPU cores, 1 passed in 416 s (the trainer 45.7
s/step in bf16; peak RSS: trainer 13.5 GB, merge 17.3 GB, this process with ComfyUI's fp32 SDXL 17.8-19.3 GB).
Memory: ComfyUI's fp32 SDXL lives in this process. ComfyUI's patched weights are compared one key at a time with ComfyUI's own
`ModelPatcher.patch_weight_to_device` (what load_models_gpu calls per key), restoring each key from its backup right
after, so no second copy of the ~11 GB of patched weights is ever held. Run big suites under a lock on a shared machine.
``init=random`` for the reason given in test_kohya_comfy.py.
"""
from __future__ import annotations

import gc
import os

import pytest
import torch
from kohya_env import KOHYA, TOOLS, load_para_on_checkpoint, needs_kohya
from kohya_env import run_python as _run

OPT_IN = os.environ.get("PARA_KOHYA_SDXL") == "1"
# Opt-in, not in CI: ~7 min and a ~19 GB peak on 2 CPU cores (conftest.py lets this one skip under CI's REQUIRE)
pytestmark = [needs_kohya(), pytest.mark.skipif(not OPT_IN, reason="opt-in: set PARA_KOHYA_SDXL=1 (~7 min, ~19 GB RAM)")]
CACHE = os.environ.get("PARA_KOHYA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "comfyui-para-kohya")
SDXL_CKPT = "sdxl-random-fp16-v1.safetensors"  # bump the version when sd_tools.sdxl changes


def sdxl_checkpoint() -> str:
    """The cached generated SDXL checkpoint (written atomically, so a killed run leaves no half file)."""
    path = os.path.join(CACHE, SDXL_CKPT)
    if not os.path.isfile(path):
        os.makedirs(CACHE, exist_ok=True)
        _run(TOOLS, "sdxl", path)
    return path


@pytest.fixture(scope="module")
def trained_sdxl(comfy, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("kohya_sdxl"))
    ckpt = comfy.path("checkpoints", "kohya_sdxl.safetensors")
    if not os.path.exists(ckpt):
        os.symlink(sdxl_checkpoint(), ckpt)
    _run(TOOLS, "tokenizer", os.path.join(work, "tok"))
    _run(TOOLS, "images", os.path.join(work, "data"), "2")
    r = _run(os.path.join(KOHYA, "sdxl_train_network.py"), "--pretrained_model_name_or_path", ckpt,
         "--train_data_dir", os.path.join(work, "data"), "--resolution", "64", "--output_dir", comfy.dirs["para"],
         "--output_name", "kohya_sdxl_para", "--save_model_as", "safetensors", "--network_module", "para_core.kohya",
         "--network_dim", "4", "--network_args", "init=random", "projection=output", "--max_train_steps", "2",
         "--learning_rate", "1e-3", "--optimizer_type", "AdamW", "--mixed_precision", "bf16", "--full_bf16",
         "--tokenizer_cache_dir", os.path.join(work, "tok"), "--seed", "1", "--train_batch_size", "1",
         "--caption_extension", ".txt", "--max_data_loader_n_workers", "0", "--cache_latents", cwd=work)
    progress = [p for p in (r.stdout + r.stderr).replace("\r", "\n").splitlines() if p.startswith("steps: 100%")]
    print("\nsdxl_train_network.py:", progress[-1] if progress else "(no progress line)")
    para = comfy.path("para", "kohya_sdxl_para.safetensors")
    merged = os.path.join(work, "merged")
    _run(TOOLS, "merge_sdxl", ckpt, para, merged)
    return {"ckpt": os.path.basename(ckpt), "para": para,
            "merged": [os.path.join(merged, f) for f in sorted(os.listdir(merged))]}


def _compare_streamed(patcher, key_of: dict[str, str], merged: dict[str, torch.Tensor]) -> tuple[int, int, float]:
    """Patch each key with ComfyUI's patch_weight_to_device, compare with sd-scripts' merged weight, restore the key.
    Returns (compared, moved away from W0, max |error| / tolerance)."""
    import comfy.utils
    from harness import ulp
    compared = moved = 0
    worst = 0.0
    with torch.inference_mode():
        for name, want32 in merged.items():
            key = key_of[name]
            assert key in patcher.patches, f"{name} -> {key}: not patched by Load PaRa"
            w0 = comfy.utils.get_attr(patcher.model, key)
            patcher.patch_weight_to_device(key, device_to=torch.device("cpu"))
            got = comfy.utils.get_attr(patcher.model, key)
            want, have = want32.to(torch.float64), got.to(torch.float64)
            assert have.shape == want.shape, (name, have.shape, want.shape)
            if got.dtype == torch.float32:  # UNet: the same fp32 math on the same fp16-stored W0 and Q
                tol = 4 * ulp(want.abs().max(), torch.float32)
            else:  # CLIP is fp16 in ComfyUI on CPU: the fp32 result rounded to fp16
                tol = ulp(want, got.dtype) + 4 * ulp(want.abs().max(), torch.float32)
            err = (have - want).abs()
            assert bool((err <= tol).all()), f"{name} ({key}): max |ComfyUI - sd-scripts merge| = {float(err.max()):.3e}"
            worst = max(worst, float((err / tol).max()))
            moved += bool((want - w0.to(torch.float64)).abs().max() > 1e-3 * want.abs().max())
            compared += 1
            backup = patcher.backup.pop(key)
            comfy.utils.set_attr_param(patcher.model, key, backup.weight)
    return compared, moved, worst


def test_sdxl_load_para_patches_what_sd_scripts_merged(comfy, trained_sdxl):
    from comfy.lora import model_lora_keys_clip, model_lora_keys_unet  # `comfy` is the harness fixture
    import comfy.model_management as mm
    from safetensors.torch import load_file

    from para_core import ParaModel
    para = ParaModel.load(trained_sdxl["para"])
    count = {p: sum(n.startswith(p + "_") for n in para.stages) for p in ("lora_unet", "lora_te1", "lora_te2")}
    assert count == {"lora_unet": 493, "lora_te1": 72, "lora_te2": 192}, count  # ExCA + CLIP-L + bigG attention/MLP
    assert para.metadata["ss_network_module"] == "para_core.kohya" and "sdxl" in para.metadata["ss_base_model_version"]

    # a cache of its own: the SDXL goes when this test ends
    lp_id, text = load_para_on_checkpoint(comfy, trained_sdxl["ckpt"], trained_sdxl["para"], fresh_cache=True)
    assert "model: 493 layers patched, clip: 264 layers patched" in text, text
    model, clip = comfy.output(lp_id, 0), comfy.output(lp_id, 1).patcher
    mm.unload_all_models()
    key_of = {**model_lora_keys_unet(model.model, {}), **model_lora_keys_clip(clip.model, {})}
    totals = {"model": [0, 0, 0.0], "clip": [0, 0, 0.0]}
    try:
        for shard in trained_sdxl["merged"]:
            merged = load_file(shard)
            for part, patcher in (("model", model), ("clip", clip)):
                mine = {n: t for n, t in merged.items() if n.startswith("lora_unet_") == (part == "model")}
                c, m, w = _compare_streamed(patcher, key_of, mine)
                totals[part] = [totals[part][0] + c, totals[part][1] + m, max(totals[part][2], w)]
            del merged
    finally:
        del model, clip
        comfy._last_executor = comfy.executor  # drop the test's cache and with it ComfyUI's SDXL
        gc.collect()
    print(f"\nSDXL: compared {totals} (layers, moved from W0, worst error / tolerance)")
    assert totals["model"][:2] == [493, 493] and totals["clip"][:2] == [264, 264], totals

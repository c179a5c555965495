"""Dynamic-VRAM check: a PaRa-patched model larger than the VRAM ComfyUI may use samples the same image as the
same model fully loaded.

ComfyUI >= 0.16 streams the weights of a model that does not fit (dynamic VRAM, comfy-aimdo; the estimate-based
low-VRAM path before it): each offloaded layer's weight is patched per forward by `LowVramPatch`, and since 0.21
each adapter is first rebuilt as `type(adapter)(adapter.loaded_keys, weights)` around its tensors copied into a
VRAM buffer (`comfy.lora.prefetch_prepared_value`). This runs that path for real on a GPU:

* ``full``: the full-size SDXL UNet (random weights, fp16) with a PaRa (ExCA, rank 8), fully loaded;
* ``limited``: the same, with ComfyUI allowed only ``--budget-gb`` of VRAM (``--reserve-vram`` the rest), so
  most layers are streamed and patched on the fly;

each in its own process (ComfyUI reads its VRAM settings once), 8 Euler steps from the same noise at 1024 px
(128 x 128 latent, batch 1), and compares the final latents (the image is a fixed function of them). It also
reports how much of the model was resident and the peak VRAM of each run.

``--cpu-smoke`` runs the same comparison on the CPU with the tiny SD1.5 UNet, the limited run loading every layer
as a low-VRAM layer (`ModelPatcher.load(lowvram_model_memory=1)`: the same `LowVramPatch` per forward), to check the
script where there is no GPU.

    COMFYUI_PATH=/path/to/ComfyUI-0.33 python benchmarks/gpu_dynamic_vram.py [--budget-gb 3] [--cpu-smoke] [--out r.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def worker(comfyui: str, mode: str, arch: str, budget_gb: float, steps: int, latent: int, out: str) -> None:
    sys.path[:] = [comfyui] + [p for p in sys.path if p != comfyui]
    import torch
    from comfy.cli_args import args
    cuda = torch.cuda.is_available()
    if not cuda:
        args.cpu = True
    elif mode == "limited":
        total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        args.reserve_vram = max(0.0, total - budget_gb)
    import utils.extra_config  # noqa: F401  (before anything imports `nodes`)
    import comfy.model_management as mm
    import bench_train
    import unets
    pack = bench_train._import_pack()
    from importlib import import_module
    patching = import_module(f"{bench_train.PACK}.nodes.patching")
    fmt = import_module(f"{bench_train.PACK}.para_core.format")
    targets = import_module(f"{bench_train.PACK}.para_core.targets")
    assert pack is not None
    dtype = torch.float16 if cuda else torch.float32
    with torch.inference_mode():
        sd = {k: v.to(dtype) for k, v in unets.make_state_dict(arch).items()}
        mp = unets.load(arch, sd)
        del sd
        weights = {k[: -len(".weight")]: v for k, v in mp.model.state_dict().items() if k.endswith(".weight") and v.ndim >= 2}
        names = targets.select(sorted(weights), "ExCA")
        g = torch.Generator().manual_seed(7)
        para = fmt.ParaModel.from_bases({n: [torch.randn(weights[n].shape[0], min(8, weights[n].shape[0] - 1), generator=g)]
                                         for n in names}, dtype=torch.float16)
        model = patching.apply_para(para, mp, None, 1.0, 1.0)[0]
        g = torch.Generator().manual_seed(11)
        x = torch.randn(1, 4, latent, latent, generator=g)
        ctx = torch.randn(1, 77, unets.CONTEXT[arch], generator=g)
        extra = {"y": torch.randn(1, 2816, generator=g)} if unets.is_sdxl(arch) else {}
    dev = mm.get_torch_device()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if mode == "limited" and not cuda:
        model.load(dev, lowvram_model_memory=1)  # every layer a low-VRAM layer: LowVramPatch on each forward
    else:
        mm.load_models_gpu([model], force_full_load=(mode == "full"))
    resident = getattr(model, "model_loaded_weight_memory", None)
    lowvram_layers = sum(1 for m in model.model.modules() if any(getattr(f, "is_lowvram_patch", False) for f in getattr(m, "weight_function", []) or []))
    with torch.inference_mode():
        ms = model.model.model_sampling
        sigmas = torch.linspace(float(ms.sigma_max), float(ms.sigma_min), steps + 1).tolist() + [0.0]
        z = x.to(dev) * sigmas[0]
        for s, s_next in zip(sigmas[:-2], sigmas[1:-1]):  # Euler on the model's own denoised prediction
            sig = torch.tensor([s], device=dev)
            den = model.model.apply_model(z, sig, c_crossattn=ctx.to(dev), **{k: v.to(dev) for k, v in extra.items()}).float()
            z = z + (z - den) / s * (s_next - s)
        result = z.float().cpu()
    wall = time.perf_counter() - t0
    import safetensors.torch
    safetensors.torch.save_file({"latent": result.contiguous()}, out + ".safetensors")
    with open(out, "w") as f:
        json.dump(dict(mode=mode, arch=arch, device=str(dev), dtype=str(dtype), layers=len(names), wall_s=wall,
                       resident_bytes=resident, model_bytes=model.model_size(), lowvram_layers=lowvram_layers,
                       peak_vram=torch.cuda.max_memory_allocated() if cuda else None,
                       reserve_vram_gb=getattr(args, "reserve_vram", None)), f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", os.path.expanduser("~/ComfyUI")))
    ap.add_argument("--budget-gb", type=float, default=3.0, help="VRAM ComfyUI may use in the limited run (SDXL fp16 is 4.8 GiB)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--out", default="gpu_dynamic_vram.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    arch, latent = ("tiny_sd15", 8) if a.cpu_smoke else ("sdxl", 128)
    if a.worker:
        worker(a.comfyui, a.worker, arch, a.budget_gb, a.steps if not a.cpu_smoke else 3, latent, os.environ["PARA_DVRAM_OUT"])
        return 0
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("full", "limited"):
            out = os.path.join(tmp, f"{mode}.json")
            env = dict(os.environ, PARA_DVRAM_OUT=out)
            if a.cpu_smoke:
                env["CUDA_VISIBLE_DEVICES"] = ""
            cmd = [sys.executable, os.path.abspath(__file__), "--comfyui", a.comfyui, "--budget-gb", str(a.budget_gb),
                   "--steps", str(a.steps), "--worker", mode] + (["--cpu-smoke"] if a.cpu_smoke else [])
            rc = subprocess.run(cmd, env=env).returncode
            if rc:
                raise SystemExit(f"gpu_dynamic_vram: the {mode} run failed (exit {rc})")
            with open(out) as f:
                runs[mode] = json.load(f)
            import safetensors.torch
            runs[mode]["latent"] = safetensors.torch.load_file(out + ".safetensors")["latent"]
    full, lim = runs["full"].pop("latent"), runs["limited"].pop("latent")
    diff = float((full - lim).abs().max())
    scale = float(full.abs().max())
    report = {"full": runs["full"], "limited": runs["limited"], "max_abs_diff": diff, "max_abs": scale,
              "rel_diff": diff / max(scale, 1e-12),
              "streamed": runs["limited"]["lowvram_layers"] > 0 or (runs["limited"]["peak_vram"] is not None
                                                                   and (runs["limited"]["resident_bytes"] or 0) < runs["limited"]["model_bytes"])}
    # fp16 compute: the streamed path rounds each patched weight to fp16 in a different order than the baked one
    tol = 2e-2 if not a.cpu_smoke else 1e-5
    report["equal"] = report["rel_diff"] <= tol
    with open(a.out + ".partial", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(a.out + ".partial", a.out)
    for mode in ("full", "limited"):
        r = report[mode]
        print(f"{mode:8s} {r['arch']} {r['dtype']} on {r['device']}: {r['layers']} PaRa layers, resident "
              f"{(r['resident_bytes'] or 0) / 2 ** 30:.2f} of {r['model_bytes'] / 2 ** 30:.2f} GiB, low-VRAM layers "
              f"{r['lowvram_layers']}, peak VRAM {(r['peak_vram'] or 0) / 2 ** 30:.2f} GiB, {r['wall_s']:.1f} s")
    print(f"final latent: max |full - limited| = {diff:.3g} (max |latent| {scale:.3g}, relative {report['rel_diff']:.2e}); "
          f"streamed: {report['streamed']}; equal within {tol:g}: {report['equal']}")
    return 0 if report["equal"] and report["streamed"] else 1


if __name__ == "__main__":
    sys.exit(main())

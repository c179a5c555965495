"""GPU check, budget stated up front: Train PaRa's training step on the full-size Flux.1 dev transformer
(random weights, 11.9 B parameters) stored in fp8 (float8_e4m3fn, UNETLoader's ``weight_dtype``), at
1024x1024 px (128x128 latents: 4096 image tokens + 512 T5 tokens), bf16 compute, gradient checkpointing,
batch 1, ExCA rank 8 (the paper's setup) fits a 24 GB consumer GPU: torch.cuda.max_memory_allocated
< 24 GiB, measured over the model's load and the training steps. Exit 1 when over budget.

What runs is Train PaRa's own machinery from ``para_core``, not a copy: the ExCA plan for the Flux family
(``targets.plan``), B initialised from the fp8 weights (``ParaNetwork.from_weights``), the forward wrappers
with ComfyUI's weight cast (``comfy.ops.cast_bias_weight``: fp8 -> bf16 per call, as ComfyUI's manual-cast
ops do), ``checkpoint_units``/``enable_checkpointing`` over the blocks, one batched QR per step
(``ParaNetwork.step``) and ``TrainingLoop`` with AdamW. The model is ComfyUI's Flux class with Flux.1
dev's configuration (what ComfyUI's detection gives for the dev checkpoint), built directly on the GPU
(no 24 GB file to write). It needs only ComfyUI's model code (no server, no node API), so it runs where
ComfyUI's optional packages (av, torchsde) are missing.

    python benchmarks/gpu_flux_24gb.py --comfyui /path/to/ComfyUI [--out flux.json]
    python benchmarks/gpu_flux_24gb.py --comfyui ... --cpu-smoke   # a 2-block Flux on the CPU (checks the script)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUDGET_GIB = 24.0

FLUX_DEV = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000,
                patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
SMOKE = dict(FLUX_DEV, hidden_size=128, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 24, 24], context_in_dim=64,
             vec_in_dim=32)


def build(comfyui: str, config: dict, device, weight_dtype):
    """ComfyUI's Flux with this config, weights in weight_dtype on device (ComfyUI's ops skip init: every tensor
    is drawn here, N(0, 1/fan_in) for matrices, in bf16 and then cast), compute through manual-cast ops."""
    sys.path[:0] = [comfyui, REPO]
    import torch
    from comfy.cli_args import args
    if device.type == "cpu":
        args.cpu = True
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    import inspect
    params = inspect.signature(__import__("comfy.ldm.flux.model", fromlist=["FluxParams"]).FluxParams).parameters
    kwargs = {k: v for k, v in config.items() if k in params or k == "image_model"}  # 0.8 has no txt_ids_dims
    model = Flux(dtype=weight_dtype, device=device, operations=comfy.ops.manual_cast, **kwargs)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                v = torch.randn(p.shape, generator=g, device=device, dtype=torch.bfloat16) / p[0].numel() ** 0.5
            elif name.endswith("scale") or name.endswith("weight"):
                v = torch.ones(p.shape, device=device, dtype=torch.bfloat16)
            else:
                v = torch.randn(p.shape, generator=g, device=device, dtype=torch.bfloat16) * 0.02
            p.copy_(v.to(p.dtype))
            del v
    return model.requires_grad_(False)


def _train_compat():
    """`training_compat` of nodes/train_host.py (the trainer's fixes for ComfyUI's in-place residual updates and
    kitchen RoPE), imported without the pack's node registration (which needs ComfyUI's node API and its packages)."""
    import importlib.util
    import types
    for name, path in (("para_pack", REPO), ("para_pack.nodes", os.path.join(REPO, "nodes"))):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [path]
            sys.modules[name] = mod
    spec = importlib.util.spec_from_file_location("para_pack.nodes.train_host", os.path.join(REPO, "nodes", "train_host.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.training_compat


def run(a) -> dict:
    import torch
    cuda = not a.cpu_smoke
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    weight_dtype = getattr(torch, a.weight_dtype)
    config = SMOKE if a.cpu_smoke else FLUX_DEV
    t0 = time.perf_counter()
    model = build(a.comfyui, config, device, weight_dtype)
    import comfy.ops
    from para_core.layer import ParaNetwork
    from para_core.targets import plan
    from para_core.train import TrainingLoop, checkpoint_units, enable_checkpointing, make_optimizer
    n_params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    candidates = {f"diffusion_model.{n}": m for n, m in model.named_modules()
                  if hasattr(m, "comfy_cast_weights") and getattr(m, "weight", None) is not None and m.weight.ndim >= 2}
    p = plan({n: m.weight.shape[0] for n, m in candidates.items()}, a.targets, a.rank, layout="flux")
    net = ParaNetwork.from_weights({n: candidates[n].weight for n in p.ranks}, p.ranks, a.init, 0, a.projection).to(device)
    built_s = time.perf_counter() - t0

    def weight_of(module, x):  # as the Train PaRa node: the comfy op's own cast (fp8 -> compute dtype)
        return comfy.ops.cast_bias_weight(module, x)

    def bias_of(module, x):
        return None if module.bias is None else module.bias.to(x.device)
    compat = _train_compat()(model)  # the model's in-place residual updates made safe for backward, as Train PaRa does
    compat.__enter__()
    undo = [lambda: compat.__exit__(None, None, None)]
    undo += [net.attach(candidates, weight_of, bias_of), enable_checkpointing(checkpoint_units(model), net)]
    optimizer = make_optimizer("AdamW", [layer.b for _, layer in net.items()], 1e-4)
    lat = a.resolution // 8
    ctx_len = 512 if not a.cpu_smoke else 16
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 16, lat, lat, generator=gen).to(device)
    context = torch.randn(1, ctx_len, config["context_in_dim"], generator=gen).to(device)
    pooled = torch.randn(1, config["vec_in_dim"], generator=gen).to(device)

    def micro_loss(i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 + i)
        t = torch.rand(1, generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        xt = (1 - t) * x0 + t * noise  # rectified flow; the target velocity is noise - x0
        with torch.autocast(device.type, dtype=torch.bfloat16):
            v = model(xt.to(torch.bfloat16), t, context.to(torch.bfloat16), y=pooled.to(torch.bfloat16),
                      guidance=torch.full((1,), 3.5, device=device))
        return torch.nn.functional.mse_loss(v.float(), noise - x0)

    loop = TrainingLoop(optimizer, micro_loss, 1, step_context=lambda: net.step(check=False))
    times = []
    try:
        for step in range(a.steps):
            t = time.perf_counter()
            loop.step(step)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        loop.flush()
        net.check()
    finally:
        for u in reversed(undo):
            u()
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return {"model": "Flux.1 dev (random weights)" if not a.cpu_smoke else "2-block Flux (smoke)", "parameters": n_params,
            "weight_dtype": a.weight_dtype, "model_bytes": model_bytes, "resolution": a.resolution, "tokens": (lat // 2) ** 2 + ctx_len,
            "targets": a.targets, "layers": len(p.ranks), "rank": a.rank, "init": a.init, "projection": a.projection,
            "modes": net.describe_modes(), "build_s": built_s, "step_s": times, "losses": loop.losses,
            "peak_allocated_bytes": peak, "budget_gib": BUDGET_GIB,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "within_budget": None if peak is None else peak < BUDGET_GIB * 2 ** 30}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", os.path.expanduser("~/ComfyUI")))
    ap.add_argument("--out", help="write the result here (JSON)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=1024, help="image size in px (latents are /8)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="ExCA")
    ap.add_argument("--init", default="small_sv")
    ap.add_argument("--projection", default="auto")
    ap.add_argument("--weight-dtype", default="float8_e4m3fn")
    ap.add_argument("--cpu-smoke", action="store_true", help="a 2-block Flux at 64 px on the CPU: checks the script only")
    a = ap.parse_args()
    if a.cpu_smoke and a.resolution == 1024:
        a.resolution = 64
    r = run(a)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(r, f, indent=1)
    peak = r["peak_allocated_bytes"]
    print(f"{r['model']}: {r['parameters'] / 1e9:.2f} B parameters stored {r['weight_dtype']} ({r['model_bytes'] / 2 ** 30:.2f} GiB), "
          f"{r['resolution']} px ({r['tokens']} tokens), {r['targets']} rank {r['rank']} on {r['layers']} layers, bf16, checkpointing, "
          f"batch 1; {r['modes']}")
    print(f"  s/step {', '.join(f'{t:.2f}' for t in r['step_s'])}; losses {', '.join(f'{v:.4f}' for v in r['losses'])}")
    if peak is None:
        print("  (CPU smoke run: no GPU memory to measure)")
        return 0
    print(f"  peak GPU memory allocated {peak / 2 ** 30:.2f} GiB, budget {BUDGET_GIB:.0f} GiB: "
          f"{'PASS' if r['within_budget'] else 'FAIL'} ({r['device']})")
    return 0 if r["within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""PaRa inside ComfyUI vs ComfyUI's own LoRA path, on a full-size SD1.5 UNet (860M params, random weights).

For rank r in (4, 32), on the same layers (every attention projection and feed-forward Linear of the
16 transformer blocks, 160 weights):
* node time: Load PaRa's `execute` (read file, QR, key map, add_patches) vs `comfy.sd.load_lora_for_models`
  (what LoraLoader runs);
* patch time: `load_models_gpu` full load after `unload_all_models`, i.e. baking the patches into the
  weights (the unpatched base load is measured too and subtracted), with the peak RSS above the
  pre-load RSS, sampled every 2 ms;
* sampling time per step of the patched vs the base model: equal, since patches are baked once.

Timings are best-of-N; on a shared machine they are still noisy (OpenMP threads contend with other
processes), so compare the ratios of measurements taken in one run.

Run:  COMFYUI_PATH=/root/ComfyUI /root/ComfyUI/.venv/bin/python benchmarks/bench_comfy.py [--reps 3] [--steps 2]
On 2 idle CPU cores this takes about 1 minute (3 when other processes compete for them).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
import tempfile
import threading
import time

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=768, num_heads=8,
                 num_head_channels=-1, use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, use_temporal_resblock=False, use_temporal_attention=False, use_checkpoint=False)
TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def start_comfy(root: str, base: str):
    sys.path[:] = [root] + [p for p in sys.path if p != root] + [REPO_ROOT]  # ComfyUI's `nodes` before the pack's
    from comfy.cli_args import args
    args.cpu = True
    import folder_paths
    for sub in ("output", "temp", "input", "para"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    folder_paths.set_output_directory(os.path.join(base, "output"))
    folder_paths.set_temp_directory(os.path.join(base, "temp"))
    folder_paths.set_input_directory(os.path.join(base, "input"))
    folder_paths.add_model_folder_path("para", os.path.join(base, "para"), is_default=True)
    import utils.extra_config  # noqa: F401  (before `import nodes`)
    import nodes
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(REPO_ROOT, ignore=set(nodes.NODE_CLASS_MAPPINGS))):
        raise SystemExit(f"ComfyUI could not load the pack at {REPO_ROOT}")
    return nodes


def build_sd15():
    import torch
    import comfy.model_patcher
    import comfy.supported_models
    mc = comfy.supported_models.SD15(dict(SD15_UNET))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, "", device="cpu")
    model.requires_grad_(False)  # as ComfyUI's loaders leave it
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # comfy ops skip init
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def _release_freed_memory():
    """Make RSS follow live memory: glibc otherwise keeps freed blocks, so a second measurement would reuse them."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, fixed: big tensors are mmapped and unmapped on free
        libc.malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """Peak resident memory above the level at start, sampled in a thread (torch allocations are not traced by tracemalloc)."""

    def __init__(self, interval=0.002):
        import psutil
        self.proc, self.interval = psutil.Process(), interval

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mib(self):
        return (self.peak - self.base) / 2 ** 20


def timed_load(mp, reps):
    """Best-of-reps full load (patches baked), and peak RSS of the last rep."""
    import comfy.model_management as mm
    best = float("inf")
    for _ in range(reps):
        mm.unload_all_models()
        gc.collect()
        _release_freed_memory()
        with PeakRSS() as mem:
            t = time.perf_counter()
            mm.load_models_gpu([mp], force_full_load=True)
            best = min(best, time.perf_counter() - t)
    mm.unload_all_models()
    return best, mem.mib


def sample_times(models: dict, steps: int, rounds: int = 5) -> tuple[dict, dict, dict]:
    """Seconds per sampling step (256x256, cfg 1, euler): best per model, and per-round ratios to the first.

    The models run back to back in each round, in alternating order, so a round's ratio compares
    measurements taken under the same load from other processes.
    """
    import torch
    import comfy.model_management as mm
    import comfy.sample
    g = torch.Generator().manual_seed(1)
    latent = torch.zeros(1, 4, 32, 32)
    noise = torch.randn(latent.shape, generator=g)
    cond = [[torch.randn(1, 77, 768, generator=g), {}]]
    kw = dict(cfg=1.0, sampler_name="euler", scheduler="normal", positive=cond, negative=cond, latent_image=latent, disable_pbar=True, seed=1)
    names = list(models)
    best, outs, ratios = {k: float("inf") for k in models}, {}, {k: [] for k in names[1:]}
    for i in range(rounds):
        cur = {}
        for name in (names if i % 2 == 0 else names[::-1]):
            mp = models[name]
            with torch.inference_mode():  # as the executor runs nodes
                mm.load_models_gpu([mp], force_full_load=True)  # bake the patches before timing
                t = time.perf_counter()
                outs[name] = comfy.sample.sample(mp, noise, steps, **kw)
            cur[name] = (time.perf_counter() - t) / steps
            best[name] = min(best[name], cur[name])
        for k in names[1:]:
            ratios[k].append(cur[k] / cur[names[0]])
    mm.unload_all_models()
    return best, ratios, outs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--reps", type=int, default=3, help="loads per measurement (best of)")
    ap.add_argument("--steps", type=int, default=1, help="sampling steps timed per model and round (256x256, cfg 1)")
    a = ap.parse_args()
    root = os.path.abspath(os.path.expanduser(os.environ.get("COMFYUI_PATH", "~/ComfyUI")))
    logging.basicConfig(level=logging.WARNING)
    import torch
    with tempfile.TemporaryDirectory() as base:
        nodes = start_comfy(root, base)
        logging.getLogger().setLevel(logging.WARNING)
        import comfy.sd
        from para_core.format import ParaModel
        t = time.perf_counter()
        mp = build_sd15()
        n_params = sum(p.numel() for p in mp.model.diffusion_model.parameters())
        sd = mp.model.state_dict()
        layers = sorted(k[:-len(".weight")] for k in sd if k.endswith(".weight") and any(f".{s}.weight" in k for s in TARGETS))
        target_mib = sum(sd[m + ".weight"].numel() * 4 for m in layers) / 2 ** 20
        print(f"ComfyUI {root}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"SD1.5 UNet {n_params / 1e6:.1f}M params built in {time.perf_counter() - t:.1f}s; "
              f"{len(layers)} target weights ({target_mib:.0f} MiB fp32: patched copies are new tensors, the originals stay as backups)")
        loader = nodes.NODE_CLASS_MAPPINGS["PaRaLoader"]
        warm = ParaModel.from_bases({layers[0]: [torch.randn(sd[layers[0] + ".weight"].shape[0], 1)]})
        warm.save(os.path.join(base, "para", "warmup.safetensors"))
        with torch.inference_mode():  # one-time costs (imports, key-map code paths, LAPACK init) out of the timings
            loader.execute(model=mp, para_name="warmup.safetensors", strength_model=1.0, strength_clip=1.0)
            comfy.sd.load_lora_for_models(mp, None, {f"{layers[0]}.lora_up.weight": torch.zeros(320, 1),
                                                     f"{layers[0]}.lora_down.weight": torch.zeros(1, 320)}, 1.0, 0.0)
        patched = {}
        for r in a.ranks:  # the node step: what Load PaRa and LoraLoader run when the graph executes
            g = torch.Generator().manual_seed(r)
            para = ParaModel.from_bases({m: [torch.randn(sd[m + ".weight"].shape[0], r, generator=g)] for m in layers}, dtype=torch.float16)
            name = f"bench_r{r}.safetensors"
            para.save(os.path.join(base, "para", name))
            lora = {}
            for m in layers:
                w = sd[m + ".weight"]
                lora[f"{m}.lora_up.weight"] = (torch.randn(w.shape[0], r, generator=g) * 0.01).half()
                lora[f"{m}.lora_down.weight"] = (torch.randn(r, w.shape[1], generator=g) * 0.01).half()
                lora[f"{m}.alpha"] = torch.tensor(float(r))
            with torch.inference_mode():
                t = time.perf_counter()
                para_mp = loader.execute(model=mp, para_name=name, strength_model=1.0, strength_clip=1.0).args[0]
                para_node = time.perf_counter() - t
                t = time.perf_counter()
                lora_mp, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0.0)
                lora_node = time.perf_counter() - t
            assert len(para_mp.patches) == len(layers) == len(lora_mp.patches)
            patched[r] = (para_mp, lora_mp, para_node, lora_node)
        # sampling first: the allocator setting used for the memory figures below changes GEMM speed a little
        rmax = a.ranks[-1]
        steps, ratios, outs = sample_times({"base": mp, "para": patched[rmax][0], "lora": patched[rmax][1]}, a.steps)
        med = {k: sorted(v)[len(v) // 2] for k, v in ratios.items()}
        print(f"sampling 256x256, cfg 1, euler, r={rmax}: best s/step base {steps['base']:.2f} | PaRa {steps['para']:.2f} | "
              f"LoRA {steps['lora']:.2f}; per-round ratio to base PaRa {', '.join(f'{x:.2f}' for x in ratios['para'])} "
              f"(median {med['para']:.2f}), LoRA {', '.join(f'{x:.2f}' for x in ratios['lora'])} (median {med['lora']:.2f}); "
              f"patches are baked, so no per-step cost; PaRa output differs from base: {not torch.equal(outs['base'], outs['para'])}")
        base_load, base_mem = timed_load(mp, a.reps)
        print(f"base full load (no patches): {base_load * 1e3:.0f} ms, peak RSS +{base_mem:.0f} MiB")
        rows = []
        for r in a.ranks:
            para_mp, lora_mp, para_node, lora_node = patched[r]
            para_load, para_mem = timed_load(para_mp, a.reps)
            lora_load, lora_mem = timed_load(lora_mp, a.reps)
            pp, lp = para_load - base_load, lora_load - base_load
            rows.append((r, para_load, lora_load, pp, lp))
            print(f"r={r:>2}: node  PaRa {para_node * 1e3:7.0f} ms | LoRA {lora_node * 1e3:7.0f} ms\n"
                  f"      full load with patches  PaRa {para_load * 1e3:7.0f} ms | LoRA {lora_load * 1e3:7.0f} ms | ratio {para_load / lora_load:.2f}\n"
                  f"      patching (minus base)    PaRa {pp * 1e3:7.0f} ms | LoRA {lp * 1e3:7.0f} ms | ratio {pp / max(lp, 1e-9):.2f}\n"
                  f"      peak RSS above start     PaRa {para_mem:7.0f} MiB | LoRA {lora_mem:7.0f} MiB")
        print("summary: rank, PaRa/LoRA full-load ratio, PaRa/LoRA patch-only ratio; sampling PaRa/base, LoRA/base (best, median)")
        for r, pl, ll, pp, lp in rows:
            print(f"  r={r}: {pl / ll:.2f}, {pp / max(lp, 1e-9):.2f}")
        print(f"  sampling r={rmax}: best {steps['para'] / steps['base']:.2f}, {steps['lora'] / steps['base']:.2f}; "
              f"median {med['para']:.2f}, {med['lora']:.2f}")

if __name__ == "__main__":
    main()

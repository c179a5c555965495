"""The GPU check of issue 9, in one run: full-size SD1.5 and SDXL UNets (random weights at real sizes).

1. Patch time: baking a PaRa (ExCA layers, rank 4 and 32) into the weights at load (`load_models_gpu`, the
   base load subtracted) vs a LoRA of the same rank on the same layers through ComfyUI's LoraLoader path
   (`comfy.sd.load_lora_for_models`), best of --reps, on the GPU.
2. Training: seconds per step and peak GPU memory of Train PaRa (ExCA and all, projection auto) vs core
   Train LoRA vs the floor (no adapter), bf16, gradient checkpointing, batch 1 - core Train LoRA's defaults -
   SD1.5 at 512 px and SDXL at 1024 px, through benchmarks/bench_train.py (a fresh process per run).

Writes one JSON (--out) and prints a table. ``--cpu-smoke`` runs the same code on the CPU with the tiny
UNets at 64 px and 4 steps, to check the script itself where there is no GPU.

    COMFYUI_PATH=... python benchmarks/gpu_check.py --out gpu_check.json [--cpu-smoke]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def is_sdxl(arch: str) -> bool:
    return arch.endswith("sdxl")


_children: list[subprocess.Popen] = []


def _run(cmd: list[str], env: dict, capture: bool) -> tuple[int, str, str]:
    """Run a child whose process group goes down with this one (timeout sends SIGTERM to us only)."""
    p = subprocess.Popen(cmd, env=env, text=True, start_new_session=True,
                         stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    _children.append(p)
    out, err = p.communicate()
    _children.remove(p)
    return p.returncode, out or "", err or ""


def _on_term(signum, frame):
    for p in _children:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
    raise SystemExit(f"gpu_check: stopped by signal {signum}")


def patch_times(comfyui: str, arch: str, ranks: list[int], reps: int) -> list[dict]:
    """Bake-in time of PaRa vs LoRA on the ExCA layers of one UNet (in this process)."""
    sys.path[:0] = [HERE]
    import bench_train
    bench_train._setup_comfy(comfyui)
    import torch
    import comfy.model_management as mm
    import comfy.sd
    import unets
    pack = bench_train._import_pack()
    from importlib import import_module
    adapter = import_module(f"{bench_train.PACK}.nodes.patching")
    fmt = import_module(f"{bench_train.PACK}.para_core.format")
    targets = import_module(f"{bench_train.PACK}.para_core.targets")
    assert pack is not None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.inference_mode():
        sd = {k: v.to("cpu", torch.float16 if dev == "cuda" else torch.float32)
              for k, v in unets.make_state_dict(arch, device=dev).items()}
        mp = unets.load(arch, sd)
        del sd
    weights = {k[:-len(".weight")]: v for k, v in mp.model.state_dict().items() if k.endswith(".weight") and v.ndim >= 2}
    names = targets.select(sorted(weights), "ExCA")

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def load_time(model) -> float:
        best = float("inf")
        for _ in range(reps):
            mm.unload_all_models()
            sync()
            t = time.perf_counter()
            mm.load_models_gpu([model], force_full_load=True)
            sync()
            best = min(best, time.perf_counter() - t)
        mm.unload_all_models()
        return best

    rows = []
    with torch.inference_mode():
        base = load_time(mp)
        for r in ranks:
            g = torch.Generator().manual_seed(r)
            para = fmt.ParaModel.from_bases({n: [torch.randn(weights[n].shape[0], min(r, weights[n].shape[0] - 1), generator=g)]
                                             for n in names}, dtype=torch.float16)
            lora = {}
            for n in names:
                w = weights[n]
                rr = min(r, w.shape[0] - 1)
                lora[f"{n}.lora_up.weight"] = (torch.randn(w.shape[0], rr, generator=g) * 0.01).half()
                lora[f"{n}.lora_down.weight"] = (torch.randn(rr, w[0].numel(), generator=g) * 0.01).half().reshape(
                    (rr,) + tuple(w.shape[1:]))
                lora[f"{n}.alpha"] = torch.tensor(float(rr))
            t = time.perf_counter()
            para_mp = adapter.apply_para(para, mp, None, 1.0, 1.0)[0]
            para_node = time.perf_counter() - t
            t = time.perf_counter()
            lora_mp = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0.0)[0]
            lora_node = time.perf_counter() - t
            p_load, l_load = load_time(para_mp), load_time(lora_mp)
            rows.append(dict(arch=arch, rank=r, layers=len(names), device=dev, base_load_s=base, para_node_s=para_node,
                             lora_node_s=lora_node, para_load_s=p_load, lora_load_s=l_load,
                             para_patch_s=p_load - base, lora_patch_s=l_load - base,
                             patched_layers=(len(para_mp.patches), len(lora_mp.patches))))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", os.path.expanduser("~/ComfyUI")))
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny UNets on the CPU: checks the script, measures nothing")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--patch-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.patch_worker:
        cfg = json.loads(a.patch_worker)
        print(json.dumps(patch_times(a.comfyui, cfg["arch"], cfg["ranks"], cfg["reps"])))
        return 0
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    smoke = a.cpu_smoke
    archs = {"sd15": 64, "sdxl": 128} if not smoke else {"tiny_sd15": 8, "tiny_sdxl": 8}  # latent size (px / 8)
    steps = a.steps if not smoke else 4  # 2 warm-up steps, then the measured ones
    env = dict(os.environ, COMFYUI_PATH=a.comfyui)
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    report: dict = {"conditions": dict(dtype="bf16", gradient_checkpointing=True, batch=1, rank=4, steps=steps,
                                       smoke=smoke, archs={k: f"{v * 8}px" for k, v in archs.items()}),
                    "patch": [], "train": []}
    t_start = time.perf_counter()
    for arch in archs:
        cmd = [sys.executable, os.path.abspath(__file__), "--comfyui", a.comfyui, "--patch-worker",
               json.dumps(dict(arch=arch, ranks=[4, 32] if not smoke else [4], reps=a.reps if not smoke else 1))]
        rc, stdout, stderr = _run(cmd, env, capture=True)
        if rc:
            sys.stderr.write(stderr[-4000:])
            raise SystemExit(f"patch timing for {arch} failed (exit {rc})")
        report["patch"].extend(json.loads(stdout.strip().splitlines()[-1]))
        print(f"[{time.perf_counter() - t_start:6.0f} s] patch timing {arch} done", flush=True)
    for arch, res in archs.items():
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        kinds = "floor,core,exca,all" if is_sdxl(arch) else "floor,core,exca"  # keeps the whole check under 8 minutes
        cmd = [sys.executable, os.path.join(HERE, "bench_train.py"), "--comfyui", a.comfyui, "--arch", arch, "--res", str(res),
               "--dtypes", "bf16", "--steps", str(steps), "--repeats", "1", "--kinds", kinds,
               "--threads", str(os.cpu_count() if not smoke else 1), "--json", out]
        rc, _, _ = _run(cmd, env, capture=False)
        if rc:
            raise SystemExit(f"training benchmark for {arch} failed (exit {rc})")
        with open(out) as f:
            report["train"].extend(json.load(f))
        os.unlink(out)
        print(f"[{time.perf_counter() - t_start:6.0f} s] training {arch} done", flush=True)
    report["wall_s"] = time.perf_counter() - t_start
    tmp = a.out + ".partial"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, a.out)
    print_table(report)
    return 0


def print_table(report: dict) -> None:
    c = report["conditions"]
    print(f"\n== patch (bake into weights at load), ExCA layers ==")
    print(f"{'arch':10s} {'rank':>4s} {'layers':>6s} {'PaRa ms':>9s} {'LoRA ms':>9s} {'ratio':>6s}   (node: PaRa / LoRA ms)")
    for r in report["patch"]:
        print(f"{r['arch']:10s} {r['rank']:4d} {r['layers']:6d} {r['para_patch_s'] * 1e3:9.1f} {r['lora_patch_s'] * 1e3:9.1f} "
              f"{r['para_patch_s'] / max(r['lora_patch_s'], 1e-9):6.2f}   ({r['para_node_s'] * 1e3:.0f} / {r['lora_node_s'] * 1e3:.0f})")
    print(f"\n== training, {c['dtype']}, checkpointing, batch {c['batch']}, rank {c['rank']}, {c['steps']} steps ==")
    print(f"{'arch':10s} {'run':30s} {'s/step':>8s} {'peak MiB':>9s} {'/floor':>7s} {'/core':>6s} {'mem/core':>8s}  set-up s")
    by = {}
    for r in report["train"]:
        by.setdefault(r["arch"], {})[r["key"]] = r
    for arch, rs in by.items():
        fl, core = rs.get("floor"), rs.get("core")
        for k, r in rs.items():
            print(f"{arch:10s} {r['name']:30s} {r['s_per_step']:8.3f} {r['peak_bytes'] / 2 ** 20:9.0f} "
                  f"{r['s_per_step'] / fl['s_per_step'] if fl else float('nan'):7.2f} "
                  f"{r['s_per_step'] / core['s_per_step'] if core else float('nan'):6.2f} "
                  f"{r['peak_bytes'] / max(core['peak_bytes'], 1) if core else float('nan'):8.2f}  "
                  f"{r.get('before_first_step_s', float('nan')):7.1f}" + (f"  {r['modes']}" if r.get("modes") else ""))
    print(f"\nwall time {report['wall_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())

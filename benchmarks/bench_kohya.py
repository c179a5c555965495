"""sd-scripts' train_network.py with networks.lora (rank r) and with para_core.kohya (same r, same layers) on the same
data and settings: s/step, peak memory and file size side by side, ratios PaRa / LoRA from the same run.

Same layers: networks.lora's default set, i.e. every Linear / 1x1 conv inside the UNet's transformer blocks
(``*.attentions.*``) and CLIP's attention and MLP linears; PaRa gets ``targets=all`` restricted to ``attentions``
and ``rank_boundary=0`` (rank r everywhere, as LoRA). PaRa's ``projection`` is ``output`` (``--projection auto``
lets it time both spaces), its init ``random`` (``--init small_sv``: minutes of set-up on a CPU, same s/step). Methods run interleaved (lora, para, lora, para, ...); s/step is the median of the
steps after the first two (warm-up), ranges are min-max over the repeats.

    KOHYA_PATH=/path/to/sd-scripts python benchmarks/bench_kohya.py [--rank 4] [--steps 6] [--repeats 2]
        [--resolution 64] [--batch 2] [--ckpt SD15.safetensors] [--mixed_precision no]

Without --ckpt a full-architecture SD1.5 with random weights (fp16, 2 GB) is generated (tests/kohya/sd_tools.py),
with 4 random images and a generated tokenizer: nothing is downloaded. Run it in sd-scripts' environment.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tests", "kohya", "sd_tools.py")
TIMED = os.path.join(REPO, "benchmarks", "kohya_timed.py")


def run(cmd: list[str], env: dict) -> None:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd[:3])} ...\n{r.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--ckpt")
    ap.add_argument("--mixed_precision", default="no")
    ap.add_argument("--projection", default="output")
    ap.add_argument("--init", default="random",
                    help="PaRa's init (default random: small_sv, the pack's default, costs minutes of set-up on a CPU "
                         "for a full-size SD1.5 and does not change s/step)")
    a = ap.parse_args()
    if a.steps < 4:
        sys.exit("--steps must be at least 4 (the first 2 are warm-up)")
    kohya = os.environ.get("KOHYA_PATH")
    if not kohya or not os.path.isfile(os.path.join(kohya, "train_network.py")):
        sys.exit("set KOHYA_PATH to sd-scripts' source tree")
    env = {**os.environ, "KOHYA_PATH": kohya, "PYTHONPATH": REPO}
    work = tempfile.mkdtemp(prefix="bench_kohya.")
    run([sys.executable, TOOLS, "tokenizer", os.path.join(work, "tok")], env)
    run([sys.executable, TOOLS, "images", os.path.join(work, "data"), "4"], env)
    ckpt = a.ckpt
    if not ckpt:
        ckpt = os.path.join(work, "sd15.safetensors")
        print("generating a full-architecture SD1.5 (random weights, fp16) ...", flush=True)
        run([sys.executable, TOOLS, "sd15", ckpt], env)
    common = ["--pretrained_model_name_or_path", ckpt, "--train_data_dir", os.path.join(work, "data"),
              "--resolution", str(a.resolution), "--save_model_as", "safetensors", "--network_dim", str(a.rank),
              "--network_alpha", str(a.rank), "--max_train_steps", str(a.steps), "--learning_rate", "1e-4",
              "--optimizer_type", "AdamW", "--mixed_precision", a.mixed_precision, "--save_precision", "fp16",
              "--tokenizer_cache_dir", os.path.join(work, "tok"), "--seed", "1", "--train_batch_size", str(a.batch),
              "--caption_extension", ".txt", "--max_data_loader_n_workers", "0", "--cache_latents"]
    methods = {
        "lora": ["--network_module", "networks.lora"],
        "para": ["--network_module", "para_core.kohya", "--network_args", "targets=all", r"exclude=^(?!.*attentions\.)",
                 "rank_boundary=0", f"init={a.init}", f"projection={a.projection}"],
    }
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(a.repeats):
        for m, extra in methods.items():
            out = os.path.join(work, f"{m}{rep}")
            js = out + ".json"
            print(f"repeat {rep + 1}/{a.repeats}: {m} ...", flush=True)
            run([sys.executable, TIMED, js, os.path.join(kohya, "train_network.py"), *common, *extra,
                 "--output_dir", out, "--output_name", m], env)
            with open(js) as f:
                rec = json.load(f)
            ends = rec["step_ends"]
            rec["s_step"] = statistics.median(b - e for e, b in zip(ends[1:], ends[2:]))
            rec["file"] = os.path.getsize(os.path.join(out, f"{m}.safetensors"))
            results[m].append(rec)

    def rng(vals, fmt):
        lo, hi = fmt.format(min(vals)), fmt.format(max(vals))
        return lo if lo == hi else f"{lo}-{hi}"

    gpu = any(r["cuda_peak"] for r in results["lora"])
    mem_key = "cuda_peak" if gpu else "peak_rss"
    print(f"\nsd-scripts train_network.py, full-architecture SD1.5 (random weights), {a.resolution} px, batch {a.batch}, "
          f"rank {a.rank}, mixed_precision {a.mixed_precision}, AdamW, cached latents, text encoder trained, "
          f"PaRa projection {a.projection}, init {a.init}, "
          f"{a.steps} steps (median of steps 3-{a.steps}), {a.repeats} interleaved repeats, "
          f"{'GPU' if gpu else 'CPU'}; memory: {'peak CUDA allocated' if gpu else 'peak RSS of the process'}\n")
    print("| | networks.lora | para_core.kohya | PaRa / LoRA |")
    print("|---|---|---|---|")
    lo, pa = results["lora"], results["para"]
    print(f"| s/step | {rng([r['s_step'] for r in lo], '{:.2f}')} | {rng([r['s_step'] for r in pa], '{:.2f}')} | "
          f"{rng([p['s_step'] / l['s_step'] for l, p in zip(lo, pa)], '{:.2f}')} |")
    print(f"| peak memory (GiB) | {rng([r[mem_key] / 2**30 for r in lo], '{:.2f}')} | "
          f"{rng([r[mem_key] / 2**30 for r in pa], '{:.2f}')} | {rng([p[mem_key] / l[mem_key] for l, p in zip(lo, pa)], '{:.2f}')} |")
    print(f"| file size (MiB) | {lo[0]['file'] / 2**20:.2f} | {pa[0]['file'] / 2**20:.2f} | {pa[0]['file'] / lo[0]['file']:.2f} |")


if __name__ == "__main__":
    main()

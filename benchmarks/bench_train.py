"""Train PaRa against ComfyUI's own Train LoRA and against the floor, on the same UNet, data and conditions.

The **floor** is the same training loop (the Train PaRa node's, unchanged: data, noise, σ, autocast,
checkpointing, loss, optimizer) on the same model with no adapter at all: the frozen model, with one scalar
(x 1) on the first conv's output as the only thing that needs a gradient. It costs one forward, one
recomputation (checkpointing) and the activation gradients of backward through every layer - what any
adapter method pays, because an adapter in the first layers needs the gradient to flow back through all of
them. PaRa / floor is the
adapter's own overhead; PaRa / core Train LoRA the comparison users see.

Every configuration runs in its own fresh process (so peak memory is that run's alone) and calls the node's
``execute`` in-process, under ``torch.inference_mode()`` as ComfyUI's executor does. Configurations are
interleaved and repeated (``--repeats``); ratios are taken within a repeat and reported as min-max.
Reported: seconds per step (median after 2 warm-up steps), peak memory above the loaded model (CUDA: max
allocated; CPU: the process's peak RSS, VmHWM, reset through /proc/self/clear_refs just before training),
the saved file size (core LoRA at its default lora_dtype bf16, PaRa at fp16) and, for projection=auto,
which space it chose per layer (timed at step 1, para_core.layer).

Fairness: the core trainer has no layer selection - it trains LoRA on *every* layer (plus bias/norm
diffs). PaRa is therefore run both on its default ExCA preset and on ``all`` (every layer Train LoRA
trains), and file sizes are also compared against the core LoRA's tensors restricted to the ExCA layers.

    COMFYUI_PATH=... python benchmarks/bench_train.py [--arch tiny_sd15,tiny_sdxl] [--dtypes bf16,fp32]
        [--steps 8] [--res 16] [--repeats 3]
    COMFYUI_PATH=... python benchmarks/bench_train.py --arch sd15 --res 64 --dtypes bf16 --steps 4 --repeats 1 \
        --kinds floor,core,exca     # one full-size SD1.5 UNet at 512 px
    python benchmarks/bench_train.py --init-study [--steps 60]

``--init-study`` compares B initialisations (small_sv / random / top_sv): the model's output change at
step 0 and a fixed-noise evaluation loss after N steps, over 3 seeds (tiny SD1.5).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "comfyui_para_bench"


# ---- worker side -----------------------------------------------------------------------------------
def _setup_comfy(root: str):
    sys.path[:] = [root] + [p for p in sys.path if p != root]
    import torch
    from comfy.cli_args import args
    if not torch.cuda.is_available():
        args.cpu = True
    import folder_paths
    import utils.extra_config  # noqa: F401  (before anything imports `nodes`)
    return folder_paths


def _import_pack():
    """The repository as a package (the pack uses relative imports), as ComfyUI imports custom nodes."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = mod
    spec.loader.exec_module(mod)
    return mod


def _unets():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import unets
    return unets


def _data(cfg):
    return _unets().data(cfg.get("arch", "tiny_sd15"), cfg["images"], cfg["res"])


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> int:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _rss_kib("VmRSS")


def worker(cfg: dict) -> dict:
    """One configuration, in this (fresh) process. Prints nothing; returns the measurements."""
    _setup_comfy(cfg["comfyui"])
    import torch
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    torch.manual_seed(0)
    torch.set_num_threads(cfg["threads"])
    with torch.inference_mode():  # as the executor: parameters are inference tensors
        wd = cfg.get("weight_dtype")
        model = _unets().load_file(cfg.get("arch", "tiny_sd15"), cfg["model_file"], WEIGHT_DTYPES[wd] if wd else None)
        latents, positive = _data(cfg)
        mm.load_models_gpu([model], force_full_load=True)
    cuda = torch.cuda.is_available()
    stamps: list[float] = []
    cpu_stamps: list[float] = []  # this process's CPU time: less sensitive than the clock to other processes
    prof = None
    if cfg.get("profile"):  # steady state only: skip set-up and the 2 warm-up steps (incl. auto's timing)
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] +
                                      ([torch.profiler.ProfilerActivity.CUDA] if cuda else []),
                                      schedule=torch.profiler.schedule(wait=1, warmup=1, active=max(1, cfg["steps"] - 2)))

    def on_step(v, t, p, node_id=None):
        stamps.append(time.perf_counter())
        cpu_stamps.append(time.process_time())
        if prof is not None:
            prof.step()
    comfy.utils.set_progress_bar_global_hook(on_step)
    common = dict(model=[model], latents=latents, positive=positive, batch_size=[cfg["batch"]], grad_accumulation_steps=[1],
                  steps=[cfg["steps"]], learning_rate=[5e-4], rank=[cfg["rank"]], optimizer=["AdamW"], loss_function=["MSE"],
                  seed=[0], training_dtype=[cfg["dtype"]], gradient_checkpointing=[cfg["checkpointing"]])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    else:
        base_mem = _reset_peak()
    t0 = time.perf_counter()
    out: dict = {"name": cfg["name"]}
    if prof is not None:
        prof.__enter__()
    with torch.inference_mode():
        if cfg["kind"] == "core":
            from comfy_extras.nodes_train import TrainLoraNode
            import inspect
            later = dict(quantized_backward=[False], checkpoint_depth=[1], offloading=[cfg.get("offloading", False)],
                         bypass_mode=[False])  # inputs of newer ComfyUIs (0.33), at their defaults
            params = inspect.signature(TrainLoraNode.execute).parameters
            res = TrainLoraNode.execute(**common, lora_dtype=[cfg["lora_dtype"]], algorithm=["LoRA"], existing_lora=["[None]"],
                                        bucket_mode=[False], **{k: v for k, v in later.items() if k in params})
            outs = tuple(res.args) if hasattr(res, "args") else tuple(res)
            lora, loss_map = (outs[0], outs[1]) if len(outs) == 3 else (outs[1], outs[2])  # 0.33: no MODEL output
        else:
            pack = _import_pack()
            from importlib import import_module
            nt = import_module(f"{PACK}.nodes.nodes_train")
            layer_mod = import_module(f"{PACK}.para_core.layer")
            seen: list = []
            with _floor(layer_mod, model) if cfg["kind"] == "floor" else _spy(layer_mod, seen):
                res = nt.PaRaTrainer.execute(**common, targets=[cfg["targets"]], rank_boundary=[cfg["gamma"]], loss_space=["x0"],
                                             projection=[cfg["projection"]], init=[cfg.get("init", "small_sv")])
            para, loss_map = res[1], res[2]
            if seen:
                out["modes"] = seen[-1].describe_modes()
            assert pack is not None
    if prof is not None:
        prof.__exit__(None, None, None)
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        out["profile"] = prof.key_averages().table(sort_by=key, row_limit=cfg["profile"])
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base_mem
    else:
        peak = (_rss_kib("VmHWM") - base_mem) * 1024
    out["total_s"] = time.perf_counter() - t0
    out["before_first_step_s"] = stamps[0] - t0 if stamps else float("nan")  # set-up incl. the small_sv init
    diffs = [b - a for a, b in zip(stamps, stamps[1:])][2:]
    out["s_per_step"] = statistics.median(diffs) if diffs else float("nan")
    out["s_per_step_min"] = min(diffs) if diffs else float("nan")  # least disturbed by other processes
    out["step_s"] = diffs
    cpu_diffs = [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:])][2:]
    out["cpu_s_per_step"] = statistics.median(cpu_diffs) if cpu_diffs else float("nan")
    out["peak_bytes"] = peak
    out["loss"] = loss_map["loss"]
    tmp = tempfile.mkdtemp()
    if cfg["kind"] == "core":
        import safetensors.torch
        # what the core Save LoRA node writes, at its default lora_dtype bf16 (2 bytes, like PaRa's fp16 bases)
        lora = {k: v.to(torch.bfloat16) for k, v in lora.items()}
        path = os.path.join(tmp, "lora.safetensors")
        safetensors.torch.save_file(lora, path)
        out["file_bytes"] = os.path.getsize(path)
        from importlib import import_module
        _import_pack()
        targets = import_module(f"{PACK}.para_core.targets")
        names = {n for n in {k.rsplit(".", 2)[0] for k in lora if k.endswith(("lora_up.weight", "lora_down.weight"))}}
        exca = set(targets.select(sorted(names), "ExCA"))
        sub = {k: v for k, v in lora.items() if k.rsplit(".", 2)[0] in exca and not k.endswith((".diff", ".diff_b"))}
        path2 = os.path.join(tmp, "lora_exca.safetensors")
        safetensors.torch.save_file(sub, path2)
        out["file_bytes_exca_layers"] = os.path.getsize(path2)
        out["layers"] = len(names)
    elif cfg["kind"] == "floor":
        out["file_bytes"], out["layers"] = 0, 0
    else:
        path = os.path.join(tmp, "para.safetensors")
        para.save(path)
        out["file_bytes"] = os.path.getsize(path)
        out["layers"] = len(para.stages)
    out["device"] = "cuda" if cuda else "cpu"
    return out


@contextmanager
def _floor(layer_mod, model):
    """Run the Train PaRa loop with no adapter: nothing attached, no bases computed, and one scalar s = 1 that
    multiplies the output of the UNet's first conv as the only trainable thing. Backward then computes every
    activation gradient down to that conv (as PaRa on ExCA, whose first layer is that conv, must)
    and no weight gradient. (Making the input latent require a gradient instead adds the input gradient of
    the 4-channel first conv, which in bf16 on a CPU without bf16 instructions took most of a step.)"""
    import torch
    cls = layer_mod.ParaNetwork
    attach, step = cls.attach, cls.step
    scale = torch.ones((), requires_grad=True)

    def no_attach(self, modules, *a, **k):
        return lambda: None

    @contextmanager
    def no_step(self, *a, **k):
        yield {}

    def times_scale(module, args, output):
        return output * scale.to(output.device, output.dtype)

    unet = model.model.diffusion_model
    # the UNet's first conv (conv_in): the UNet calls the layers of its blocks one by one, not the blocks
    first = unet.input_blocks[0][0] if hasattr(unet, "input_blocks") else next(m for m in unet.children())
    hook = first.register_forward_hook(times_scale)
    cls.attach, cls.step = no_attach, no_step
    try:
        yield
    finally:
        cls.attach, cls.step = attach, step
        hook.remove()


@contextmanager
def _spy(layer_mod, seen: list):
    """Keep the trainer's ParaNetwork (to report what projection=auto chose)."""
    cls = layer_mod.ParaNetwork
    attach = cls.attach

    def spy(self, *a, **k):
        seen.append(self)
        return attach(self, *a, **k)
    cls.attach = spy
    try:
        yield
    finally:
        cls.attach = attach


def init_study_worker(cfg: dict) -> dict:
    """Step-0 output change and trained evaluation loss for one (init, seed)."""
    _setup_comfy(cfg["comfyui"])
    import torch
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    torch.set_num_threads(cfg["threads"])
    pack = _import_pack()
    from importlib import import_module
    nt = import_module(f"{PACK}.nodes.nodes_train")
    host = import_module(f"{PACK}.nodes.train_host")
    adapter = import_module(f"{PACK}.nodes.patching")
    layer_mod = import_module(f"{PACK}.para_core.layer")
    targets = import_module(f"{PACK}.para_core.targets")
    assert pack is not None
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(cfg["model_file"]))
        latents, positive = _data(cfg)
    g = torch.Generator().manual_seed(99)
    x0 = latents[0]["samples"]
    n_eval = 16
    idx = torch.randint(0, x0.shape[0], (n_eval,), generator=g)
    pct = torch.rand(n_eval, generator=g) * 0.9 + 0.05
    noise = torch.randn((n_eval,) + tuple(x0.shape[1:]), generator=g)
    ctx = positive[0][0][0]

    def predict(patcher):
        with torch.inference_mode():
            mm.load_models_gpu([patcher], force_full_load=True)
            base = patcher.model
            lat = base.process_latent_in(x0[idx])
            sigma = torch.tensor([float(base.model_sampling.percent_to_sigma(float(p))) for p in pct])
            # the trainer's own loss forward: the error in the model's prediction space (ε for SD1.5)
            return host.prediction_error(base, lat, noise, sigma, {"c_crossattn": ctx.repeat(n_eval, 1, 1)})

    def eval_loss(patcher):
        return float(predict(patcher).square().mean())

    base_err = predict(model)
    out = {"init": cfg["init"], "seed": cfg["seed"], "base_eval_loss": float(base_err.square().mean())}
    # step 0: the PaRa as initialised, applied as patches
    with torch.inference_mode(False):
        cands = host.trainable_layers(model.model)
        p = targets.plan({n: m.weight.shape[0] for n, m in cands.items()}, "ExCA", cfg["rank"], 0.025, exclude=cfg["exclude"])
        net = layer_mod.ParaNetwork.from_weights({n: cands[n].weight.detach().clone() for n in p.ranks}, p.ranks, cfg["init"], cfg["seed"])
        para0 = net.to_para_model({}, dtype=torch.float32)
    with torch.inference_mode():
        m0, _, _ = adapter.apply_para(para0, model, None, 1.0, 1.0)
    err0 = predict(m0)
    out["step0_output_change"] = float((err0 - base_err).norm() / base_err.norm())
    out["step0_eval_loss"] = float(err0.square().mean())
    with torch.inference_mode():
        res = nt.PaRaTrainer.execute(model=[model], latents=latents, positive=positive, batch_size=[cfg["batch"]],
                                     grad_accumulation_steps=[1], steps=[cfg["steps"]], learning_rate=[cfg["lr"]], rank=[cfg["rank"]],
                                     optimizer=["AdamW"], loss_function=["MSE"], seed=[cfg["seed"]], training_dtype=["fp32"],
                                     gradient_checkpointing=[False], targets=["ExCA"], rank_boundary=[0.025],
                                     loss_space=["prediction"], init=[cfg["init"]], exclude=[cfg["exclude"]])
    out["trained_eval_loss"] = eval_loss(res[0])
    losses = res[2]["loss"]
    k = max(1, len(losses) // 10)
    out["train_loss_first_tenth"] = sum(losses[:k]) / k
    out["train_loss_last_tenth"] = sum(losses[-k:]) / k
    return out


# ---- driver side -------------------------------------------------------------------------------------
def _run_worker(cfg: dict, mode: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--{mode}", json.dumps(cfg)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"worker {cfg.get('name', cfg)} failed (exit {p.returncode})")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _model_file(comfyui: str, folder: str, arch: str = "tiny_sd15") -> str:
    """Build the UNet once (in a worker process) and save it; every configuration loads this file (full-size
    UNets in fp16, as their checkpoints are distributed; tiny ones in fp32)."""
    path = os.path.join(folder, f"{arch}_unet.safetensors")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--make-model",
                    json.dumps({"comfyui": comfyui, "path": path, "arch": arch, "fp16": arch in ("sd15", "sdxl")})], check=True)
    return path


WEIGHT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8_e4m3fn": "float8_e4m3fn"}


def _fmt_mib(b: float) -> str:
    return f"{b / 2 ** 20:8.1f} MiB"


KINDS = {  # short name: (label, worker settings)
    "floor": ("floor (no adapter)", dict(kind="floor", targets="ExCA", projection="auto")),
    "core": ("core Train LoRA (all layers)", dict(kind="core")),
    "exca": ("PaRa ExCA (auto)", dict(kind="para", targets="ExCA", projection="auto")),
    "all": ("PaRa all (auto)", dict(kind="para", targets="all", projection="auto")),
    "output": ("PaRa ExCA (output space)", dict(kind="para", targets="ExCA", projection="output")),
    "weight": ("PaRa ExCA (weight space)", dict(kind="para", targets="ExCA", projection="weight")),
}


def _range(values: list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def main_bench(a) -> int:
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    archs, dtypes, kinds = a.arch.split(","), a.dtypes.split(","), a.kinds.split(",")
    files = {arch: _model_file(a.comfyui, tmp, arch) for arch in archs}
    results: dict[tuple, list[dict]] = {}
    for rep in range(a.repeats):  # interleaved: every configuration once per repeat
        for arch in archs:
            for dtype in dtypes:
                base = dict(comfyui=a.comfyui, model_file=files[arch], arch=arch, steps=a.steps, res=a.res, images=4,
                            batch=a.batch, rank=a.rank, dtype=dtype, checkpointing=not a.no_checkpointing, threads=a.threads,
                            lora_dtype=dtype, gamma=0.025, profile=a.profile, weight_dtype=a.weight_dtype)
                for k in kinds:
                    label, extra = KINDS[k]
                    r = _run_worker(dict(base, name=label, **extra), "worker")
                    results.setdefault((arch, dtype, k), []).append(r)
                    print(f"[{rep + 1}/{a.repeats}] {arch:9s} {dtype} {label:30s} {r['s_per_step'] * 1000:9.1f} ms/step  "
                          f"peak {_fmt_mib(r['peak_bytes'])}" + (f"  {r['modes']}" if r.get("modes") else ""), flush=True)
    device = next(iter(results.values()))[0]["device"]
    print(f"\nconditions: {a.res * 8}x{a.res * 8} px ({a.res}x{a.res} latents, 4 images), batch {a.batch}, rank {a.rank}, "
          f"gradient checkpointing {'off' if a.no_checkpointing else 'on'}, AdamW, {a.steps} steps (median after 2 warm-up), "
          f"{a.threads} thread(s), device {device}, weights stored {a.weight_dtype or 'as ComfyUI chooses'}, "
          f"{a.repeats} interleaved repeats (ranges are min-max)")
    for arch in archs:
        for dtype in dtypes:
            rs = {k: results[(arch, dtype, k)] for k in kinds}
            print(f"\n{arch}, {dtype}:")
            for k in kinds:
                print(f"  {KINDS[k][0]:30s} {_range([r['s_per_step'] * 1000 for r in rs[k]], '{:.1f}'):>13s} ms/step  "
                      f"(CPU {_range([r['cpu_s_per_step'] * 1000 for r in rs[k]], '{:.0f}'):>9s} ms)  peak {_range([r['peak_bytes'] / 2 ** 20 for r in rs[k]], '{:.0f}'):>9s} MiB")

            def ratio(num: str, den: str, field: str = "s_per_step") -> str:
                if num not in rs or den not in rs:
                    return "-"
                return _range([x[field] / y[field] for x, y in zip(rs[num], rs[den]) if y[field]])
            print("  ratios                         target    ExCA         all")
            print(f"  PaRa / floor, s/step           <=1.15    {ratio('exca', 'floor'):12s} {ratio('all', 'floor')}")
            print(f"  PaRa / floor, CPU s/step       <=1.15    {ratio('exca', 'floor', 'cpu_s_per_step'):12s} "
                  f"{ratio('all', 'floor', 'cpu_s_per_step')}")
            print(f"  PaRa / core LoRA, s/step       <=0.50    {ratio('exca', 'core'):12s} {ratio('all', 'core')}")
            print(f"  PaRa / core LoRA, peak memory  <=1.00    {ratio('exca', 'core', 'peak_bytes'):12s} "
                  f"{ratio('all', 'core', 'peak_bytes')}")
            if "core" in rs and "exca" in rs:
                fb = [x["file_bytes"] / y["file_bytes"] for x, y in zip(rs["exca"], rs["core"])]
                print(f"  PaRa / core LoRA, file size              {_range(fb):12s} {ratio('all', 'core', 'file_bytes')}")
            if all(k in rs for k in ("exca", "output", "weight")):
                best = [min(o["s_per_step"], w["s_per_step"]) for o, w in zip(rs["output"], rs["weight"])]
                print(f"  auto / faster of output, weight          {_range([x['s_per_step'] / b for x, b in zip(rs['exca'], best)])}"
                      f"   (auto chose: {rs['exca'][-1].get('modes', '?')})")
    _memory_table(results, archs, dtypes, kinds)
    if a.profile:
        for (arch, dtype, k), v in results.items():
            print(f"\nprofile, {arch} {dtype} {KINDS[k][0]} (steps 3-{a.steps}, self time per op):\n{v[-1]['profile']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dict(r, arch=arch, dtype=dtype, key=k) for (arch, dtype, k), v in results.items() for r in v], f, indent=1)
    return 0


def _memory_table(results: dict, archs: list[str], dtypes: list[str], kinds: list[str]) -> None:
    """Peak memory above the loaded model per configuration (min-max over repeats) and PaRa / core Train LoRA."""
    cols = [k for k in kinds if k != "core"]
    print("\npeak memory above the loaded model, MiB (min-max over repeats); in brackets: / core Train LoRA")
    print("| UNet | training dtype | " + " | ".join(KINDS[k][0] for k in ["core"] + cols if k in kinds) + " |")
    print("|---" * (2 + len(kinds)) + "|")
    for arch in archs:
        for dtype in dtypes:
            rs = {k: results[(arch, dtype, k)] for k in kinds}
            cells = []
            for k in (["core"] if "core" in kinds else []) + cols:
                cell = _range([r["peak_bytes"] / 2 ** 20 for r in rs[k]], "{:.0f}")
                if "core" in rs and k != "core":
                    cell += " (" + _range([x["peak_bytes"] / y["peak_bytes"] for x, y in zip(rs[k], rs["core"]) if y["peak_bytes"]]) + "x)"
                cells.append(cell)
            print(f"| {arch} | {dtype} | " + " | ".join(cells) + " |")


def main_init_study(a) -> int:
    tmp = tempfile.mkdtemp(prefix="bench_init_")
    model_file = _model_file(a.comfyui, tmp)
    rows = []
    for init in ("small_sv", "random", "top_sv"):
        for seed in range(a.seeds):
            cfg = dict(comfyui=a.comfyui, model_file=model_file, steps=a.steps, res=a.res, images=4, batch=a.batch,
                       rank=a.rank, lr=a.lr, init=init, seed=seed, threads=a.threads, exclude=a.exclude)
            r = _run_worker(cfg, "init-worker")
            rows.append(r)
            print(f"{init:9s} seed {seed}: step-0 output change {r['step0_output_change'] * 100:6.2f} %  eval loss "
                  f"base {r['base_eval_loss']:.4f} step0 {r['step0_eval_loss']:.4f} after {a.steps} steps "
                  f"{r['trained_eval_loss']:.4f}  (train loss first/last tenth {r['train_loss_first_tenth']:.3f}/"
                  f"{r['train_loss_last_tenth']:.3f})", flush=True)
    print(f"\nmeans over {a.seeds} seeds (ExCA{' -exclude ' + a.exclude if a.exclude else ''}, rank {a.rank}, lr {a.lr}, {a.steps} steps, {a.res}x{a.res}, batch {a.batch}):")
    for init in ("small_sv", "random", "top_sv"):
        rs = [r for r in rows if r["init"] == init]
        print(f"  {init:9s} step-0 change {statistics.mean(r['step0_output_change'] for r in rs) * 100:6.2f} %   "
              f"eval loss after training {statistics.mean(r['trained_eval_loss'] for r in rs):.4f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", os.path.expanduser("~/ComfyUI")))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--res", type=int, default=16, help="latent size (16 = 128 px images)")
    ap.add_argument("--batch", type=int, default=1, help="images per step (core Train LoRA's default: 1)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--arch", default="tiny_sd15,tiny_sdxl", help="comma-separated: tiny_sd15, tiny_sdxl, sd15, sdxl")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated training dtypes (core's default: bf16)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {','.join(KINDS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile each run with torch.profiler and print its N most expensive ops (self time)")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--weight-dtype", choices=sorted(WEIGHT_DTYPES), default=None,
                    help="store the UNet's weights in this dtype, as UNETLoader's weight_dtype (default: ComfyUI's choice)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads per run (default 1: on a small shared CPU, OpenMP threads that spin-wait for a busy "
                         "core make multi-thread step times swing by 10-20x between runs)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--init-study", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--exclude", default="", help="--init-study: exclude these layers from ExCA (regex)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--init-worker", help=argparse.SUPPRESS)
    ap.add_argument("--make-model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    if a.make_model:
        cfg = json.loads(a.make_model)
        _setup_comfy(cfg["comfyui"])
        import safetensors.torch
        import torch
        dev = "cuda" if torch.cuda.is_available() else "cpu"  # full-size random weights are drawn fast on a GPU
        dtype = torch.float16 if cfg.get("fp16") else torch.float32
        sd = _unets().make_state_dict(cfg.get("arch", "tiny_sd15"), device=dev, dtype=dtype)  # drawn in the file's dtype: half the RAM
        safetensors.torch.save_file({k: v.to("cpu", dtype).contiguous() for k, v in sd.items()}, cfg["path"])
        return 0
    if a.init_worker:
        print(json.dumps(init_study_worker(json.loads(a.init_worker))))
        return 0
    if a.init_study:
        a.steps = a.steps or 60
        return main_init_study(a)
    a.steps = a.steps or 8
    if a.steps < 4:
        ap.error(f"--steps {a.steps}: the first 2 steps are warm-up, so at least 4 are needed for a timed step")
    return main_bench(a)


if __name__ == "__main__":
    sys.exit(main())

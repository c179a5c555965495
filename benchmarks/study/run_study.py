"""The PaRa study in a small world (issue 16): does a trained PaRa capture its subject, and at what cost?

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/study/run_study.py [--seeds 0 1 2] [--steps 150] [--out benchmarks/study]

Builds (or loads from ~/.cache/comfyui-para-study) the world of world.py - a base model pretrained here on shapes ×
colours × positions, a frozen tiny CLIP, a judge - then, per seed, runs real ComfyUI graphs: Train PaRa (PaRaTrainer)
and core Train LoRA on the same subject latents and caption, same steps, batch, learning rate and rank, and samples
every model with the same KSampler settings and noise. Writes results.json, results.md (the table) and grid.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# appended, not prepended: the repo root holds a `nodes` package that must not shadow ComfyUI's nodes.py
sys.path += [p for p in (HERE, os.path.abspath(os.path.join(HERE, "..", ".."))) if p not in sys.path]

import graphs as G  # noqa: E402
from benchmarks.study import world as W  # noqa: E402

RANK, STEPS = 4, 200
LR = 1e-2                        # the CI quality test's PaRa learning rate (the study tunes one per method: `tune`)
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
TUNE_SEED = 9                    # tuning runs on its own seed, never one the study reports
METHODS = {  # method -> what `train` builds: Train PaRa with its default loss, with Train LoRA's, core Train LoRA
    "PaRa": ("para", "prediction"), "PaRa, x0 loss": ("para", "x0"), "LoRA": ("lora", None)}
PRESERVE = [("square", "red", "left"), ("plus", "blue", "middle"), ("cross", "green", "right"),
            ("square", "yellow", "right"), ("plus", "green", "left"), ("cross", "yellow", "middle")]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- the world in a running ComfyUI -----------------------------------------------------------------------------
def setup(cfg: W.WorldConfig, harness=None, base_dir: str | None = None):
    """(harness, judge, facts): ComfyUI with the study's input nodes, the base model and CLIP under keys "base" and
    "clip", the judge. Pretraining and the judge come from the cache when it has them."""
    torch.set_num_threads(cfg.threads)
    if harness is None:
        harness = G.start_comfy(base_dir or tempfile.mkdtemp(prefix="para-study-"))
    else:
        G.register(harness.nodes.NODE_CLASS_MAPPINGS)
    clip = W.build_clip(cfg)
    base, facts = W.pretrain(cfg, clip, progress=log)
    judge, acc = W.train_judge(cfg)
    G.OBJECTS.update(base=base, clip=clip)
    facts["judge_accuracy"] = acc
    return harness, judge, facts


def subject_prompts(cfg: W.WorldConfig) -> dict[str, dict]:
    """{prompt: what the judge must see}: the subject, recoloured, placed."""
    a = cfg.subjects[0]
    return {W.prompt(a.token): {"shape": a.shape, "colour": a.colour},
            W.prompt(a.token, "blue"): {"shape": a.shape, "colour": "blue"},
            W.prompt(a.token, None, "left"): {"shape": a.shape, "position": "left"}}


def preserve_prompts(cfg: W.WorldConfig) -> dict[str, dict]:
    """Pretraining prompts and what the judge must see: shape and colour (the base model draws them, 0.78 and 0.94
    of samples); the position is scored apart, since the base model places at about chance (0.38 for 1/3)."""
    return {W.prompt(s, c, p): {"shape": s, "colour": c, "position": p} for s, c, p in PRESERVE if p in W.POSITIONS}


def score(judge, samples: torch.Tensor, expect: dict) -> float:
    """Fraction of samples in which the judge sees every attribute of `expect`."""
    verdicts = judge.classify(samples)
    return sum(all(v[k] == e for k, e in expect.items()) for v in verdicts) / len(verdicts)


def subject_fidelity(judge, samples: torch.Tensor, subject: W.Subject) -> float:
    return score(judge, samples, {"shape": subject.shape, "colour": subject.colour})


def subject_graph(harness, cfg: W.WorldConfig, key: str, seed: int) -> tuple:
    """A new graph with the base model, the CLIP, the caption "a sks" and 4 subject latents of `seed` (stored under
    `key`): (graph, MODEL, CLIP, CONDITIONING, LATENT)."""
    a = cfg.subjects[0]
    G.OBJECTS[key] = G.to_latent(W.subject_images(cfg, a, 4, seed=100 + seed))
    g = harness.graph()
    base = g.node("ParaStudyModel", key="base").out(0)
    clip = g.node("ParaStudyCLIP", key="clip").out(0)
    caption = g.node("CLIPTextEncode", clip=clip, text=W.prompt(a.token)).out(0)
    return g, base, clip, caption, g.node("ParaStudyLatents", key=key).out(0)


def subject_gain(harness, judge, cfg: W.WorldConfig, seed: int, steps: int = STEPS, n: int = 16) -> dict[str, float]:
    """Subject fidelity of "a sks" for one seed, base and PaRa (`base`, `para`: shape and colour; `base_colour`,
    `para_colour`: the subject's colour only): the CI quality test's measurement (one graph: Train PaRa on 4 subject
    latents, KSampler with the base model and with the PaRa, same noise)."""
    a = cfg.subjects[0]
    g, base, clip, caption, latents = subject_graph(harness, cfg, f"gain_{seed}", seed)
    para = G.train_para(harness, g, base, latents, caption, steps, seed, rank=RANK, learning_rate=LR)
    ids_base = G.add_samplers(g, base, clip, [W.prompt(a.token)], n, seed, cfg.size)
    ids_para = G.add_samplers(g, para.out(0), clip, [W.prompt(a.token)], n, seed, cfg.size)
    G.run(harness, g)
    out = {}
    for name, ids in (("base", ids_base), ("para", ids_para)):
        x = G.read_samples(harness, ids)[W.prompt(a.token)]
        out[name] = subject_fidelity(judge, x, a)
        out[f"{name}_colour"] = score(judge, x, {"colour": a.colour})
    return out


# ---- one seed ------------------------------------------------------------------------------------------------------
def score_samples(judge, cfg: W.WorldConfig, per_prompt: dict[str, torch.Tensor]) -> dict[str, float]:
    """subject / recolour / place / preservation / position / subject B of one model's samples (the prompts it has)."""
    sp, pp, b = subject_prompts(cfg), preserve_prompts(cfg), cfg.subjects[1]
    m: dict = {}
    for text, x in per_prompt.items():
        if text in sp:
            m[("subject", "recolour", "place")[list(sp).index(text)]] = score(judge, x, sp[text])
        elif text in pp:
            m.setdefault("_preserve", []).append(score(judge, x, {k: pp[text][k] for k in ("shape", "colour")}))
            m.setdefault("_position", []).append(score(judge, x, {"position": pp[text]["position"]}))
        elif text == W.prompt(b.token):
            m["subject B"] = subject_fidelity(judge, x, b)
    if "_preserve" in m:
        m["preservation"] = sum(m.pop("_preserve")) / len(pp)
        m["position"] = sum(m.pop("_position")) / len(pp)
    return m


def train(harness, g, method: str, model, latents, caption, steps: int, seed: int, lr: float, rank: int = RANK,
          targets: str = "ExCA", batch: int = 4):
    """(MODEL link, trainer node id, output index of its PaRa / LoRA, kind, the PaRa node / LoRA link) for one of
    METHODS."""
    kind, loss_space = METHODS[method]
    if kind == "para":
        node = G.train_para(harness, g, model, latents, caption, steps, seed, rank=rank, targets=targets,
                            learning_rate=lr, batch_size=batch, loss_space=loss_space)
        return node.out(0), node.id, 1, kind, node
    out, lora_out = G.train_lora(harness, g, model, latents, caption, steps, seed, rank=rank, learning_rate=lr,
                                 batch_size=batch)
    return out, lora_out[0], lora_out[1], kind, lora_out


def tune(harness, judge, cfg: W.WorldConfig, steps: int, n: int, grid=LR_GRID, seed: int = TUNE_SEED) -> dict:
    """Each method's learning rate: the one of `grid` with the best subject × preservation on the tuning seed (its
    own subject images, noise and samples): personalisation must draw the subject *and* keep the rest. (Measured:
    the best subject alone picks an lr that forgets everything, LoRA 3e-2: subject 1.0, preservation 0.0; subject
    + preservation one that learns nothing.) Returns {"lr": {method: lr}, "grid": {method: {lr: metrics}}}."""
    g, base, clip, caption, latents = subject_graph(harness, cfg, f"tune_{seed}", seed)
    prompts = list(subject_prompts(cfg)) + list(preserve_prompts(cfg))
    samplers = {(m, lr): G.add_samplers(g, train(harness, g, m, base, latents, caption, steps, seed, lr)[0], clip,
                                        prompts, n, seed, cfg.size) for m in METHODS for lr in grid}
    G.run(harness, g)
    table = {m: {} for m in METHODS}
    for (m, lr), ids in samplers.items():
        table[m][lr] = score_samples(judge, cfg, G.read_samples(harness, ids))
    best = {m: max(grid, key=lambda lr, m=m: (table[m][lr]["subject"] * table[m][lr]["preservation"], -lr))
            for m in METHODS}
    return {"lr": best, "grid": table}


def run_seed(harness, judge, cfg: W.WorldConfig, seed: int, steps: int, n: int, experiments: set[str],
             lr: dict[str, float], ranks=(1, 2, 4, 8), rank: int = RANK) -> tuple[dict, dict]:
    """All experiments of one seed in one ComfyUI prompt, each method at its learning rate `lr[method]`.
    Returns (metrics, samples for the picture grid)."""
    a, b = cfg.subjects[0], cfg.subjects[1]
    G.OBJECTS[f"{a.token}_{seed}"] = G.to_latent(W.subject_images(cfg, a, 4, seed=100 + seed))
    G.OBJECTS[f"{b.token}_{seed}"] = G.to_latent(W.subject_images(cfg, b, 4, seed=200 + seed))
    G.OBJECTS[f"{a.token}_one_{seed}"] = G.to_latent(W.subject_images(cfg, a, 1, seed=300 + seed))
    g = harness.graph()
    base = g.node("ParaStudyModel", key="base").out(0)
    clip = g.node("ParaStudyCLIP", key="clip").out(0)

    def cond(text):
        return g.node("CLIPTextEncode", clip=clip, text=text).out(0)

    def data(key):
        return g.node("ParaStudyLatents", key=key).out(0)

    lat_a, lat_b, lat_one = data(f"{a.token}_{seed}"), data(f"{b.token}_{seed}"), data(f"{a.token}_one_{seed}")
    cap_a, cap_b = cond(W.prompt(a.token)), cond(W.prompt(b.token))
    sp, pp = subject_prompts(cfg), preserve_prompts(cfg)
    main_prompts = list(sp) + list(pp)
    samplers: dict[str, dict[str, str]] = {}   # model name -> {prompt: KSampler id}
    sizes: dict[str, tuple] = {}                # model name -> (trainer node id, kind)

    def trained(name, method, latents, caption, r=rank, targets="ExCA", batch=4):
        model, nid, idx, kind, handle = train(harness, g, method, base, latents, caption, steps, seed, lr[method],
                                              rank=r, targets=targets, batch=batch)
        sizes[name] = (nid, idx, kind)
        return model, handle

    def para(name, latents, caption, r=rank, targets="ExCA", batch=4):
        return trained(name, "PaRa", latents, caption, r, targets, batch)[1]

    def lora(name, latents, caption, r=rank, batch=4):
        return trained(name, "LoRA", latents, caption, r, batch=batch)

    samplers["base"] = G.add_samplers(g, base, clip, main_prompts + [W.prompt(b.token)], n, seed, cfg.size)
    pa = para(f"PaRa r{rank}", lat_a, cap_a)
    samplers[f"PaRa r{rank}"] = G.add_samplers(g, pa.out(0), clip, main_prompts, n, seed, cfg.size)
    la_model, la = lora(f"LoRA r{rank}", lat_a, cap_a)
    samplers[f"LoRA r{rank}"] = G.add_samplers(g, la_model, clip, main_prompts, n, seed, cfg.size)
    if "loss" in experiments:
        samplers[f"PaRa r{rank}, x0 loss"] = G.add_samplers(
            g, trained(f"PaRa r{rank}, x0 loss", "PaRa, x0 loss", lat_a, cap_a)[0], clip, main_prompts, n, seed, cfg.size)
    if "ranks" in experiments:
        for r in ranks:
            if r == rank:
                continue
            samplers[f"PaRa r{r}"] = G.add_samplers(g, para(f"PaRa r{r}", lat_a, cap_a, r=r).out(0), clip, main_prompts, n, seed, cfg.size)
    if "targets" in experiments:
        samplers[f"PaRa r{rank} all"] = G.add_samplers(g, para(f"PaRa r{rank} all", lat_a, cap_a, targets="all").out(0),
                                                       clip, main_prompts, n, seed, cfg.size)
    two = [W.prompt(a.token), W.prompt(b.token)]
    if "two" in experiments:
        pb = para(f"PaRa r{rank} B", lat_b, cap_b)
        for mode in ("sequential", "union"):
            merged = g.node("PaRaMerge", para_a=pa.out(1), para_b=pb.out(1), mode=mode)
            m = g.node("PaRaApply", model=base, para=merged.out(0), strength_model=1.0, strength_clip=1.0, block_strength="")
            samplers[f"2 subjects: PaRa {mode}"] = G.add_samplers(g, m.out(0), clip, two, n, seed, cfg.size)
        _, lb = lora(f"LoRA r{rank} B", lat_b, cap_b)
        both = G.apply_lora(harness, g, la_model, lb)
        samplers["2 subjects: LoRA A + LoRA B"] = G.add_samplers(g, both, clip, two, n, seed, cfg.size)
        samplers[f"PaRa r{rank} B alone"] = G.add_samplers(g, pb.out(0), clip, two, n, seed, cfg.size)
    one = [W.prompt(a.token), W.prompt(a.token, "blue"), W.prompt(a.token, None, "left")]
    if "one_shot" in experiments:
        samplers["one-shot PaRa"] = G.add_samplers(g, para("one-shot PaRa", lat_one, cap_a, batch=1).out(0), clip, one, n, seed, cfg.size)
        samplers["one-shot LoRA"] = G.add_samplers(g, lora("one-shot LoRA", lat_one, cap_a, batch=1)[0], clip, one, n, seed, cfg.size)

    t0 = time.perf_counter()
    G.run(harness, g)
    log(f"seed {seed}: graph ran in {time.perf_counter() - t0:.0f} s")
    samples = {name: G.read_samples(harness, ids) for name, ids in samplers.items()}

    metrics = {name: score_samples(judge, cfg, per_prompt) for name, per_prompt in samples.items()}
    # one-shot: the edit keeps where the original was (same noise), and changes what the prompt changes
    for name in ("one-shot PaRa", "one-shot LoRA"):
        if name in samples:
            orig = judge.classify(samples[name][one[0]])
            blue = judge.classify(samples[name][one[1]])
            metrics[name]["recolour keeps position"] = sum(
                o["position"] == e["position"] and e["colour"] == "blue" and e["shape"] == a.shape for o, e in zip(orig, blue)) / n
    for name, (nid, idx, kind) in sizes.items():
        out = harness.output(nid, idx)
        if kind == "para":
            params, nbytes = out.num_params(), len(out.to_bytes())
        else:  # up and down only (core also trains full .diff tensors of 1-D weights: not counted)
            import safetensors.torch
            ten = {k: v for k, v in out.items() if k.endswith((".lora_up.weight", ".lora_down.weight"))}
            params = sum(v.numel() for v in ten.values())
            nbytes = len(safetensors.torch.save({k: v.to(torch.float16).contiguous() for k, v in ten.items()}))
        metrics.setdefault(name, {}).update(params=params, file_bytes_fp16=nbytes)  # the trainer's PARA is fp16
    return metrics, samples


# ---- report ----------------------------------------------------------------------------------------------------------
def aggregate(per_seed: list[dict]) -> dict[str, dict[str, tuple]]:
    """{model: {metric: (mean, sd, min, max)}} over seeds."""
    out: dict = {}
    for name in per_seed[0]:
        for key in per_seed[0][name]:
            vals = [s[name][key] for s in per_seed if name in s and key in s[name]]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            out.setdefault(name, {})[key] = (statistics.fmean(vals), sd, min(vals), max(vals))
    return out


COLUMNS = ["subject", "recolour", "place", "preservation", "position", "subject B", "recolour keeps position", "params", "file_bytes_fp16"]


def table(agg: dict, seeds: list[int]) -> str:
    cols = [c for c in COLUMNS if any(c in v for v in agg.values())]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, m in agg.items():
        cells = []
        for c in cols:
            if c not in m:
                cells.append("")
            elif c in ("params", "file_bytes_fp16"):
                cells.append(f"{m[c][0]:.0f}")
            else:
                mean, sd, lo, hi = m[c]
                cells.append(f"{mean:.2f} ± {sd:.2f} ({lo:.2f}–{hi:.2f})" if len(seeds) > 1 else f"{mean:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tuning_table(tuning: dict) -> str:
    cols = ["subject", "recolour", "place", "preservation", "position"]
    lines = ["| method | lr | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for method, per_lr in tuning["grid"].items():
        for lr, m in per_lr.items():
            mark = " **(chosen)**" if tuning["lr"][method] == lr else ""
            lines.append(f"| {method} | {lr:g}{mark} | " + " | ".join(f"{m[c]:.2f}" for c in cols) + " |")
    return "\n".join(lines)


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Model-space (4, S, S) -> RGB in [0, 1]: the least-squares map that sends each world colour to its name's RGB."""
    names = {"red": (1, 0, 0), "green": (0, 0.8, 0), "blue": (0.1, 0.3, 1), "yellow": (1, 0.9, 0), "orange": (1, 0.5, 0),
             "cyan": (0, 0.9, 0.9)}
    a = torch.tensor([W.COLOURS[k] for k in names])
    rgb = torch.tensor(list(names.values()))
    m = torch.linalg.lstsq(a, rgb).solution  # (4, 3)
    return torch.einsum("chw,cd->dhw", x, m).clamp(0, 1)


def grid(samples: dict, rows: list[str], columns: list[str], path: str, per_cell: int = 4, zoom: int = 8) -> None:
    """PNG: one row per prompt, one column group per model, `per_cell` samples each (seed 0)."""
    from PIL import Image, ImageDraw
    s = next(iter(next(iter(samples.values())).values())).shape[-1] * zoom
    pad, label_w, head_h = 4, 190, 22
    cell_w = per_cell * (s + 2) + pad
    img = Image.new("RGB", (label_w + len(columns) * cell_w, head_h + len(rows) * (s + pad)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for j, col in enumerate(columns):
        d.text((label_w + j * cell_w, 4), col, fill=(0, 0, 0))
    for i, row in enumerate(rows):
        y = head_h + i * (s + pad)
        d.text((4, y + s // 2 - 6), row, fill=(0, 0, 0))
        for j, col in enumerate(columns):
            x = samples.get(col, {}).get(row)
            if x is None:
                continue
            for k in range(min(per_cell, len(x))):
                t = (to_rgb(x[k]) * 255).byte().permute(1, 2, 0).numpy()
                tile = Image.fromarray(t).resize((s, s), Image.NEAREST)
                img.paste(tile, (label_w + j * cell_w + k * (s + 2), y))
    img.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=STEPS, help="training steps of every PaRa and LoRA")
    ap.add_argument("--samples", type=int, default=12, help="samples per prompt and model")
    ap.add_argument("--experiments", default="loss,ranks,targets,two,one_shot")
    ap.add_argument("--lr", type=float, nargs=3, metavar=("PARA", "PARA_X0", "LORA"),
                    help="learning rates of PaRa, PaRa with x0 loss, LoRA (default: tuned per method on seed "
                         f"{TUNE_SEED} over {list(LR_GRID)})")
    ap.add_argument("--world", choices=("study", "ci"), default="study", help="ci: the quality test's smaller world")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args(argv)
    cfg = {"study": W.STUDY, "ci": W.CI}[args.world]
    t0 = time.perf_counter()
    harness, judge, facts = setup(cfg)
    log(f"world ready: {facts}")
    if args.lr:
        tuning = {"lr": dict(zip(METHODS, args.lr)), "grid": {}}
    else:
        tuning = tune(harness, judge, cfg, args.steps, args.samples)
    log(f"learning rates: {tuning['lr']}")
    per_seed, first = [], None
    for seed in args.seeds:
        metrics, samples = run_seed(harness, judge, cfg, seed, args.steps, args.samples, set(args.experiments.split(",")),
                                    tuning["lr"])
        per_seed.append(metrics)
        first = first or samples
        log(f"seed {seed}: " + json.dumps({k: {m: round(v, 3) for m, v in d.items()} for k, d in metrics.items()}))
    agg = aggregate(per_seed)
    conditions = (f"world {cfg.name}: {cfg.size}×{cfg.size}×4 latents, UNet {facts.get('params')} params, "
                  f"{cfg.prediction}-prediction, pretrained {cfg.pretrain_steps} steps; training: {args.steps} steps, batch 4, "
                  f"AdamW, learning rates {tuning['lr']}, rank {RANK} "
                  f"unless named, fp32, PaRa ExCA without the output conv, rank_boundary 0, "
                  f"same subject latents and caption for PaRa and LoRA; sampling: KSampler {G.SAMPLER}, {args.samples} "
                  f"samples per prompt; seeds {args.seeds}; judge accuracy {facts['judge_accuracy']}; "
                  f"wall time {time.perf_counter() - t0:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"conditions": conditions, "facts": facts, "tuning": tuning, "per_seed": per_seed, "seeds": args.seeds},
                  f, indent=1)
    md = f"{conditions}\n\nmean ± sd (min–max) over seeds\n\n{table(agg, args.seeds)}\n"
    if tuning["grid"]:
        md += f"\nlearning-rate tuning (seed {TUNE_SEED}; chosen: best subject × preservation)\n\n{tuning_table(tuning)}\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    a = cfg.subjects[0]
    rows = list(subject_prompts(cfg)) + list(preserve_prompts(cfg))[:3]
    grid(first, rows, [c for c in ("base", f"PaRa r{RANK}", f"LoRA r{RANK}") if c in first], os.path.join(args.out, "grid.png"))
    extra = [c for c in ("one-shot PaRa", "one-shot LoRA", "2 subjects: PaRa sequential", "2 subjects: PaRa union",
                         "2 subjects: LoRA A + LoRA B") if c in first]
    if extra:
        grid(first, [W.prompt(a.token), W.prompt(a.token, "blue"), W.prompt(cfg.subjects[1].token)], extra,
             os.path.join(args.out, "grid_more.png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

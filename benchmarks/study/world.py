"""A world small enough to pretrain on a 2-core CPU, to measure what a trained PaRa does (issue 16).

Images ARE latents: a 4-channel S×S array (the SD1.5 latent shape) with one 5×5 shape of one colour at one
position on a zero background. A colour is a fixed 4-vector, so the "photo" needs no VAE and the trainers'
LATENT input takes it directly (values here are in the model's space; LATENT holds them ÷ the SD1.5 latent scale,
what KSampler returns and what Train PaRa / Train LoRA read back with `process_latent_in`).

* Pretraining concepts: shapes × colours × positions, prompts "a plus in red on the left" with each attribute
  left out of the prompt at random (then it varies freely), 10 % empty prompts (the negative / unconditional
  prompt of classifier-free guidance).
* Subjects never seen in pretraining: a new shape in a new colour, named by a rare token ("a sks"); a second one
  for the two-subject experiments.
* Text encoder: ComfyUI's CLIP class (`comfy.sd.CLIP`, SD1 CLIP-L tokenizer and model) shrunk through its model
  options to one transformer layer, random weights fixed by the seed and never trained (as in personalisation,
  only the denoiser learns). It only has to map different prompts to different conditionings.
* Base model: ComfyUI's SD1.5 model class (`comfy.supported_models.SD15`, UNet with small channels, context 768),
  typed v-prediction (`WorldConfig.prediction`: core Train LoRA's x0 loss then weights noise levels by σ²/(σ²+1) ≤ 1,
  not by σ² as for ε; benchmarks/README.md, *The study*), pretrained from scratch by `pretrain()` in its own target
  space on the discrete SD schedule (what KSampler samples).
* Judge: a small CNN with three heads (shape incl. subjects, colour, position), trained on its own held-out
  draws with noise and amplitude augmentation, so imperfect samples still classify.

Everything is deterministic in the config (seed included) and cached under ~/.cache/comfyui-para-study (or
$COMFYUI_PARA_STUDY_CACHE) keyed by a hash of the config and of the code that builds the world (WorldConfig.key). Needs ComfyUI importable (the study and its test run in ComfyUI's Python).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field

import torch

log = logging.getLogger("para_study")

CACHE_DIR = os.environ.get("COMFYUI_PARA_STUDY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "comfyui-para-study"))

SHAPE_PX = 3
MASKS = {  # 3×3 masks: pretraining shapes and the two subjects' shapes (never seen in pretraining)
    "square": ((1, 1, 1), (1, 1, 1), (1, 1, 1)),
    "plus": ((0, 1, 0), (1, 1, 1), (0, 1, 0)),
    "cross": ((1, 0, 1), (0, 1, 0), (1, 0, 1)),
    "ell": ((1, 0, 0), (1, 0, 0), (1, 1, 1)),
    "tee": ((1, 1, 1), (0, 1, 0), (0, 1, 0)),
}
COLOURS = {  # model-space 4-vectors, about unit norm, pairwise well apart
    "red": (1.2, -0.4, -0.4, 0.3),
    "green": (-0.4, 1.2, -0.4, 0.3),
    "blue": (-0.4, -0.4, 1.2, 0.3),
    "yellow": (0.8, 0.8, -0.8, 0.3),
    "orange": (1.0, 0.2, -0.6, -1.0),
    "cyan": (-0.6, 0.6, 0.8, -1.0),
}
POSITIONS = ("left", "middle", "right")
POSITION_PHRASE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}


@dataclass(frozen=True)
class Subject:
    token: str
    shape: str
    colour: str


@dataclass(frozen=True)
class WorldConfig:
    name: str
    seed: int = 0
    size: int = 8                                     # latent H = W (3 columns of 2 x-offsets)
    shapes: tuple = ("square", "plus", "cross")       # pretraining concepts
    colours: tuple = ("red", "green", "blue", "yellow")
    subjects: tuple = (Subject("sks", "ell", "orange"), Subject("ohwx", "tee", "cyan"))
    channels: int = 32                                # UNet model_channels
    transformer_depth: tuple = (1, 0)                 # cross-attention blocks per input level (8×8, 4×4); middle: 1
    heads: int = 4                                    # attention heads
    prediction: str = "v"                             # the UNet's target: "v" (SD2.x-style) or "eps" (SD1.5's)
    pretrain_steps: int = 4000
    pretrain_batch: int = 32
    pretrain_lr: float = 2e-3
    judge_steps: int = 600
    threads: int = 1                                  # 1: on a shared CPU, 2 threads stall at every barrier
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    def key(self) -> str:
        """Cache key: the config and the source of the functions that build the world (a change to drawing, the
        text encoder, the model, pretraining or the judge rebuilds it; a change to docs or other configs does not)."""
        import inspect
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        code = "".join(inspect.getsource(f) for f in (draw, prompt, pretraining_prompts, pretraining_batch, _seeded_init,
                                                        build_clip, unet_config, build_model, pretrain, Judge, _judge_batch,
                                                        train_judge))
        return hashlib.sha256((blob + code + json.dumps([MASKS, COLOURS, POSITION_PHRASE])).encode()).hexdigest()[:16]

    @property
    def all_shapes(self) -> tuple:
        return tuple(self.shapes) + tuple(s.shape for s in self.subjects)

    @property
    def all_colours(self) -> tuple:
        return tuple(self.colours) + tuple(s.colour for s in self.subjects if s.colour not in self.colours)


# STUDY: the world benchmarks/study/run_study.py measures. CI: the smallest version, for the quality regression
# test (tests/integration/test_study_quality.py): the same concepts, a quarter of the pretraining (enough for the
# test's margins, measured on 5 seeds; in the first, ε-prediction world 400 steps were not: 0/16 on 2 seeds).
STUDY = WorldConfig("study")
CI = WorldConfig("ci", pretrain_steps=1000, judge_steps=300)


# ---- drawing ----------------------------------------------------------------------------------------------------
def draw(cfg: WorldConfig, shape: str, colour: str, position: str, rng: random.Random) -> torch.Tensor:
    """One image (4, S, S) in model space: the shape's 3×3 mask times the colour vector. The S − 2 x-offsets split
    into thirds (left / middle / right), one picked at random; the y-offset is one of the two central ones."""
    s = cfg.size
    span = (s - SHAPE_PX + 1) // 3
    x0 = POSITIONS.index(position) * span + rng.randrange(span)
    y0 = (s - SHAPE_PX) // 2 + rng.randrange(2)
    img = torch.zeros(4, s, s)
    mask = torch.tensor(MASKS[shape], dtype=torch.float32)
    img[:, y0:y0 + SHAPE_PX, x0:x0 + SHAPE_PX] = torch.tensor(COLOURS[colour])[:, None, None] * mask
    return img


def prompt(shape_word: str, colour: str | None = None, position: str | None = None) -> str:
    """The world's grammar: "a <shape or token>[ in <colour>][ <position phrase>]"."""
    text = f"a {shape_word}"
    if colour:
        text += f" in {colour}"
    if position:
        text += f" {POSITION_PHRASE[position]}"
    return text


def pretraining_prompts(cfg: WorldConfig) -> list[str]:
    """Every prompt pretraining can draw (plus "" for the unconditional branch)."""
    out = [""]
    for sh in cfg.shapes:
        for c in (None,) + tuple(cfg.colours):
            for p in (None,) + POSITIONS:
                out.append(prompt(sh, c, p))
    return out


def pretraining_batch(cfg: WorldConfig, n: int, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    """n images of pretraining concepts and their prompts; each attribute is named with p = 0.7, 10 % are ""."""
    imgs, texts = [], []
    for _ in range(n):
        sh, c, p = rng.choice(cfg.shapes), rng.choice(cfg.colours), rng.choice(POSITIONS)
        imgs.append(draw(cfg, sh, c, p, rng))
        if rng.random() < 0.1:
            texts.append("")
        else:
            texts.append(prompt(sh, c if rng.random() < 0.7 else None, p if rng.random() < 0.7 else None))
    return torch.stack(imgs), texts


def subject_images(cfg: WorldConfig, subject: Subject, n: int, seed: int, position: str | None = "middle") -> torch.Tensor:
    """The personalisation set: n draws of the subject (its colour, in the middle with jitter, or anywhere)."""
    rng = random.Random(seed)
    return torch.stack([draw(cfg, subject.shape, subject.colour, position or rng.choice(POSITIONS), rng) for _ in range(n)])


# ---- ComfyUI objects ------------------------------------------------------------------------------------------
def _seeded_init(module: torch.nn.Module, seed: int, embed_std: float = 1.0) -> None:
    """ComfyUI's ops leave weights uninitialised: N(0, 1/fan_in) matrices, norm scales 1, biases 0; the CLIP
    token table N(0, embed_std²) so each token is its own direction, the position table 10× smaller."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "token_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * embed_std)
            elif "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * embed_std * 0.1)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif name.endswith("weight") and ("norm" in name or "ln" in name):
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in module.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()


PROMPT_TOKENS = 12  # the longest prompt of the world is 9 tokens + start and end


def build_clip(cfg: WorldConfig):
    """ComfyUI's SD1 CLIP (CLIP-L tokenizer and architecture) with one layer, random weights fixed by the seed, and
    prompts padded to PROMPT_TOKENS instead of 77 (SDTokenizer's max_length): the UNet's cross-attention then costs
    a sixth, which is most of this small UNet's time."""
    import functools

    import comfy.sd
    import comfy.sd1_clip

    class Target:
        params: dict = {}
        clip = comfy.sd1_clip.SD1ClipModel
        tokenizer = functools.partial(comfy.sd1_clip.SD1Tokenizer,
                                      tokenizer=functools.partial(comfy.sd1_clip.SDTokenizer, max_length=PROMPT_TOKENS))

    clip = comfy.sd.CLIP(Target, model_options={"dtype": torch.float32, "load_device": torch.device("cpu"),
                                                 "offload_device": torch.device("cpu"),
                                                 "clip_l_model_config": {"num_hidden_layers": 1, "intermediate_size": 256,
                                                                         "max_position_embeddings": PROMPT_TOKENS}})
    _seeded_init(clip.cond_stage_model, cfg.seed + 1)
    return clip


def encode(clip, texts: list[str]) -> dict[str, torch.Tensor]:
    """{text: (PROMPT_TOKENS, 768) conditioning}, through the same CLIP call CLIPTextEncode makes."""
    out = {}
    with torch.no_grad():
        for t in dict.fromkeys(texts):
            out[t] = clip.encode_from_tokens(clip.tokenize(t)).detach().float()[0]
    return out


def unet_config(cfg: WorldConfig) -> dict:
    return dict(use_checkpoint=False, image_size=cfg.size, use_spatial_transformer=True, legacy=False,
                num_res_blocks=[1, 1], channel_mult=[1, 2], use_temporal_resblock=False,
                use_temporal_attention=False, num_head_channels=-1, num_heads=cfg.heads, in_channels=4, out_channels=4,
                model_channels=cfg.channels, context_dim=768, transformer_depth=list(cfg.transformer_depth),
                transformer_depth_middle=1, transformer_depth_output=[d for d in cfg.transformer_depth for _ in range(2)], use_linear_in_transformer=False, adm_in_channels=None)


def build_model(cfg: WorldConfig, state_dict: dict | None = None):
    """A ModelPatcher of ComfyUI's SD15 model class with the world's small UNet (seeded init or `state_dict`)."""
    import comfy.model_patcher
    import comfy.supported_models
    mc = comfy.supported_models.SD15(unet_config(cfg))
    mc.unet_config.update(unet_config(cfg))  # the class's extra config (8 heads) would win otherwise
    mc.set_inference_dtype(torch.float32, None)
    import comfy.model_base
    model_type = {"v": comfy.model_base.ModelType.V_PREDICTION, "eps": comfy.model_base.ModelType.EPS}[cfg.prediction]
    model = comfy.model_base.BaseModel(mc, model_type=model_type, device="cpu")  # what mc.get_model builds, typed
    if state_dict is None:
        _seeded_init(model.diffusion_model, cfg.seed + 2)
    else:
        model.diffusion_model.load_state_dict(state_dict)
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    patcher.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = _torch_attention
    if hasattr(patcher, "cached_patcher_init"):  # newer ComfyUI: how core Train LoRA (clone(force_deepcopy)) reloads it
        weights = {k: v.detach().clone() for k, v in model.diffusion_model.state_dict().items()}
        patcher.cached_patcher_init = (_reload, (cfg, weights))
    return patcher


def _reload(cfg: WorldConfig, weights: dict, disable_dynamic: bool = False):
    return build_model(cfg, weights)


def _torch_attention(func, *args, **kwargs):
    """torch's scaled_dot_product_attention instead of the sub-quadratic attention ComfyUI picks on a CPU (several
    times slower at these sizes; the same math). Set in the model's options, so every sampler and trainer uses it."""
    import comfy.ldm.modules.attention as attention
    return attention.attention_pytorch(*args, **kwargs)


# ---- pretraining --------------------------------------------------------------------------------------------------
def _cache_path(cfg: WorldConfig, what: str) -> str:
    return os.path.join(CACHE_DIR, f"{cfg.name}-{cfg.key()}-{what}.safetensors")


def _save_atomic(path: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    import safetensors.torch
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def pretrain(cfg: WorldConfig, clip=None, progress=None) -> tuple[object, dict]:
    """The base model (ModelPatcher), pretrained on the world's concepts, and facts about the run; cached.

    On SD's discrete schedule, x_t = x0 + σ_t ε, the loss is the error of the model's own target (v or ε):
    ‖(D(x_t, σ_t) − x0)/c(σ_t)‖² with D ComfyUI's own `apply_model` (its input scaling and timestep mapping, so
    sampling sees what trained) and c = ∂D/∂(model output) (`para_core.train.prediction_scale`, the residual Train
    PaRa's loss_space "prediction" takes)."""
    import safetensors.torch

    from para_core.train import prediction_residual, prediction_scale
    path = _cache_path(cfg, "unet")
    if os.path.isfile(path):
        with safetensors.torch.safe_open(path, "pt") as f:
            meta = dict(f.metadata() or {})
        return build_model(cfg, safetensors.torch.load_file(path)), {"cached": True, **json.loads(meta.get("facts", "{}"))}
    import time
    torch.manual_seed(cfg.seed)
    clip = clip or build_clip(cfg)
    conds = encode(clip, pretraining_prompts(cfg))
    patcher = build_model(cfg)
    model = patcher.model
    unet = model.diffusion_model
    ms = model.model_sampling
    t_opts = patcher.model_options["transformer_options"]
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.pretrain_lr, total_steps=cfg.pretrain_steps, pct_start=0.05)
    t0, losses = time.perf_counter(), []
    with torch.inference_mode(False), torch.enable_grad():
        unet.train()
        for p in unet.parameters():
            p.requires_grad_(True)
        for step in range(cfg.pretrain_steps):
            x0, texts = pretraining_batch(cfg, cfg.pretrain_batch, rng)
            ctx = torch.stack([conds[t] for t in texts])
            t = torch.randint(0, len(ms.sigmas), (len(texts),), generator=gen)
            sigma = ms.sigmas[t].float()
            eps = torch.randn(x0.shape, generator=gen)
            xt = x0 + sigma[:, None, None, None] * eps
            denoised = model.apply_model(xt, sigma, c_crossattn=ctx, transformer_options=t_opts)
            scale = prediction_scale(ms.calculate_denoised, sigma, x0.ndim)
            loss = prediction_residual(denoised, x0, scale).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if progress and (step + 1) % 200 == 0:
                progress(f"pretrain {step + 1}/{cfg.pretrain_steps} loss {sum(losses[-200:]) / 200:.4f}")
        for p in unet.parameters():
            p.requires_grad_(False)
        unet.eval()
    facts = {"pretrain_s": round(time.perf_counter() - t0, 1), "final_loss": round(sum(losses[-100:]) / 100, 4),
             "params": sum(p.numel() for p in unet.parameters())}
    _save_atomic(path, unet.state_dict(), {"facts": json.dumps(facts)})
    return patcher, {"cached": False, **facts}


# ---- the judge ------------------------------------------------------------------------------------------------------
class Judge(torch.nn.Module):
    """CNN with three heads: shape (pretraining shapes + subject shapes), colour, position."""

    def __init__(self, cfg: WorldConfig):
        super().__init__()
        self.shapes, self.colours = cfg.all_shapes, cfg.all_colours
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 64, 3, padding=1, stride=2), torch.nn.ReLU(), torch.nn.Flatten())
        feat = 64 * ((cfg.size + 1) // 2) ** 2
        self.shape_head = torch.nn.Linear(feat, len(self.shapes))
        self.colour_head = torch.nn.Linear(feat, len(self.colours))
        self.position_head = torch.nn.Linear(feat, len(POSITIONS))

    def forward(self, x):
        h = self.body(x)
        return self.shape_head(h), self.colour_head(h), self.position_head(h)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> list[dict]:
        """[{shape, colour, position}] for model-space images (N, 4, S, S)."""
        s, c, p = self(x.float())
        return [{"shape": self.shapes[a], "colour": self.colours[b], "position": POSITIONS[d]}
                for a, b, d in zip(s.argmax(1).tolist(), c.argmax(1).tolist(), p.argmax(1).tolist())]


def _judge_batch(cfg: WorldConfig, n: int, rng: random.Random, gen: torch.Generator, noise: float):
    labels = [(rng.randrange(len(cfg.all_shapes)), rng.randrange(len(cfg.all_colours)), rng.randrange(3)) for _ in range(n)]
    x = torch.stack([draw(cfg, cfg.all_shapes[a], cfg.all_colours[b], POSITIONS[d], rng) for a, b, d in labels])
    amp = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=gen)
    x = x * amp + noise * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x, torch.tensor(labels)


def judge_accuracy(judge: Judge, cfg: WorldConfig, n: int = 1000, noise: float = 0.3, seed: int = 10_000) -> dict:
    """Accuracy per head on fresh held-out draws (another seed than training), noise up to `noise`."""
    rng, gen = random.Random(cfg.seed + seed), torch.Generator().manual_seed(cfg.seed + seed)
    x, y = _judge_batch(cfg, n, rng, gen, noise)
    with torch.no_grad():
        out = judge(x)
    return {h: round(float((o.argmax(1) == y[:, i]).float().mean()), 4) for i, (h, o) in enumerate(zip(("shape", "colour", "position"), out))}


def train_judge(cfg: WorldConfig) -> tuple[Judge, dict]:
    """The judge and its held-out accuracy; cached."""
    import safetensors.torch
    judge = Judge(cfg)
    path = _cache_path(cfg, "judge")
    if os.path.isfile(path):
        judge.load_state_dict(safetensors.torch.load_file(path))
        judge.eval()
        return judge, judge_accuracy(judge, cfg)
    torch.manual_seed(cfg.seed + 3)
    rng, gen = random.Random(cfg.seed + 3), torch.Generator().manual_seed(cfg.seed + 3)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    ce = torch.nn.functional.cross_entropy
    with torch.inference_mode(False), torch.enable_grad():
        judge.train()
        for _ in range(cfg.judge_steps):
            x, y = _judge_batch(cfg, 128, rng, gen, noise=0.4)
            s, c, p = judge(x)
            loss = ce(s, y[:, 0]) + ce(c, y[:, 1]) + ce(p, y[:, 2])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    judge.eval()
    _save_atomic(path, judge.state_dict())
    return judge, judge_accuracy(judge, cfg)

"""Train PaRa: personalise a diffusion model by learning the subspace PaRa removes (W - QQᵀW).

Inputs follow ComfyUI's core "Train LoRA" node (``is_input_list``), so the core dataset nodes
(LoadImageDataSetFromFolder, LoadImageTextDataSetFromFolder, MakeTrainingDataset, ResolutionBucket)
feed it unchanged. How it differs from the core trainer, and why:

* Only the targeted layers are touched. PaRa is applied to their *outputs* by a forward wrapper
  (para_core.layer; weight space only where the flop count says so), so no weight copy is made per
  step and frozen layers get no wrapper at all. The inference-mode trap (the executor loads models
  under ``torch.inference_mode()``, and such parameters cannot be saved for backward) is avoided by
  giving the model normal-tensor copies of its inference-tensor parameters once, bit-identical.
* Each training sample is paired with its own caption (the core sampler applies every caption to the
  whole batch and averages), every latent - also multi-resolution and bucketed ones - goes through
  ``process_latent_in``, and the loss can be taken in the model's own prediction space (ε / v / flow,
  via the σ-dependent scale of ``calculate_denoised``) instead of x0 space.
* Randomness is a function of (seed, step) only, and files written by ``save_every`` carry the
  training state (B, optimizer state, loss history) in a safetensors sidecar ``<file>.para_state``,
  so a resumed run continues the same trajectory.
* The MODEL output carries the result as ordinary weight patches (nodes.para_adapter.apply_para) with
  exactly the bases a saved file reloads to - no training wrappers.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.checkpoint
from comfy_api.latest import io, ui
from tqdm.auto import tqdm

import comfy.model_management
import comfy.ops
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import folder_paths

from ..para_core import safetensors_io
from ..para_core.errors import ParaError
from ..para_core.format import ParaModel, parse_training_metadata
from ..para_core.layer import DEFAULT_INIT, INITS, MODES, ParaLayer, ParaNetwork
from ..para_core.targets import DEFAULT_GAMMA, DEFAULT_PRESET, PRESETS, TargetPlan, plan
from . import folders, ui_text
from .para_adapter import apply_para

log = logging.getLogger(__name__)

folders.register()

Para = io.Custom("PARA")
LossMap = io.Custom("LOSS_MAP")

NONE = "[None]"
STATE_SUFFIX = ".para_state"
STATE_FORMAT = "para_train_state"
OPTIMIZERS = ("AdamW", "Adam", "SGD", "RMSprop")
LOSS_FUNCTIONS = ("MSE", "L1", "Huber", "SmoothL1")
LOSS_SPACES = ("prediction", "x0")
PREVIEW_STEPS = 12
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ---- data ----------------------------------------------------------------------------------------
@dataclass
class _Group:
    """Images of one shape: latents (n, C, H, W) on the device and their global indices (for captions)."""
    latents: torch.Tensor
    index: list[int]


def _flatten_latents(latents: list[dict]) -> list[torch.Tensor]:
    """Every image as its own (1, C, ...) tensor, in input order (plain, multi-res and bucketed inputs)."""
    out = []
    for d in latents:
        s = d["samples"]
        out.extend(s[i:i + 1] for i in range(s.shape[0]))
    return out


def _flatten_conditioning(positive: list) -> list:
    """All [cond, extras] entries of all CONDITIONING inputs, in order: one per image (or one for all)."""
    out = []
    for c in positive:
        out.extend(c if isinstance(c, list) else [c])
    return out


def _group_by_shape(images: list[torch.Tensor]) -> list[_Group]:
    shapes: dict[tuple, list[int]] = {}
    for i, t in enumerate(images):
        shapes.setdefault(tuple(t.shape[1:]), []).append(i)
    return [_Group(torch.cat([images[i] for i in idx]), idx) for idx in shapes.values()]


def _own(t):
    """A normal (non-inference) copy of a tensor; other values unchanged."""
    return t.clone() if isinstance(t, torch.Tensor) else t


def _own_conds(conds: list[dict]) -> list[dict]:
    """Clone every tensor the model will see, so none of them is an inference tensor."""
    out = []
    for c in conds:
        c = dict(c)
        mc = {}
        for k, v in c.get("model_conds", {}).items():
            inner = getattr(v, "cond", None)
            if isinstance(inner, torch.Tensor):
                v = v._copy_with(inner.clone())
            elif isinstance(inner, list) and hasattr(v, "_copy_with"):
                v = v._copy_with([_own(x) for x in inner])
            mc[k] = v
        c["model_conds"] = mc
        out.append(c)
    return out


def _batch_conds(conds: list[dict]) -> dict:
    """The model kwargs of a batch in which sample i has caption conds[i] (captions paired, not averaged)."""
    per = [{k: v.process_cond(batch_size=1, area=None) for k, v in c["model_conds"].items()} for c in conds]
    return {k: per[0][k].concat([p[k] for p in per[1:]]) for k in per[0]}


# ---- model surgery -------------------------------------------------------------------------------
def _own_parameters(model: torch.nn.Module) -> int:
    """Replace inference-tensor parameters and buffers by normal copies (same values, same dtype/device).

    Done once, under inference_mode(False). Backward through a frozen layer must save its weight, and
    inference tensors cannot be saved; this costs no extra memory once the originals are released,
    unlike identity weight wrappers, which copy every weight on every forward.
    """
    n = 0
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_inference() and type(p.data) is torch.Tensor:
                q = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                q.__dict__.update(p.__dict__)
                m._parameters[name] = q
                n += 1
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_inference() and type(b) is torch.Tensor:
                m._buffers[name] = b.clone()
                n += 1
    return n


def _candidates(base_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules the core LoRA trainer would train: comfy ops with a ≥2-D weight."""
    return {n: m for n, m in base_model.named_modules()
            if hasattr(m, "weight_function") and getattr(m, "weight", None) is not None and m.weight.ndim >= 2}


def _comfy_weight_of(module, x):
    """Weight and bias as the comfy op would use them for input x (its cast and weight functions)."""
    if hasattr(module, "weight_function"):
        return comfy.ops.cast_bias_weight(module, x)
    dtype = x.dtype
    return module.weight.to(x.device, dtype), (module.bias.to(x.device, dtype) if module.bias is not None else None)


def _comfy_bias_of(module, x):
    b = getattr(module, "bias", None)
    if b is None:
        return None
    b = b.to(x.device)
    for f in getattr(module, "bias_function", ()):
        b = f(b)
    return b


def _checkpoint_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The first non-container modules below `module`: the units gradient checkpointing wraps."""
    out = []
    for child in module.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
            out.extend(_checkpoint_units(child))
        else:
            out.append(child)
    return out


def _enable_checkpointing(units: list[torch.nn.Module]) -> Callable[[], None]:
    """Recompute each unit's activations in backward instead of storing them. Returns the undo."""
    undo = []
    for m in units:
        had_own = "forward" in m.__dict__
        previous = m.__dict__.get("forward")
        inner = m.forward

        def fwd(*args, _inner=inner, **kwargs):
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        m.forward = fwd
        undo.append((m, had_own, previous))

    def restore():
        for m, had_own, previous in reversed(undo):
            if had_own:
                m.forward = previous
            else:
                m.__dict__.pop("forward", None)
    return restore


# ---- loss ----------------------------------------------------------------------------------------
def _space_name(model_sampling) -> str:
    import comfy.model_sampling as ms
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v"
    if isinstance(model_sampling, ms.X0):
        return "x0"
    if isinstance(model_sampling, ms.EPS):
        return "eps"
    if isinstance(model_sampling, (ms.CONST, ms.COSMOS_RFLOW)):
        return "flow"
    return "prediction"


def _prediction_scale(model_sampling, sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """c(σ) = ∂x0_pred/∂model_output, so (x0_pred - x0)/c is the error in the model's own output space
    (ε for EPS models: c = -σ; v for v-prediction; flow velocity for CONST: c = -σ)."""
    shape = (sigma.shape[0],) + (1,) * (ndim - 1)
    one = torch.ones(shape, dtype=torch.float32, device=sigma.device)
    zero = torch.zeros_like(one)
    c = model_sampling.calculate_denoised(sigma.float(), one, zero) - model_sampling.calculate_denoised(sigma.float(), zero, zero)
    return torch.where(c.abs() < 1e-4, torch.full_like(c, 1e-4) * torch.sign(c + 1e-12), c)


def _loss(name: str, residual: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(residual)
    if name == "MSE":
        return torch.nn.functional.mse_loss(residual, z)
    if name == "L1":
        return torch.nn.functional.l1_loss(residual, z)
    if name == "Huber":
        return torch.nn.functional.huber_loss(residual, z)
    return torch.nn.functional.smooth_l1_loss(residual, z)


# ---- optimizer and training state ----------------------------------------------------------------
def _optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    cls = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD, "RMSprop": torch.optim.RMSprop}[name]
    return cls(params, lr=lr)


def state_path(para_path: str) -> str:
    """The training-state sidecar of a PaRa file: <stem>.para_state (safetensors; not listed as a PaRa)."""
    stem = para_path[:-len(".safetensors")] if para_path.endswith(".safetensors") else para_path
    return stem + STATE_SUFFIX


def _state_tensors(network: ParaNetwork, optimizer: torch.optim.Optimizer, losses: list[float]) -> dict[str, torch.Tensor]:
    tensors = {f"b.{n}": layer.b.detach().to("cpu", torch.float32).contiguous() for n, layer in network.items()}
    sd = optimizer.state_dict()
    for i, name in enumerate(network.names):
        for k, v in sd["state"].get(i, {}).items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"optim.{name}.{k}"] = t.detach().to("cpu").contiguous()
    tensors["loss"] = torch.tensor(losses, dtype=torch.float32) if losses else torch.zeros(0)
    return tensors


def _load_state(path: str, para: ParaModel, optimizer_name: str) -> dict | None:
    """Read a sidecar; None (with a warning) if it is missing, unreadable, or does not belong to `para`."""
    if not os.path.exists(path):
        log.warning("PaRa: %s has no training state (%s): continuing from its saved bases with a fresh %s state",
                    para.source, os.path.basename(path), optimizer_name)
        return None
    try:
        tensors, meta = safetensors_io.load_file(path)
    except ParaError as e:
        log.warning("PaRa: ignoring training state %s: %s", path, e)
        return None
    if meta.get("format") != STATE_FORMAT:
        log.warning("PaRa: ignoring %s: not a PaRa training state", path)
        return None
    bs = {k[2:]: v for k, v in tensors.items() if k.startswith("b.")}
    if set(bs) != set(para.stages):
        log.warning("PaRa: ignoring training state %s: its layers do not match %s", path, para.source)
        return None
    for m, b in bs.items():  # the state must be the one the file was written from
        q = para.stages[m][0]
        qb = torch.linalg.qr(b.to(torch.float64))[0]
        if b.shape != q.shape or (q.to(torch.float64) - qb @ (qb.T @ q.to(torch.float64))).abs().max() > 1e-2:
            log.warning("PaRa: ignoring training state %s: it does not match the bases of %s", path, para.source)
            return None
    return {"b": bs, "tensors": tensors, "meta": meta}


def _restore_optimizer(optimizer: torch.optim.Optimizer, network: ParaNetwork, tensors: dict[str, torch.Tensor], meta: dict) -> bool:
    if meta.get("optimizer") != type(optimizer).__name__:
        log.warning("PaRa: saved optimizer state is %s, this run uses %s: starting a fresh optimizer state",
                    meta.get("optimizer"), type(optimizer).__name__)
        return False
    state = {}
    for i, name in enumerate(network.names):
        prefix = f"optim.{name}."
        entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entry:
            # clone: the tensors were read under the executor's inference mode, and the optimizer updates them in place
            state[i] = {k: (v.to(network.layer(name).b.device) if k != "step" else v).clone() for k, v in entry.items()}
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)
    return True


def _free_name(folder: str, filename: str, step: int) -> str:
    counter = 1
    while True:
        name = f"{filename}_{step}_steps_{counter:05}_.safetensors"
        path = os.path.join(folder, name)
        if not os.path.exists(path) and not os.path.exists(state_path(path)):
            return path
        counter += 1


def _save_checkpoint(para: ParaModel, state: dict[str, torch.Tensor], state_meta: dict[str, str],
                     filename_prefix: str, step: int) -> str:
    """Write <prefix>_<step>_steps_<n>_.safetensors (Save LoRA's naming) and its sidecar, each atomically,
    never overwriting."""
    out_dir = folder_paths.get_output_directory()
    folder, filename, _counter, _sub, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
    os.makedirs(folder, exist_ok=True)
    path = _free_name(folder, filename, step)
    side = state_path(path)
    safetensors_io.save_file(state, side, state_meta)
    try:
        para.save(path)
    except BaseException:
        try:
            os.unlink(side)
        except OSError:
            pass
        raise
    return path


# ---- preview -------------------------------------------------------------------------------------
def _previewer(base_model):
    import latent_preview
    p = latent_preview.get_previewer(comfy.model_management.get_torch_device(), base_model.latent_format)
    if p is None and getattr(base_model.latent_format, "latent_rgb_factors", None) is not None:
        lf = base_model.latent_format
        p = latent_preview.Latent2RGBPreviewer(lf.latent_rgb_factors, lf.latent_rgb_factors_bias,
                                               getattr(lf, "latent_rgb_factors_reshape", None))
    return p


def _to_image_tensor(pil) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)


# ---- the trainer ---------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    steps: int
    learning_rate: float
    rank: int
    seed: int
    batch_size: int
    grad_accumulation_steps: int
    optimizer: str
    loss_function: str
    training_dtype: str
    gradient_checkpointing: bool
    targets: str
    include: str
    exclude: str
    rank_boundary: float
    loss_space: str
    existing_para: str
    save_every: int
    preview_every: int
    filename_prefix: str
    init: str
    projection: str


def _mix(seed: int, step: int) -> int:
    """A generator seed for one micro-step, from (seed, step) only: runs and resumed runs draw the same."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + 1) % (2 ** 63)


class Trainer:
    """One training run. Kept out of the node class so tests and benchmarks can drive it directly."""

    def __init__(self, model, latents: list[dict], positive: list, cfg: TrainConfig, vae=None,
                 node_id: str | None = None):
        self.model, self.cfg, self.vae, self.node_id = model, cfg, vae, node_id
        self.images = _flatten_latents(latents)
        self.captions = _flatten_conditioning(positive)
        if not self.images:
            raise ValueError("Train PaRa: no latents")
        if len(self.captions) == 1:
            self.caption_of = [0] * len(self.images)
        elif len(self.captions) == len(self.images):
            self.caption_of = list(range(len(self.images)))
        else:
            raise ValueError(f"Train PaRa: {len(self.captions)} captions (positive) for {len(self.images)} images: "
                             "give one caption for all images or one per image")
        self.dtype = DTYPES[cfg.training_dtype]
        self.loss_map: dict[str, list[float]] = {"loss": []}
        self.previews: list[torch.Tensor] = []
        self.saved: list[str] = []

    # -- setup --
    def _existing(self) -> tuple[ParaModel | None, int, dict | None]:
        name = self.cfg.existing_para
        if not name or name == NONE:
            return None, 0, None
        path = folder_paths.get_full_path("para", name)
        if path is None:
            raise ValueError(f"Train PaRa: existing_para '{name}' not found in the para folders")
        try:
            para = ParaModel.load(path)
        except ParaError as e:
            raise ValueError(f"Train PaRa: existing_para: {e}") from None
        if para.max_stages() != 1:
            raise ValueError(f"Train PaRa: {name} is a sequential merge of {para.max_stages()} stages; training continues "
                             "single-stage PaRa files only (merge with mode 'union' first)")
        steps = int(parse_training_metadata(para).get("steps", 0) or 0)
        return para, steps, _load_state(state_path(path), para, self.cfg.optimizer)

    def _network(self, candidates: dict[str, torch.nn.Module], existing: ParaModel | None, state: dict | None) -> tuple[ParaNetwork, TargetPlan]:
        cfg = self.cfg
        out_dims = {n: int(m.weight.shape[0]) for n, m in candidates.items()}
        if existing is not None:
            missing = [m for m in existing.stages if m not in candidates]
            if missing:
                raise ValueError(f"Train PaRa: existing_para has {len(missing)} layers this model does not have "
                                 f"(first: {missing[0]}): it was trained for another model")
            p = TargetPlan(parse_training_metadata(existing).get("targets", "existing"), "existing",
                           requested_rank=cfg.rank, gamma=cfg.rank_boundary)
            for m, chain in existing.stages.items():
                p.ranks[m], p.out_dims[m] = chain[0].shape[1], out_dims[m]
            src = state["b"] if state is not None else {m: chain[0] for m, chain in existing.stages.items()}
            layers = {m: ParaLayer(src[m].to(torch.float32)) for m in sorted(existing.stages)}
            return ParaNetwork(layers, cfg.projection), p
        try:
            p = plan(out_dims, cfg.targets, cfg.rank, cfg.rank_boundary, cfg.include, cfg.exclude)
        except ValueError as e:
            raise ValueError(f"Train PaRa: {e}") from None
        if not p.ranks:
            raise ValueError(f"Train PaRa: targets '{p.targets_string()}' select no layer of this model")
        weights = {n: candidates[n].weight.detach() for n in p.ranks}
        net = ParaNetwork.from_weights(weights, p.ranks, cfg.init, cfg.seed, cfg.projection)
        return net, p

    def _metadata(self, p: TargetPlan, total_steps: int, space: str) -> dict[str, str]:
        cfg = self.cfg
        training = {"steps": total_steps, "learning_rate": cfg.learning_rate, "rank": cfg.rank, "gamma": cfg.rank_boundary,
                    "seed": cfg.seed, "optimizer": cfg.optimizer, "loss_function": cfg.loss_function, "loss_space": space,
                    "init": self.init_used, "batch_size": cfg.batch_size, "grad_accumulation_steps": cfg.grad_accumulation_steps,
                    "training_dtype": cfg.training_dtype, "projection": cfg.projection, "layers": len(p.ranks),
                    "targets": p.targets_string()}
        meta = {"targets": p.targets_string(), "training": json.dumps(training, sort_keys=True),
                "name": os.path.basename(cfg.filename_prefix)}
        base = self.base_model_name
        if base:
            meta["base_model"] = base
        return meta

    # -- the run --
    def run(self):
        cfg = self.cfg
        existing, start_step, state = self._existing()
        self.init_used = (parse_training_metadata(existing).get("init", "existing") if existing is not None else cfg.init)
        mp = self.model.clone()
        mp.set_model_compute_dtype(self.dtype)
        with torch.inference_mode(False):
            comfy.model_management.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
            base = mp.model
            device = mp.load_device
            self.base_model_name = type(getattr(base, "model_config", None)).__name__.lower() if getattr(base, "model_config", None) else ""
            owned = _own_parameters(base)
            log.debug("PaRa: %d inference tensors of the model replaced by normal copies", owned)
            candidates = _candidates(base)
            network, p = self._network(candidates, existing, state)
            network.to(device)
            self.plan = p
            log.info("Train PaRa: %s", p.describe())
            optimizer = _optimizer(cfg.optimizer, [layer.b for _, layer in network.items()], cfg.learning_rate)
            if state is not None:
                _restore_optimizer(optimizer, network, state["tensors"], state["meta"])
                self.loss_map["loss"] = [float(x) for x in state["tensors"].get("loss", torch.zeros(0)).tolist()]
            ms = base.model_sampling
            space = _space_name(ms) if cfg.loss_space == "prediction" else "x0"

            groups = _group_by_shape([base.process_latent_in(_own(t).float().to(device)) for t in self.images])
            conds = {}
            for gi, g in enumerate(groups):
                noise = torch.zeros((1,) + tuple(g.latents.shape[1:]), device=device)
                c = comfy.samplers.process_conds(base, noise, {"positive": comfy.sampler_helpers.convert_cond(self.captions)},
                                                 device, seed=cfg.seed)
                conds[gi] = _own_conds(c["positive"])
            weights = torch.tensor([float(len(g.index)) for g in groups])

            t_opts = dict(mp.model_options.get("transformer_options", {}))
            total = start_step + cfg.steps
            autocast = torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
            detach = restore_ckpt = bar = None
            try:  # from here on the shared torch model is modified (forward wrappers): always undo in finally
                detach = network.attach(candidates, _comfy_weight_of, _comfy_bias_of)
                if cfg.gradient_checkpointing:
                    restore_ckpt = _enable_checkpointing(_checkpoint_units(base.diffusion_model))
                mp.pre_run()
                previewer = _previewer(base) if cfg.preview_every > 0 and self.vae is None else None
                pbar = comfy.utils.ProgressBar(cfg.steps, node_id=self.node_id)
                bar = tqdm(total=cfg.steps, desc="Training PaRa", disable=not comfy.utils.PROGRESS_BAR_ENABLED)
                for step in range(start_step, total):
                    micro_losses = []
                    for j in range(cfg.grad_accumulation_steps):
                        comfy.model_management.throw_exception_if_processing_interrupted()
                        micro = step * cfg.grad_accumulation_steps + j
                        gen = torch.Generator().manual_seed(_mix(cfg.seed, micro))
                        gi = int(torch.multinomial(weights, 1, generator=gen)) if len(groups) > 1 else 0
                        g = groups[gi]
                        pick = torch.randperm(len(g.index), generator=gen)[:cfg.batch_size].tolist()
                        x0 = g.latents[pick]
                        noise = torch.randn(x0.shape, generator=gen).to(device)
                        pct = torch.rand(len(pick), generator=gen).tolist()
                        sigma = torch.tensor([float(ms.percent_to_sigma(v)) for v in pct], device=device)
                        kw = _batch_conds([conds[gi][self.caption_of[g.index[i]]] for i in pick])
                        opts = dict(t_opts, sigmas=sigma, cond_or_uncond=[0] * len(pick))
                        with network.step():
                            with autocast:
                                xt = ms.noise_scaling(sigma, noise, x0, False)
                                x0_pred = base.apply_model(xt, sigma, transformer_options=opts, **kw)
                            residual = x0_pred.float() - x0.float()
                            if space != "x0":
                                residual = residual / _prediction_scale(ms, sigma, residual.ndim)
                            loss = _loss(cfg.loss_function, residual)
                            (loss / cfg.grad_accumulation_steps).backward()
                        micro_losses.append(float(loss.detach()))
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    loss_value = sum(micro_losses) / len(micro_losses)
                    self.loss_map["loss"].append(loss_value)
                    done = step + 1
                    preview = None
                    if cfg.preview_every > 0 and (done % cfg.preview_every == 0 or done == total):
                        preview = self._preview(base, ms, network, groups, conds, t_opts, autocast, previewer)
                    if cfg.save_every > 0 and (done % cfg.save_every == 0 or done == total):
                        self._checkpoint(network, optimizer, p, done, space)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}")
                    self._report(done - start_step, cfg.steps, done, total, loss_value, pbar, preview)
            finally:
                if bar is not None:
                    bar.close()
                if restore_ckpt is not None:
                    restore_ckpt()
                if detach is not None:
                    detach()
                mp.cleanup()
            network.requires_grad_(False)
            para = network.to_para_model(self._metadata(p, total, space))
        self.space = space
        self.network = network
        self.total_steps = total
        return para

    def _report(self, done_here, steps, done, total, loss, pbar, preview):
        pbar.update_absolute(done_here, steps, preview)
        try:
            from server import PromptServer
            srv = PromptServer.instance
            if self.node_id is not None and hasattr(srv, "send_progress_text"):
                srv.send_progress_text(f"step {done}/{total}  loss {loss:.4f}", self.node_id)
        except Exception:  # no server (tests, scripts): the tqdm bar and the log carry the loss
            pass

    def _checkpoint(self, network: ParaNetwork, optimizer, p: TargetPlan, done: int, space: str) -> None:
        para = network.to_para_model(self._metadata(p, done, space))
        meta = {"format": STATE_FORMAT, "version": "1", "step": str(done), "optimizer": type(optimizer).__name__,
                "seed": str(self.cfg.seed), "param_groups": json.dumps(
                    [{k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
                     for g in optimizer.state_dict()["param_groups"]], sort_keys=True)}
        path = _save_checkpoint(para, _state_tensors(network, optimizer, self.loss_map["loss"]), meta,
                                self.cfg.filename_prefix, done)
        self.saved.append(path)
        log.info("Train PaRa: step %d saved %s", done, path)

    @torch.no_grad()
    def _preview(self, base, ms, network, groups, conds, t_opts, autocast, previewer):
        """A sample from the first caption with fixed noise (Euler, cfg 1), decoded by the VAE or the latent previewer."""
        g = groups[0]
        cond = _batch_conds([conds[0][self.caption_of[g.index[0]]]])
        device = g.latents.device
        gen = torch.Generator().manual_seed(int(self.cfg.seed) % (2 ** 63))
        shape = (1,) + tuple(g.latents.shape[1:])
        sigmas = comfy.samplers.calculate_sigmas(ms, "simple", PREVIEW_STEPS).to(device)
        x = ms.noise_scaling(sigmas[:1], torch.randn(shape, generator=gen).to(device), torch.zeros(shape, device=device), True)
        with network.step():
            for i in range(len(sigmas) - 1):
                comfy.model_management.throw_exception_if_processing_interrupted()
                s = sigmas[i:i + 1]
                with autocast:
                    den = base.apply_model(x, s, transformer_options=dict(t_opts, sigmas=s, cond_or_uncond=[0]), **cond).float()
                x = x + (x - den) / s.reshape(-1, 1, 1, 1) * (sigmas[i + 1] - sigmas[i])
        x = ms.inverse_noise_scaling(sigmas[-1:], x)
        if self.vae is not None:
            img = self.vae.decode(base.process_latent_out(x.float()).to(self.vae.device if hasattr(self.vae, "device") else x.device))
            img = img.reshape((-1,) + tuple(img.shape[-3:]))[:1].float().cpu()
            self.previews.append(img[0])
            from PIL import Image
            pil = Image.fromarray((img[0].clamp(0, 1).numpy() * 255).astype(np.uint8))
        elif previewer is not None:
            pil = previewer.decode_latent_to_preview(x.float())
            self.previews.append(_to_image_tensor(pil))
        else:
            return None
        import latent_preview
        return ("JPEG", pil, latent_preview.MAX_PREVIEW_RESOLUTION)


def _first(v, default=None):
    """Inputs arrive as lists (is_input_list); optional ones may be missing."""
    if v is None:
        return default
    return v[0] if isinstance(v, list) else v


class PaRaTrainer(io.ComfyNode):
    """Train a PaRa on a few images: the ComfyUI counterpart of the paper's personalisation run."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PaRaTrainer",
            display_name="Train PaRa",
            category="training",
            description="Train PaRa (Parameter Rank Reduction, ICLR 2025): learn, per targeted layer, a rank-r subspace "
                        "of its output space that is removed from the weight (W - QQᵀW, Q = orth(B)). Takes the same "
                        "dataset inputs as Train LoRA. Outputs the patched model, the PaRa (connect Save PaRa), the loss "
                        "history (connect Plot Loss Graph) and the total step count.",
            is_experimental=True,
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="The base diffusion model to personalise. It is not modified; connect the "
                                                "plain model (not one with this PaRa already applied)."),
                io.Latent.Input("latents", tooltip="The training images as latents (VAE Encode, or the dataset nodes). "
                                                   "Several resolutions and ResolutionBucket output are handled automatically."),
                io.Conditioning.Input("positive", tooltip="The caption(s): one for all images, or one per image "
                                                          "(include the trigger word you will prompt with)."),
                io.Int.Input("batch_size", default=1, min=1, max=10000, tooltip="Images per training step."),
                io.Int.Input("grad_accumulation_steps", default=1, min=1, max=1024,
                             tooltip="Batches whose gradients are summed before one optimizer step."),
                io.Int.Input("steps", default=200, min=1, max=100000,
                             tooltip="Optimizer steps to train (added to those of existing_para when continuing)."),
                io.Float.Input("learning_rate", default=0.0005, min=0.0000001, max=1.0, step=0.0000001,
                               tooltip="Learning rate for B. B's columns start at unit norm, so with Adam this is roughly "
                                       "the per-step rotation of the removed subspace."),
                io.Int.Input("rank", default=4, min=1, max=128,
                             tooltip="How many output directions each layer loses (r). Higher: closer to the subject, "
                                     "less editable. Capped per layer by rank_boundary."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="AdamW", tooltip="The optimizer for B."),
                io.Combo.Input("loss_function", options=list(LOSS_FUNCTIONS), default="MSE",
                               tooltip="The loss applied to the prediction error (see loss_space)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed for B's initialisation and for the noise, timesteps and batches of every step. "
                                     "Same seed and inputs: the same run."),
                io.Combo.Input("training_dtype", options=list(DTYPES), default="bf16",
                               tooltip="Compute dtype of the model during training (autocast). B and its QR stay float32."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in backward instead of storing them: less memory, ~30% slower."),
                io.Combo.Input("targets", options=list(PRESETS), default=DEFAULT_PRESET,
                               tooltip="Which layers PaRa trains. ExCA (paper default): all layers except cross-attention "
                                       "and time/label embeddings (for SD3/Flux: the text stream and the timestep "
                                       "modulation). self_attention, attention (self + cross), all (every layer Train LoRA trains)."),
                io.Float.Input("rank_boundary", default=DEFAULT_GAMMA, min=0.0, max=1.0, step=0.001,
                               tooltip="γ: a layer with output size d gets rank min(rank, max(1, floor(γ·d))). The paper "
                                       "found γ≈1/40 stable; 0 turns the cap off."),
                io.Combo.Input("loss_space", options=list(LOSS_SPACES), default="prediction",
                               tooltip="prediction: the error of the model's own target (ε for SD1.5/SDXL, v for "
                                       "v-prediction, flow velocity for SD3/Flux), as standard trainers do. x0: the error "
                                       "of the denoised latent, as Train LoRA does (weights noisy steps by σ²)."),
                io.String.Input("include", default="", optional=True,
                                tooltip="Extra layers: regular expressions (comma or newline separated) matched against "
                                        "names like diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k."),
                io.String.Input("exclude", default="", optional=True,
                                tooltip="Layers to leave out (regular expressions, comma or newline separated); wins over "
                                        "the preset and include. Tip for SD1.5/SDXL: ^diffusion_model\\.out\\. keeps the "
                                        "4-channel output conv whole (rank 1 there removes a quarter of the latent space)."),
                io.Combo.Input("existing_para", options=[NONE] + folder_paths.get_filename_list("para"), default=NONE,
                               optional=True,
                               tooltip="Continue training this PaRa file (its layers and ranks; the step count continues). "
                                       "Files written by save_every also restore the optimizer state, so the run continues "
                                       "the same trajectory."),
                io.Int.Input("save_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Every N steps (and at the end) write output/<filename_prefix>_<step>_steps_NNNNN_.safetensors "
                                     "plus its .para_state training state. 0: no intermediate files (use Save PaRa)."),
                io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Every N steps, sample the first caption with fixed noise and show it on this node "
                                     "(VAE-decoded if a vae is connected, else the latent preview). 0: off."),
                io.Vae.Input("vae", optional=True, tooltip="Optional: decode previews with this VAE instead of the latent preview."),
                io.String.Input("filename_prefix", default="para/ComfyUI_para_train", optional=True,
                                tooltip="Where save_every files go, relative to the output folder."),
                io.Combo.Input("init", options=list(INITS), default=DEFAULT_INIT, optional=True,
                               tooltip="How B starts. small_sv: the directions of each weight with the smallest singular "
                                       "values (the model barely changes at step 0). random: random directions. top_sv: "
                                       "the dominant directions (for experiments)."),
                io.Combo.Input("projection", options=list(MODES), default="auto", optional=True,
                               tooltip="Where PaRa is applied while training. auto: on the layer output unless the flop "
                                       "count favours the weight (results are identical). output / weight: force one."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained PaRa applied as weight patches."),
                Para.Output(display_name="para", tooltip="The trained PaRa: connect Save PaRa, Merge PaRa or Apply PaRa."),
                LossMap.Output(display_name="loss_map", tooltip="Loss per step: connect Plot Loss Graph."),
                io.Int.Output(display_name="steps", tooltip="Total training steps (including those of existing_para)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, latents, positive, batch_size, grad_accumulation_steps, steps, learning_rate, rank,
                optimizer, loss_function, seed, training_dtype, gradient_checkpointing, targets, rank_boundary,
                loss_space, include=None, exclude=None, existing_para=None, save_every=None, preview_every=None,
                vae=None, filename_prefix=None, init=None, projection=None) -> io.NodeOutput:
        cfg = TrainConfig(
            steps=_first(steps), learning_rate=_first(learning_rate), rank=_first(rank), seed=_first(seed),
            batch_size=_first(batch_size), grad_accumulation_steps=_first(grad_accumulation_steps),
            optimizer=_first(optimizer), loss_function=_first(loss_function), training_dtype=_first(training_dtype),
            gradient_checkpointing=_first(gradient_checkpointing), targets=_first(targets),
            include=_first(include, "") or "", exclude=_first(exclude, "") or "", rank_boundary=_first(rank_boundary),
            loss_space=_first(loss_space), existing_para=_first(existing_para, NONE) or NONE,
            save_every=_first(save_every, 0) or 0, preview_every=_first(preview_every, 0) or 0,
            filename_prefix=_first(filename_prefix, "para/ComfyUI_para_train") or "para/ComfyUI_para_train",
            init=_first(init, DEFAULT_INIT) or DEFAULT_INIT, projection=_first(projection, "auto") or "auto")
        hidden = getattr(cls, "hidden", None)
        node_id = getattr(hidden, "unique_id", None) if hidden is not None else None
        trainer = Trainer(_first(model), latents, positive, cfg, vae=_first(vae), node_id=node_id)
        para = trainer.run()
        out_model, _clip, text = apply_para(para, _first(model), None, 1.0, 1.0)
        losses = trainer.loss_map["loss"]
        summary = (f"{trainer.plan.describe()}\nsteps {trainer.total_steps}, loss {losses[-1]:.4f} "
                   f"({trainer.space} space); {para.num_bytes() / 1024:.1f} KiB as fp16")
        if trainer.saved:
            summary += f"\nsaved {len(trainer.saved)} file(s), last {os.path.relpath(trainer.saved[-1], folder_paths.get_output_directory())}"
        ui_out: dict = ui_text.report(cls, summary).as_dict()  # on the node and in the history
        if trainer.previews:
            ui_out.update(ui.PreviewImage(torch.stack(trainer.previews), cls=cls).as_dict())
        return io.NodeOutput(out_model, para, trainer.loss_map, trainer.total_steps, ui=ui_out)


NODES = [PaRaTrainer]

"""Train PaRa: personalise a diffusion model by learning the subspace PaRa removes (W - QQᵀW).

This file adapts ComfyUI to the host-independent trainer in ``para_core.train`` (config, loss, optimizer,
checkpointing, the ``.para_state`` sidecar, the optimizer-step loop): model loading, captions and
latents, the model forward as the loop's ``micro_loss``, progress, previews and file names.

Inputs follow ComfyUI's core "Train LoRA" node (``is_input_list``), so the core dataset nodes
(LoadImageDataSetFromFolder, LoadImageTextDataSetFromFolder, MakeTrainingDataset, ResolutionBucket)
feed it unchanged. How it differs from the core trainer, and why:

* Only the targeted layers are touched. PaRa is applied to their *outputs* by a forward wrapper
  (para_core.layer; weight space only where the flop count says so), so no weight copy is made per
  step and frozen layers get no wrapper at all. The inference-mode trap (the executor loads models
  under ``torch.inference_mode()``, and such parameters cannot be saved for backward) is avoided by
  giving the model, for the run only, normal tensors that *alias* the storage of its inference-tensor
  parameters (no copy, same bits).
* The input model is left exactly as it was (`train_host.SharedModel`): parameter and buffer objects, module
  flags (``comfy_cast_weights``, ``weight_function``, ...), forward attributes, object patches and
  ComfyUI's loaded-model list are put back after a finished, failed or cancelled run.
* Each training sample is paired with its own caption (the core sampler applies every caption to the
  whole batch and averages), every latent - also multi-resolution and bucketed ones - goes through
  ``process_latent_in``, and the loss can be taken in the model's own prediction space (ε / v / flow,
  via the σ-dependent scale of ``calculate_denoised``) instead of x0 space.
* Randomness is a function of (seed, step) only, and files written by ``save_every`` carry the
  training state (B, optimizer state, loss history) in a safetensors sidecar ``<file>.para_state``,
  so a resumed run continues the same trajectory.
* No host synchronisation per step: losses are read one step late (the progress text lags one step).
* Bad inputs (a filename_prefix the pack's prefix rule refuses, an existing_para that does not fit) fail before
  the model is loaded or any step runs, with one line naming the prefix or file, key and shapes; a bad prefix
  (here or on a Save PaRa this node feeds) already when ComfyUI validates the prompt (nodes/paths.py).
* The MODEL output carries the result as ordinary weight patches (nodes.patching.apply_para) with
  exactly the bases a saved file reloads to - no training wrappers.
"""
from __future__ import annotations

import logging
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from comfy_api.latest import io, ui
from tqdm.auto import tqdm

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import folder_paths

from ..para_core.errors import ParaError
from ..para_core.format import ParaModel, parse_training_metadata, stage_key, training_metadata
from ..para_core.layer import DEFAULT_INIT, INITS, MODES, ParaLayer, ParaNetwork
from ..para_core.families import family_of
from ..para_core.targets import DEFAULT_GAMMA, DEFAULT_PRESET, PRESETS, TargetPlan, plan
from ..para_core.train import (DEFAULT_CHECKPOINT_DEPTH, DTYPES, LOSS_FUNCTIONS, LOSS_SPACES, LR_SCHEDULES, OPTIMIZERS,
                               ShapeGroup, TrainConfig, TrainingLoop, ValidationPoint, checkpoint_units, draw_micro_batch,
                               enable_checkpointing, group_by_shape, loss_value, make_optimizer, read_state,
                               restore_optimizer, save_with_state, split_validation, stages_b, state_path,
                               validation_points)
from . import folders, paths, train_host, ui_text
from .loss_plot import loss_plot
from .patching import apply_para

log = logging.getLogger(__name__)

folders.register()

Para = io.Custom("PARA")
LossMap = io.Custom("LOSS_MAP")

NONE = "[None]"
DEFAULT_PREFIX = "para/ComfyUI_para_train"
PREVIEW_STEPS = 12
VALIDATION_POINTS = 4  # fixed (noise, σ) evaluations per held-out image
CHECK_EVERY = 50  # optimizer steps between validations of the bases (one host synchronisation each)

# ---- data ----------------------------------------------------------------------------------------
@dataclass
class _Samples:
    """Training (or held-out) images, each (1, C, ...), with its caption (index into `captions`) and its bucket
    (which LATENT input it came from: core's bucket_mode, fed by ResolutionBucket, has one per bucket)."""
    images: list[torch.Tensor]
    captions: list
    caption_of: list[int]
    buckets: list[int]

    @classmethod
    def from_inputs(cls, latents: list[dict], positive: list, what: str = "") -> "_Samples":
        """Every image of every LATENT input in order (plain, multi-resolution and bucketed inputs), with one
        caption for all or one per image (every [cond, extras] entry of every CONDITIONING input, in order)."""
        images, buckets = [], []
        for bucket, d in enumerate(latents):
            t = d["samples"]
            images.extend(t[i:i + 1] for i in range(t.shape[0]))
            buckets.extend([bucket] * t.shape[0])
        captions = []
        for c in positive:
            captions.extend(c if isinstance(c, list) else [c])
        if not images:
            raise ValueError(f"Train PaRa: no {what}latents")
        if len(captions) == 1:
            caption_of = [0] * len(images)
        elif len(captions) == len(images):
            caption_of = list(range(len(images)))
        else:
            raise ValueError(f"Train PaRa: {len(captions)} captions ({what}positive) for {len(images)} {what}images: "
                             "give one caption for all images or one per image")
        return cls(images, captions, caption_of, buckets)

    def subset(self, index: list[int]) -> "_Samples":
        return _Samples([self.images[i] for i in index], self.captions, [self.caption_of[i] for i in index],
                        [self.buckets[i] for i in index])

    def __add__(self, other: "_Samples") -> "_Samples":
        shift = len(self.captions)
        return _Samples(self.images + other.images, self.captions + other.captions,
                        self.caption_of + [c + shift for c in other.caption_of], self.buckets + other.buckets)


# ---- files ---------------------------------------------------------------------------------------------
def _check_prefix(prefix: str) -> tuple[str, str]:
    """(folder, file name stem) of the save_every files, checked before the model is loaded: the pack's one
    prefix rule (nodes/paths.py, also run by validate_inputs before the prompt starts), then the folder is
    created and must be writable. One line naming the prefix or the folder."""
    out_dir = folder_paths.get_output_directory()
    folder, filename, _sub = paths.resolve_prefix("Train PaRa", prefix, out_dir)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"Train PaRa: cannot create the folder {folder} for filename_prefix {prefix!r}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"Train PaRa: filename_prefix {prefix!r}: the folder {folder} is not writable")
    return folder, filename


def _free_name(folder: str, filename: str, step: int) -> str:
    counter = 1
    while True:
        name = f"{filename}_{step}_steps_{counter:05}_.safetensors"
        path = os.path.join(folder, name)
        if not os.path.exists(path) and not os.path.exists(state_path(path)):
            return path
        counter += 1


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


# ---- the run's forward ---------------------------------------------------------------------------
@contextmanager
def _keeping_modes(network: ParaNetwork):
    """Forwards without gradient (previews, validation) pick projection spaces by the flop rule; the summary
    reports what training used, so the network's record of the last mode per layer is put back."""
    saved = dict(network.layer_modes), dict(network.mode_counts)
    try:
        yield
    finally:
        network.layer_modes.clear()
        network.layer_modes.update(saved[0])
        network.mode_counts.update(saved[1])


@dataclass
class _Prepared:
    """Samples on the device for the model: latents through process_latent_in, grouped (by shape, or by
    bucket in bucket_mode), and per group every caption as ComfyUI's processed conds."""
    samples: _Samples
    groups: list[ShapeGroup]
    conds: dict[int, list[dict]]

    @classmethod
    def of(cls, samples: _Samples, fwd: "_Forward", seed: int, bucket_mode: bool = False) -> "_Prepared":
        base, device = fwd.base, fwd.device
        groups = group_by_shape([base.process_latent_in(train_host.own(t).float().to(device)) for t in samples.images],
                                samples.buckets if bucket_mode else None)
        conds = {}
        for gi, g in enumerate(groups):
            noise = torch.zeros((1,) + tuple(g.latents.shape[1:]), device=device)
            c = comfy.samplers.process_conds(base, noise, {"positive": comfy.sampler_helpers.convert_cond(samples.captions)},
                                             device, seed=seed)
            conds[gi] = train_host.own_conds(c["positive"])
        return cls(samples, groups, conds)


@dataclass
class _Forward:
    """The model forward of a run as losses: the training micro-batch and the held-out validation loss."""
    base: object
    device: torch.device
    host_ms: object
    t_opts: dict
    autocast: object
    space: str
    loss_function: str

    def residuals(self, data: _Prepared, group: int, picks: list[int], noise: torch.Tensor, timesteps: list[float]) -> torch.Tensor:
        """The prediction errors of images `picks` of group `group`, noised with `noise` (CPU) at these timesteps."""
        g = data.groups[group]
        x0 = g.latents.index_select(0, train_host.to_device(torch.tensor(picks), self.device))
        sigma = torch.tensor([float(self.host_ms.percent_to_sigma(v)) for v in timesteps])
        kw = train_host.batch_conds([data.conds[group][data.samples.caption_of[g.index[i]]] for i in picks])
        return train_host.prediction_error(self.base, x0, train_host.to_device(noise, self.device),
                                           train_host.to_device(sigma, self.device), kw, self.t_opts, self.space, self.autocast)

    def loss(self, data: _Prepared, group: int, picks: list[int], noise: torch.Tensor, timesteps: list[float]) -> torch.Tensor:
        return loss_value(self.loss_function, self.residuals(data, group, picks, noise, timesteps))

    @torch.no_grad()
    def validation_loss(self, held_out: _Prepared, points: list[ValidationPoint], network: ParaNetwork, batch_size: int) -> float:
        """Mean over the fixed points (`para_core.train.validation_points`) of each point's loss: the same loss
        function and space as training, at fixed noise and σ, so values at different steps compare. Batched by
        group, at most batch_size points per forward; one host synchronisation."""
        where = {}  # held-out image -> (group, position in the group)
        for gi, g in enumerate(held_out.groups):
            for pos, i in enumerate(g.index):
                where[i] = (gi, pos)
        losses = []
        with network.step(), _keeping_modes(network):
            for gi in range(len(held_out.groups)):
                mine = [pt for pt in points if where[pt.image][0] == gi]
                for k in range(0, len(mine), batch_size):
                    chunk = mine[k:k + batch_size]
                    r = self.residuals(held_out, gi, [where[pt.image][1] for pt in chunk], torch.cat([pt.noise for pt in chunk]),
                                       [pt.timestep for pt in chunk])
                    losses.extend(loss_value(self.loss_function, r[j:j + 1]) for j in range(len(chunk)))
        return float(torch.stack(losses).double().mean())


# ---- the trainer ---------------------------------------------------------------------------------
class Trainer:
    """One training run in ComfyUI. Kept out of the node class so tests and benchmarks can drive it directly."""

    def __init__(self, model, latents: list[dict], positive: list, cfg: TrainConfig, vae=None,
                 node_id: str | None = None, validation_latents: list[dict] | None = None,
                 validation_positive: list | None = None):
        self.model, self.cfg, self.vae, self.node_id = model, cfg, vae, node_id
        samples = _Samples.from_inputs(latents, positive)
        try:
            train_index, held_out = split_validation(len(samples.images), cfg.validation_split, cfg.seed)
        except ValueError as e:
            raise ValueError(f"Train PaRa: {e}") from None
        self.train = samples.subset(train_index)
        self.validation = samples.subset(held_out) if held_out else None
        if validation_latents:
            if not validation_positive:
                if len(samples.captions) != 1:
                    raise ValueError("Train PaRa: validation_latents without validation_positive needs one training caption "
                                     f"for all images (there are {len(samples.captions)}): connect validation_positive")
                validation_positive = [samples.captions]
            given = _Samples.from_inputs(validation_latents, validation_positive, "validation_")
            self.validation = given if self.validation is None else self.validation + given
        self.dtype = cfg.dtype  # None: training_dtype 'none', the model's own (known once it is loaded)
        self.projection = "output" if cfg.bypass_mode else cfg.projection  # bypass: outputs only, through hooks
        self.loss_map: dict[str, list] = {"loss": []}
        self.previews: list[torch.Tensor] = []
        self.saved: list[str] = []
        self.notes: list[str] = []
        self.modes = ""  # which projection space the layers used (set at the end of a run)
        self.out_folder: str | None = None
        self.out_name = ""

    # -- setup --
    def _existing(self) -> tuple[ParaModel | None, int, object]:
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
            raise ValueError(f"Train PaRa: {path}: a sequential merge of {para.max_stages()} stages; training continues "
                             "single-stage PaRa files only (merge with mode 'union' first)")
        steps = int(parse_training_metadata(para).get("steps", 0) or 0)
        try:
            state = read_state(para)
        except ParaError as e:
            note = f"ignored training state: {e}; continuing from the file's bases with a fresh {self.cfg.optimizer} state"
            log.warning("Train PaRa: %s", note)
            self.notes.append(note)
            state = None
        if state is None and not os.path.exists(state_path(path)):
            log.info("Train PaRa: %s has no training state (%s): continuing from its saved bases with a fresh %s state",
                     path, os.path.basename(state_path(path)), self.cfg.optimizer)
        return para, steps, state

    def _check_existing_fits(self, existing: ParaModel, candidates: dict[str, torch.nn.Module]) -> None:
        """Before loading: every module of the file exists in the model, with B's row count = its output dim."""
        out_dims = {n: int(m.weight.shape[0]) for n, m in candidates.items()}
        weights = {n: tuple(m.weight.shape) for n, m in candidates.items()}
        missing = [m for m in existing.stages if m not in out_dims]
        if missing:
            raise ValueError(f"Train PaRa: {existing.source}: {stage_key(missing[0], 0)} names a layer this model does not "
                             f"have ({len(missing)} of {len(existing.stages)} layers missing): it was trained for another model")
        for m, chain in existing.stages.items():
            q = chain[0]
            if q.shape[0] != out_dims[m] or not 1 <= q.shape[1] < max(2, out_dims[m]):
                raise ValueError(f"Train PaRa: {existing.source}: {stage_key(m, 0)} has shape {tuple(q.shape)}, but the "
                                 f"model's {m}.weight has shape {weights[m]} (needs {out_dims[m]} x r, r < {out_dims[m]})")

    def _network(self, candidates: dict[str, torch.nn.Module], existing: ParaModel | None, state) -> tuple[ParaNetwork, TargetPlan]:
        cfg = self.cfg
        out_dims = {n: int(m.weight.shape[0]) for n, m in candidates.items()}
        if existing is not None:  # checked to fit by run(), before the model was loaded
            p = TargetPlan(parse_training_metadata(existing).get("targets", "existing"), "existing",
                           requested_rank=cfg.rank, gamma=cfg.rank_boundary)
            for m, chain in existing.stages.items():
                p.ranks[m], p.out_dims[m] = chain[0].shape[1], out_dims[m]
            layers = {m: ParaLayer(b) for m, b in sorted(stages_b(existing, state).items())}
            return ParaNetwork(layers, self.projection), p
        try:
            family = family_of(self.model)
            p = plan(out_dims, cfg.targets, cfg.rank, cfg.rank_boundary, cfg.include, cfg.exclude, layout=family)
            p.from_names = family is None and p.layout != "generic"
        except ValueError as e:
            raise ValueError(f"Train PaRa: {e}") from None
        if not p.ranks:
            raise ValueError(f"Train PaRa: targets '{p.targets_string()}' select no layer of this model")
        weights = {n: candidates[n].weight.detach() for n in p.ranks}
        net = ParaNetwork.from_weights(weights, p.ranks, cfg.init, cfg.seed, self.projection)
        return net, p

    def _metadata(self, p: TargetPlan, total_steps: int, space: str) -> dict[str, str]:
        cfg = self.cfg
        training = {"steps": total_steps, "learning_rate": cfg.learning_rate, "rank": cfg.rank, "gamma": cfg.rank_boundary,
                    "seed": cfg.seed, "optimizer": cfg.optimizer, "loss_function": cfg.loss_function, "loss_space": space,
                    "init": self.init_used, "batch_size": cfg.batch_size, "grad_accumulation_steps": cfg.grad_accumulation_steps,
                    "training_dtype": cfg.training_dtype, "projection": self.projection, "layers": len(p.ranks),
                    "targets": p.targets_string(), "lr_schedule": cfg.lr_schedule, "warmup_steps": cfg.warmup_steps,
                    "bucket_mode": cfg.bucket_mode, "bypass_mode": cfg.bypass_mode}
        return training_metadata(training, p.targets_string(), os.path.basename(cfg.filename_prefix), self.base_model_name)

    # -- the run --
    def run(self):
        cfg = self.cfg
        existing, start_step, state = self._existing()
        total = start_step + cfg.steps
        self.done, self.total = start_step, total
        if cfg.save_every > 0:
            self.out_folder, self.out_name = _check_prefix(cfg.filename_prefix)
        if existing is not None:
            self._check_existing_fits(existing, train_host.trainable_layers(self.model.model))
        self.init_used = (parse_training_metadata(existing).get("init", "existing") if existing is not None else cfg.init)
        # every change to the shared model and to ComfyUI is on this one stack, undone in reverse on any exit
        with ExitStack() as undo:
            mp = train_host.borrow_for_training(self.model, self.dtype, undo, offloading=cfg.offloading,
                                                quantized_backward=cfg.quantized_backward)
            base = mp.model
            device = mp.load_device
            config = getattr(base, "model_config", None)
            self.base_model_name = type(config).__name__.lower() if config is not None else ""
            candidates = train_host.trainable_layers(base)
            network, p = self._network(candidates, existing, state)
            network.to(device)
            self.plan = p
            log.info("Train PaRa: %s", p.describe())
            optimizer = make_optimizer(cfg.optimizer, [layer.b for _, layer in network.items()], cfg.learning_rate)
            if state is not None:
                if not restore_optimizer(optimizer, network, state):
                    self.notes.append(f"saved optimizer state is {state.meta.get('optimizer')}, this run uses "
                                      f"{cfg.optimizer}: fresh optimizer state")
                    log.warning("Train PaRa: %s", self.notes[-1])
                self.loss_map["loss"] = state.losses
            ms = base.model_sampling
            space = train_host.sampling_space(ms) if cfg.loss_space == "prediction" else "x0"
            dtype = self.dtype if self.dtype is not None else train_host.native_compute_dtype(base)
            fwd = _Forward(base, device, train_host.host_sampling(ms), dict(mp.model_options.get("transformer_options", {})),
                           torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32), space, cfg.loss_function)
            data = _Prepared.of(self.train, fwd, cfg.seed, cfg.bucket_mode)
            held_out = _Prepared.of(self.validation, fwd, cfg.seed) if self.validation is not None else None
            sizes = [len(g.index) for g in data.groups]
            shapes = [tuple(g.latents.shape[1:]) for g in data.groups]

            def micro_loss(micro: int) -> torch.Tensor:
                """The loss of micro-batch `micro`: its images, captions, noise and σ drawn from (seed, micro)."""
                draw = draw_micro_batch(cfg.seed, micro, sizes, shapes, cfg.batch_size)
                return fwd.loss(data, draw.group, draw.picks, draw.noise, draw.timesteps)

            if cfg.bypass_mode:  # forward hooks on the layers' outputs; their forwards stay as they are
                undo.callback(network.attach_output_hooks(candidates, train_host.comfy_bias_of))
            else:
                undo.callback(network.attach(candidates, train_host.comfy_weight_of, train_host.comfy_bias_of))
            if cfg.gradient_checkpointing:
                undo.callback(enable_checkpointing(checkpoint_units(base.diffusion_model, cfg.checkpoint_depth), network))
            mp.pre_run()
            previewer = _previewer(base) if cfg.preview_every > 0 and self.vae is None else None
            pbar = comfy.utils.ProgressBar(cfg.steps, node_id=self.node_id)
            bar = undo.enter_context(tqdm(total=cfg.steps, desc="Training PaRa", disable=not comfy.utils.PROGRESS_BAR_ENABLED))
            schedule = (None if cfg.lr_schedule == "constant" and cfg.warmup_steps == 0
                        else (lambda step: cfg.lr_at(step, total)))
            # No host synchronisation per step: the bases' rank/finiteness margins stay on the device
            # (network.step(check=False)) and are validated every CHECK_EVERY steps, before a save and at the end.
            loop = TrainingLoop(optimizer, micro_loss, cfg.grad_accumulation_steps, losses=self.loss_map["loss"],
                                step_context=lambda: network.step(check=False),
                                check=comfy.model_management.throw_exception_if_processing_interrupted, learning_rate=schedule)
            if held_out is not None:
                points = validation_points([tuple(held_out.samples.images[i].shape[1:]) for i in range(len(held_out.samples.images))],
                                           VALIDATION_POINTS)
                self.loss_map.update(validation_loss=[], validation_step=[])

            def validate(done: int) -> None:
                self.loss_map["validation_step"].append(done)
                self.loss_map["validation_loss"].append(fwd.validation_loss(held_out, points, network, cfg.batch_size))

            if held_out is not None:
                validate(start_step)

            def after_step(done: int) -> None:
                self.done = done
                if done % CHECK_EVERY == 0:
                    network.check()
                preview = None
                if cfg.preview_every > 0 and (done % cfg.preview_every == 0 or done == total):
                    preview = self._preview(fwd, network, data, previewer)
                if held_out is not None and ((cfg.validation_every > 0 and done % cfg.validation_every == 0) or done == total):
                    validate(done)
                if cfg.save_every > 0 and (done % cfg.save_every == 0 or done == total):
                    loop.flush()  # the sidecar carries the exact loss history
                    network.check()
                    self._checkpoint(network, optimizer, p, done, space)
                bar.update(1)
                if loop.last_loss is not None:
                    bar.set_postfix(loss=f"{loop.last_loss:.4f}")
                self._report(done - start_step, cfg.steps, done, total, loop.last_loss, pbar, preview)

            loop.run(start_step, total, after_step)
            network.check()
            self.modes = network.describe_modes() + (" (bypass mode: forward hooks)" if cfg.bypass_mode else "")
            network.requires_grad_(False)
            para = network.to_para_model(self._metadata(p, total, space))
        self.space = space
        self.network = network
        self.total_steps = total
        return para

    def cancelled_text(self) -> str:
        """What the node says after Cancel: the step it stopped at and the checkpoint it kept, if any."""
        text = f"cancelled at step {getattr(self, 'done', 0)}/{getattr(self, 'total', self.cfg.steps)}"
        if self.saved:
            kept = os.path.relpath(self.saved[-1], folder_paths.get_output_directory()).replace(os.sep, "/")
            return f"{text}\nkept {kept}\n(continue it with existing_para)"
        why = "save_every is 0" if self.cfg.save_every <= 0 else f"save_every {self.cfg.save_every} not reached"
        return f"{text}\nno file kept ({why})"

    def _report(self, done_here, steps, done, total, loss, pbar, preview):
        pbar.update_absolute(done_here, steps, preview)
        try:
            from server import PromptServer
            srv = PromptServer.instance
            if self.node_id is not None and hasattr(srv, "send_progress_text"):
                text = f"step {done}/{total}" + (f"  loss {loss:.4f}" if loss is not None else "")
                srv.send_progress_text(text, self.node_id)
        except Exception:  # no server (tests, scripts): the tqdm bar and the log carry the loss
            pass

    def _checkpoint(self, network: ParaNetwork, optimizer, p: TargetPlan, done: int, space: str) -> None:
        """Write <prefix>_<step>_steps_<n>_.safetensors (Save LoRA's naming) and its sidecar, never overwriting."""
        para = network.to_para_model(self._metadata(p, done, space))
        os.makedirs(self.out_folder, exist_ok=True)
        path = _free_name(self.out_folder, self.out_name, done)
        save_with_state(para, path, network, optimizer, self.loss_map["loss"], done, self.cfg.seed)
        self.saved.append(path)
        log.info("Train PaRa: step %d saved %s", done, path)

    @torch.no_grad()
    def _preview(self, fwd: "_Forward", network: ParaNetwork, data: "_Prepared", previewer):
        """A sample from the first caption with fixed noise (Euler, cfg 1), decoded by the VAE or the latent previewer."""
        base, ms = fwd.base, fwd.base.model_sampling
        g = data.groups[0]
        cond = train_host.batch_conds([data.conds[0][data.samples.caption_of[g.index[0]]]])
        device = g.latents.device
        gen = torch.Generator().manual_seed(int(self.cfg.seed) % (2 ** 63))
        shape = (1,) + tuple(g.latents.shape[1:])
        sigmas = comfy.samplers.calculate_sigmas(ms, "simple", PREVIEW_STEPS).to(device)
        x = ms.noise_scaling(sigmas[:1], torch.randn(shape, generator=gen).to(device), torch.zeros(shape, device=device), True)
        with network.step(), _keeping_modes(network):
            for i in range(len(sigmas) - 1):
                comfy.model_management.throw_exception_if_processing_interrupted()
                s = sigmas[i:i + 1]
                with fwd.autocast:
                    den = base.apply_model(x, s, transformer_options=dict(fwd.t_opts, sigmas=s, cond_or_uncond=[0]), **cond).float()
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


def _training_dtypes() -> list[str]:
    """bf16, fp32, and 'none' where this ComfyUI's Train LoRA offers it."""
    return list(DTYPES) + (["none"] if train_host.host_offers("training_dtype_none") else [])


def _host_parity_inputs() -> list:
    """The inputs of core Train LoRA that this ComfyUI's trainer has (feature-detected from its schema), with
    the same names and meanings; absent on a host whose Train LoRA lacks them. Where PaRa differs, the tooltip
    says how."""
    inputs = []
    for name in ("checkpoint_depth",) + tuple(_HOST_SWITCHES):
        if not train_host.host_offers(name):
            continue
        if name == "checkpoint_depth":
            inputs.append(io.Int.Input(
                name, default=DEFAULT_CHECKPOINT_DEPTH, min=1, max=5, optional=True,
                tooltip="Depth of the units gradient checkpointing recomputes, counted as Train LoRA counts it: 1 is "
                        "the whole diffusion model, 2 its top-level blocks, 3 their children... PaRa's default is 2: at "
                        "1 backward recomputes and holds every activation at once, which saves no memory at the peak."))
        else:
            inputs.append(io.Boolean.Input(name, default=False, optional=True, tooltip=_HOST_SWITCHES[name]))
    return inputs


_HOST_SWITCHES = {  # core Train LoRA's on/off inputs Train PaRa follows (listed in this order): their tooltips
    "offloading": "Keep the weights that do not fit on the CPU: ComfyUI loads the model partially and casts each layer's "
                  "weight to the GPU when the layer runs (the same load as Train LoRA's offloading). PaRa's own tensors "
                  "(B, its Q) are small and stay on the GPU.",
    "bucket_mode": "Each LATENT input is one resolution bucket (ResolutionBucket's output): a batch comes from one bucket, "
                   "buckets drawn in proportion to their size, as in Train LoRA. Off, PaRa still never mixes resolutions "
                   "in a batch: it groups images of the same shape itself, wherever they come from.",
    "bypass_mode": "Train through forward hooks on the targeted layers' outputs (y - QQᵀ(y - b)) instead of replacing "
                   "their forwards: each layer's own forward, weight and flags stay untouched (quantized or offloaded "
                   "weights are used as they are). PaRa never writes weights while training in either mode; bypass "
                   "always projects outputs (projection is ignored). The result is the same PaRa.",
    "quantized_backward": "With training_dtype none on a quantized model: ComfyUI's quantized layers run their backward "
                          "as quantized (fp8) matmuls, as in Train LoRA. Only the activation gradients that reach PaRa's "
                          "layers pass through them; B is trained in float32 either way.",
}


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
                io.Combo.Input("training_dtype", options=_training_dtypes(), default="bf16",
                               tooltip="Compute dtype of the model during training (autocast). B and its QR stay float32."
                                       + (" none: the model's own compute dtype, nothing overridden (fp16 and bf16 models "
                                          "compute in their dtype, fp8/quantized ones in bf16, as Train LoRA). Unlike "
                                          "Train LoRA no gradient scaler is used for fp16: B, its gradient and the "
                                          "optimizer stay float32." if train_host.host_offers("training_dtype_none") else "")),
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
                io.Combo.Input("existing_para", options=[NONE] + paths.para_files(), default=NONE,
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
                io.String.Input("filename_prefix", default=DEFAULT_PREFIX, optional=True,
                                tooltip="Where save_every files go, relative to the output folder (e.g. para/my_subject): "
                                        "plain names, at most 200 bytes. Checked before the prompt runs."),
                io.Combo.Input("init", options=list(INITS), default=DEFAULT_INIT, optional=True,
                               tooltip="How B starts. small_sv: the directions of each weight with the smallest singular "
                                       "values (the model barely changes at step 0). random: random directions. top_sv: "
                                       "the dominant directions (for experiments)."),
                io.Combo.Input("projection", options=list(MODES), default="auto", optional=True,
                               tooltip="Where PaRa is applied while training (the results are the same up to rounding). "
                                       "auto: each layer shape is timed both ways at the first step and the faster is kept "
                                       "(the node reports the split). output / weight: force one (bit-identical reruns "
                                       "across processes)."),
            ] + _host_parity_inputs() + [
                io.Combo.Input("lr_schedule", options=list(LR_SCHEDULES), default="constant", optional=True,
                               tooltip="How the learning rate changes over the steps (after warmup_steps): constant; "
                                       "cosine: down to 0 along half a cosine; linear: down to 0 in a straight line. "
                                       "Counted over all steps, existing_para's included."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000, optional=True,
                             tooltip="The first N steps raise the learning rate linearly, step k (from 0) using "
                                     "learning_rate·(k+1)/N. 0: no warm-up."),
                io.Latent.Input("validation_latents", optional=True,
                                tooltip="Optional held-out images (not trained on): their loss at fixed noise and "
                                        "timesteps is measured at the start, every validation_every steps and at the end, "
                                        "plotted beside the training loss on this node and added to loss_map."),
                io.Conditioning.Input("validation_positive", optional=True,
                                      tooltip="Captions of validation_latents: one for all or one per image. Without it the "
                                              "training caption is used (when there is one for all images)."),
                io.Float.Input("validation_split", default=0.0, min=0.0, max=0.5, step=0.01, optional=True,
                               tooltip="Hold out this fraction of the training images (chosen by seed, at least one) and "
                                       "measure the validation loss on them instead of training on them. 0: none."),
                io.Int.Input("validation_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Measure the validation loss every N steps (always at the start and the end when "
                                     "there are validation images). Each measurement is one no-gradient forward per "
                                     "4 fixed points per held-out image."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained PaRa applied as weight patches."),
                Para.Output(display_name="para", tooltip="The trained PaRa: connect Save PaRa, Merge PaRa or Apply PaRa."),
                LossMap.Output(display_name="loss_map", tooltip="Loss per step: connect Plot Loss Graph."),
                io.Int.Output(display_name="steps", tooltip="Total training steps (including those of existing_para)."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None):
        """Before any node of the prompt runs: the save_every prefix, by the pack's one rule."""
        return paths.validate_prefix("Train PaRa", filename_prefix)

    @classmethod
    def execute(cls, model, latents, positive, batch_size, grad_accumulation_steps, steps, learning_rate, rank,
                optimizer, loss_function, seed, training_dtype, gradient_checkpointing, targets, rank_boundary,
                loss_space, include=None, exclude=None, existing_para=None, save_every=None, preview_every=None,
                vae=None, filename_prefix=None, init=None, projection=None, checkpoint_depth=None, offloading=None,
                bucket_mode=None, bypass_mode=None, quantized_backward=None, lr_schedule=None, warmup_steps=None,
                validation_latents=None, validation_positive=None, validation_split=None,
                validation_every=None) -> io.NodeOutput:
        cfg = TrainConfig(
            steps=_first(steps), learning_rate=_first(learning_rate), rank=_first(rank), seed=_first(seed),
            batch_size=_first(batch_size), grad_accumulation_steps=_first(grad_accumulation_steps),
            optimizer=_first(optimizer), loss_function=_first(loss_function), training_dtype=_first(training_dtype),
            gradient_checkpointing=_first(gradient_checkpointing), targets=_first(targets),
            include=_first(include, "") or "", exclude=_first(exclude, "") or "", rank_boundary=_first(rank_boundary),
            loss_space=_first(loss_space), existing_para=_first(existing_para, NONE) or NONE,
            save_every=_first(save_every, 0) or 0, preview_every=_first(preview_every, 0) or 0,
            filename_prefix=DEFAULT_PREFIX if _first(filename_prefix) is None else _first(filename_prefix),
            init=_first(init, DEFAULT_INIT) or DEFAULT_INIT, projection=_first(projection, "auto") or "auto",
            checkpoint_depth=_first(checkpoint_depth, DEFAULT_CHECKPOINT_DEPTH) or DEFAULT_CHECKPOINT_DEPTH,
            offloading=bool(_first(offloading, False)), bucket_mode=bool(_first(bucket_mode, False)),
            bypass_mode=bool(_first(bypass_mode, False)), quantized_backward=bool(_first(quantized_backward, False)),
            lr_schedule=_first(lr_schedule, "constant") or "constant", warmup_steps=_first(warmup_steps, 0) or 0,
            validation_split=_first(validation_split, 0.0) or 0.0, validation_every=_first(validation_every, 0) or 0)
        hidden = getattr(cls, "hidden", None)
        node_id = getattr(hidden, "unique_id", None) if hidden is not None else None
        # ComfyUI runs the valid outputs of a prompt whose Save PaRa failed validation: do not train for nothing
        bad_save = paths.bad_save_downstream(getattr(hidden, "prompt", None), node_id)
        if bad_save:
            raise ValueError(f"Train PaRa: not started: {bad_save}")
        trainer = Trainer(_first(model), latents, positive, cfg, vae=_first(vae), node_id=node_id,
                          validation_latents=validation_latents, validation_positive=validation_positive)
        try:
            para = trainer.run()
        except comfy.model_management.InterruptProcessingException:
            text = trainer.cancelled_text()  # replaces "step 5/200 loss ..." on the node
            log.info("Train PaRa: %s", text.replace("\n", "; "))
            ui_text.report(cls, text)
            raise
        out_model, _clip, text = apply_para(para, _first(model), None, 1.0, 1.0)
        losses = trainer.loss_map["loss"]
        # the key facts first: the node's text box shows about two lines before it scrolls
        lines = [f"steps {trainer.total_steps}, loss {losses[-1]:.4f} ({trainer.space} space); "
                 f"{para.num_bytes() / 1024:.1f} KiB as fp16", trainer.plan.describe(), trainer.modes]
        if "validation_loss" in trainer.loss_map:
            v = trainer.loss_map["validation_loss"]
            lines.append(f"validation loss {v[0]:.4f} at step {trainer.loss_map['validation_step'][0]} -> {v[-1]:.4f} "
                         f"at step {trainer.loss_map['validation_step'][-1]} ({len(trainer.validation.images)} held-out images)")
        summary = "\n".join(lines + trainer.notes)
        if trainer.saved:
            summary += f"\nsaved {len(trainer.saved)} file(s), last {os.path.relpath(trainer.saved[-1], folder_paths.get_output_directory())}"
        ui_out: dict = ui_text.report(cls, summary).as_dict()  # on the node and in the history
        images = []
        if trainer.previews:
            images += ui.PreviewImage(torch.stack(trainer.previews), cls=cls).as_dict()["images"]
        if "validation_loss" in trainer.loss_map:  # the loss plot, training beside validation
            images += ui.PreviewImage(loss_plot(trainer.loss_map), cls=cls).as_dict()["images"]
        if images:
            ui_out["images"] = images
        return io.NodeOutput(out_model, para, trainer.loss_map, trainer.total_steps, ui=ui_out)


NODES = [PaRaTrainer]

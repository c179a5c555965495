"""PaRa as a network module for kohya sd-scripts: ``--network_module para_core.kohya``.

sd-scripts imports this module by name and drives it through `create_network` / `create_network_from_weights`
and the network's `apply_to`, `prepare_optimizer_params`, ... (its train_network.py). This file is only that
glue, as LyCORIS keeps `lycoris/kohya.py` apart from its algorithms: the math (B, Q = orth(B), the projected
forward, the small_sv init), the layer presets and the file writer are para_core's (`layer`, `targets`,
`format`, `projection`). It imports nothing from sd-scripts.

* ``network_dim`` is the rank r; ``network_alpha`` has no meaning for PaRa (Q is orthonormal) and is ignored.
* ``--network_args``: ``targets`` (ExCA, self_attention, attention, all), ``rank_boundary`` (γ), ``init``
  (small_sv, random, top_sv), ``projection`` (auto, output, weight), ``include`` / ``exclude`` (regexes on the
  diffusion model's module paths, comma-separated), ``seed`` (of the init).
  Defaults are the pack's (ExCA, γ = 1/40, small_sv, auto).
* Module names are sd-scripts' (``lora_unet_<path with _>``, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``), which
  ComfyUI's LoRA key map, and so Load PaRa, already understands. The presets are applied to the module paths of
  the model sd-scripts built (SD1.x: diffusers names, SDXL: input_blocks..., Flux, SD3: their own names;
  `targets.detect_layout`). Text-encoder layers are CLIP's attention and MLP linears (those networks.lora trains),
  all of them for ExCA/all, the attention ones for self_attention/attention; they are trained only where sd-scripts
  trains the text encoder (not with ``--network_train_unet_only``); T5 is never trained.
* `save_weights` writes the pack's PaRa file (``<name>.para_q`` per module plus sd-scripts' ``ss_*`` metadata);
  ``--network_weights`` continues from one (B starts at the stored Q); `merge_to` applies it with the same
  `apply_stages_` the pack patches with, so sd-scripts' merged weights equal what Load PaRa patches.

Q is computed per layer call (one small QR): sd-scripts calls the model, not the network, so there is no step
boundary to cache Q at that would stay right for previews and sample images after an optimizer step.
"""
from __future__ import annotations

import json
import logging
import os

import torch
from torch import nn

from . import targets as T
from .errors import ParaFormatError, ParaShapeError
from .format import STORAGE_DTYPES, ParaModel
from .layer import DEFAULT_INIT, INITS, MODES, ParaLayer, ParaNetwork
from .projection import apply_stages_

log = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet"
TE_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")  # as networks.lora
TE_ATTENTION_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2")
# kohya passes these to every network module (LyCORIS options, dropout); PaRa has no use for them
_IGNORED_ARGS = {"dropout", "neuron_dropout", "rank_dropout", "module_dropout", "conv_dim", "conv_alpha", "algo"}
_OWN_ARGS = {"targets", "rank_boundary", "init", "projection", "include", "exclude", "seed"}


def _roots(text_encoder, unet) -> list[tuple[str, nn.Module, bool]]:
    """(name prefix, root module, is text encoder) as networks.lora names them: one text encoder -> lora_te,
    several (SDXL, SD3, Flux) -> lora_te1, lora_te2, ..."""
    tes = text_encoder if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    roots = [(UNET_PREFIX, unet, False)] if unet is not None else []
    for i, te in enumerate(tes):
        if te is not None:
            roots.append(("lora_te" if len(tes) == 1 else f"lora_te{i + 1}", te, True))
    return roots


def _candidates(root: nn.Module, is_te: bool, attention_only: bool) -> dict[str, nn.Module]:
    """{module path: module} PaRa can target: every Linear/Conv of the diffusion model; CLIP's attention and MLP
    linears of a text encoder (a T5 has none)."""
    if not is_te:
        return {n: m for n, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    classes = TE_ATTENTION_CLASSES if attention_only else TE_CLASSES
    out = {}
    for n, m in root.named_modules():
        if type(m).__name__ in classes:
            for cn, c in m.named_modules():
                if isinstance(c, nn.Linear):
                    out[f"{n}.{cn}"] = c
    return out


def kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}.{path}".replace(".", "_")


def module_map(text_encoder, unet) -> dict[str, nn.Module]:
    """{sd-scripts module name: module} over every Linear/Conv of the diffusion model and text encoders."""
    out = {}
    for prefix, root, is_te in _roots(text_encoder, unet):
        mods = _candidates(root, is_te, False)
        out.update({kohya_name(prefix, p): m for p, m in mods.items()})
    return out


def _parse_args(kwargs: dict) -> dict:
    unknown = sorted(set(kwargs) - _OWN_ARGS - _IGNORED_ARGS)
    if unknown:
        raise ValueError(f"para_core.kohya: unknown network_args {unknown}; known: {sorted(_OWN_ARGS)}")
    for k in sorted(set(kwargs) & _IGNORED_ARGS):
        if kwargs[k] not in (None, "None", 0, 0.0, "0"):
            log.warning("para_core.kohya: network arg %s=%s has no meaning for PaRa and is ignored", k, kwargs[k])
    preset = kwargs.get("targets", T.DEFAULT_PRESET)
    if preset not in T.PRESETS:
        raise ValueError(f"para_core.kohya: targets={preset} is not one of {', '.join(T.PRESETS)}")
    init = kwargs.get("init", DEFAULT_INIT)
    if init not in INITS:
        raise ValueError(f"para_core.kohya: init={init} is not one of {', '.join(INITS)}")
    mode = kwargs.get("projection", "auto")
    if mode not in MODES:
        raise ValueError(f"para_core.kohya: projection={mode} is not one of {', '.join(MODES)}")
    try:
        gamma = float(kwargs.get("rank_boundary", T.DEFAULT_GAMMA))
        seed = int(kwargs.get("seed", 0))
    except ValueError as e:
        raise ValueError(f"para_core.kohya: rank_boundary must be a number and seed an integer ({e})") from None
    return {"targets": preset, "rank_boundary": gamma, "init": init, "projection": mode, "seed": seed,
            "include": (kwargs.get("include") or "").strip(), "exclude": (kwargs.get("exclude") or "").strip()}


class ParaKohyaNetwork(nn.Module):
    """The network object sd-scripts trains: every ParaLayer (B) of the UNet/DiT and text encoders, by sd-scripts
    module name. Its parameters are the B's; `apply_to` hooks the selected modules' forwards (ParaNetwork.attach)."""

    def __init__(self, text_encoder, unet, rank: int, options: dict, multiplier: float = 1.0,
                 ranks: dict[str, int] | None = None, bases: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.options, self.multiplier, self.rank = options, float(multiplier), int(rank)
        self.train_t5xxl = False  # flux/sd3 trainers ask
        self._modules_by_name: dict[str, nn.Module] = {}
        self._is_te: dict[str, bool] = {}
        chosen: dict[str, int] = {}
        attention_only = options["targets"] in ("self_attention", "attention")
        for prefix, root, is_te in _roots(text_encoder, unet):
            mods = _candidates(root, is_te, attention_only and ranks is None)
            if ranks is not None:  # from a file: exactly its modules
                names = {kohya_name(prefix, p): m for p, m in mods.items()}
                picked = {n: ranks[n] for n in names if n in ranks}
                self._modules_by_name.update({n: names[n] for n in picked})
            elif is_te:
                picked = {kohya_name(prefix, p): T.effective_rank(rank, m.weight.shape[0], options["rank_boundary"])
                          for p, m in mods.items()}
                self._modules_by_name.update({kohya_name(prefix, p): m for p, m in mods.items()})
            else:
                plan = T.plan({p: m.weight.shape[0] for p, m in mods.items()}, options["targets"], rank,
                              options["rank_boundary"], options["include"] or None, options["exclude"] or None)
                log.info("PaRa for %s: %s", prefix, plan.describe())
                picked = {kohya_name(prefix, p): r for p, r in plan.ranks.items()}
                self._modules_by_name.update({kohya_name(prefix, p): mods[p] for p in plan.ranks})
            chosen.update(picked)
            self._is_te.update(dict.fromkeys(picked, is_te))
        if ranks is not None:
            missing = sorted(set(ranks) - set(chosen))
            if missing:
                raise ParaShapeError(f"{len(missing)} modules of the PaRa file are not in this model (first: {missing[0]})")
        if bases is not None:
            layers = {}
            for n in sorted(chosen):
                w = self._modules_by_name[n].weight
                if bases[n].shape[0] != w.shape[0]:
                    raise ParaShapeError(f"{n}: basis {tuple(bases[n].shape)} does not fit weight {tuple(w.shape)}")
                layers[n] = ParaLayer(bases[n])
            self.para = ParaNetwork(layers, options["projection"])
        else:
            weights = {n: self._modules_by_name[n].weight for n in chosen}
            self.para = ParaNetwork.from_weights(weights, chosen, options["init"], options["seed"], options["projection"])
        self._detach = None
        log.info("PaRa: %d layers (%d text encoder), rank %d, %s", len(chosen), sum(self._is_te.values()), rank,
                 {k: v for k, v in options.items() if k not in ("include", "exclude") or v})

    # ---- what sd-scripts calls ------------------------------------------------------------------
    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Keep the layers sd-scripts trains (drops the text encoder's when it is not trained) and hook them."""
        keep = [n for n in self.para.names if (apply_text_encoder if self._is_te[n] else apply_unet)]
        if len(keep) != len(self.para.names):
            self.para = ParaNetwork({n: self.para.layer(n) for n in keep}, self.para.mode)
            log.info("PaRa: training %d layers (text encoder: %s, diffusion model: %s)", len(keep),
                     apply_text_encoder, apply_unet)
        self._attach()

    def _attach(self) -> None:
        if self._detach is None:
            self._detach = self.para.attach(self._modules_by_name)

    def _remove(self) -> None:
        if self._detach is not None:
            self._detach()
            self._detach = None

    def set_multiplier(self, multiplier: float) -> None:
        """0 turns PaRa off (sd-scripts' prior predictions), 1 on. Other strengths exist for merging and in ComfyUI
        (W0 - s·QQᵀW0), not for training."""
        m = float(multiplier)
        if m not in (0.0, 1.0):
            raise ValueError(f"para_core.kohya: multiplier {m}: PaRa trains at 1 (0 = off); use merge_to or Load PaRa's "
                             "strength for other strengths")
        self.multiplier = m
        self._attach() if m else self._remove()

    def is_mergeable(self) -> bool:
        return True

    def prepare_network(self, args) -> None:
        pass

    def enable_gradient_checkpointing(self) -> None:
        pass  # Q is recomputed with each layer call, so a checkpointed block recomputes it too

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.train()

    def get_trainable_params(self):
        return self.parameters()

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr=None):
        """One parameter group for the text encoders' B, one for the diffusion model's, as networks.lora."""
        groups, descriptions = [], []
        for is_te, lr, what in ((True, text_encoder_lr, "textencoder"), (False, unet_lr, "unet")):
            params = [self.para.layer(n).b for n in self.para.names if self._is_te[n] == is_te]
            if not params:
                continue
            group = {"params": params}
            lr = lr if lr is not None else default_lr
            if lr is not None:
                group["lr"] = float(lr)
            groups.append(group)
            descriptions.append(what)
        return groups, descriptions

    def load_weights(self, file: str) -> str:
        """Continue from a PaRa file: B = its Q, for every module this network trains."""
        para = ParaModel.load(file)
        own = set(self.para.names)
        extra = sorted(set(para.stages) - own)
        if extra:
            raise ParaShapeError(f"{file}: module {extra[0]} is not trained by this network ({len(extra)} such)")
        with torch.no_grad():
            for n, chain in para.stages.items():
                if len(chain) != 1:
                    raise ParaFormatError(f"{file}: {n} has {len(chain)} stages; only a one-stage file can be trained on")
                b = self.para.layer(n).b
                if tuple(chain[0].shape) != tuple(b.shape):
                    raise ParaShapeError(f"{file}: {n}.para_q has shape {tuple(chain[0].shape)}, this network's B is "
                                         f"{tuple(b.shape)} (same rank and rank_boundary?)")
                b.copy_(chain[0])
        return f"PaRa: {len(para.stages)} of {len(own)} layers continue from {os.path.basename(file)}"

    def to_para_model(self, metadata: dict | None = None, dtype: torch.dtype | None = None) -> ParaModel:
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        o = self.options
        meta["targets"] = T.TargetPlan(o["targets"], "", include=o["include"], exclude=o["exclude"]).targets_string()
        meta["training"] = json.dumps({"trainer": "kohya sd-scripts", "network_module": __name__, "rank": self.rank,
                                       "rank_boundary": o["rank_boundary"], "init": o["init"],
                                       "projection": o["projection"], "seed": o["seed"]}, sort_keys=True)
        if dtype not in STORAGE_DTYPES.values():
            dtype = torch.float16  # the pack's default storage
        return self.para.to_para_model(meta, dtype=dtype)

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict | None) -> None:
        """The pack's PaRa file (atomic write), with sd-scripts' metadata kept beside the pack's."""
        if not file.endswith(".safetensors"):
            raise ValueError(f"para_core.kohya: {file}: PaRa files are .safetensors only (--save_model_as safetensors)")
        self.to_para_model(metadata, dtype).save(file, force=True)

    def merge_to(self, text_encoder, unet, weights_sd, dtype=None, device=None) -> None:
        """W <- W - s·QQᵀW on the model's weights from a PaRa file (`create_network_from_weights`), each module's
        stages in order, with the same function and the same Q Load PaRa patches with."""
        para = weights_sd if isinstance(weights_sd, ParaModel) else ParaModel(weights_sd, source="weights_sd")
        modules = module_map(text_encoder, unet)
        missing = sorted(set(para.stages) - set(modules))
        if missing:
            raise ParaShapeError(f"{para.source}: module {missing[0]} is not in this model ({len(missing)} such)")
        with torch.no_grad():
            for n, chain in para.stages.items():
                w = modules[n].weight
                if device is not None:
                    w.data = w.data.to(device)
                apply_stages_(w.data, chain, strength=self.multiplier, what=n)
                if dtype is not None:
                    w.data = w.data.to(dtype)
        log.info("PaRa: merged %d layers (strength %g)", len(para.stages), self.multiplier)


def create_network(multiplier: float, network_dim: int | None, network_alpha, vae, text_encoder, unet,
                   neuron_dropout=None, **kwargs) -> ParaKohyaNetwork:
    """sd-scripts' entry point for a new network. network_dim is the rank (default 4, as sd-scripts)."""
    if network_alpha not in (None, 1, 1.0):
        log.info("para_core.kohya: network_alpha=%s is ignored (PaRa's Q is orthonormal: no scale)", network_alpha)
    options = _parse_args({**kwargs, "neuron_dropout": neuron_dropout})
    return ParaKohyaNetwork(text_encoder, unet, int(network_dim or 4), options, multiplier)


def create_network_from_weights(multiplier: float, file: str | None, vae, text_encoder, unet, weights_sd=None,
                                for_inference: bool = False, **kwargs):
    """sd-scripts' entry point for a saved file: (network with B = the stored Q, the ParaModel for merge_to)."""
    para = weights_sd if isinstance(weights_sd, ParaModel) else (
        ParaModel(weights_sd, source="weights_sd") if weights_sd is not None else ParaModel.load(file))
    if para.max_stages() != 1 and not for_inference:
        raise ParaFormatError(f"{para.source}: a {para.max_stages()}-stage (merged) file can be merged, not trained on")
    options = _parse_args(kwargs)
    training = para.metadata.get("training")
    if training:
        try:
            saved = json.loads(training)
            for k in ("rank_boundary", "init", "projection", "seed"):
                if k in saved and k not in kwargs:
                    options[k] = saved[k]
        except (ValueError, TypeError):
            pass
    ranks = {n: chain[0].shape[1] for n, chain in para.stages.items()}
    bases = {n: chain[0] for n, chain in para.stages.items()}
    rank = max(ranks.values(), default=1)
    try:
        net = ParaKohyaNetwork(text_encoder, unet, rank, options, multiplier, ranks=ranks, bases=bases)
    except ParaShapeError as e:
        raise ParaShapeError(f"{para.source}: {e}") from None
    return net, para


__all__ = ["create_network", "create_network_from_weights", "ParaKohyaNetwork", "module_map"]

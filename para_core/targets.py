"""Which layers PaRa trains: presets per model family over ComfyUI-native module names, include/exclude
patterns, and the rank boundary γ.

Names are ComfyUI-native (``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q``); the
``diffusion_model.`` prefix is optional. Candidates are the modules the core LoRA trainer would train:
every module with a ≥2-D weight (linear, conv, ...). This module is pure: it takes a family key. The nodes
decide the key from ComfyUI's model classes with :func:`family_for_model` (the ModelPatcher's
``model.model_config`` class, e.g. ``Flux``, and the diffusion model's class as a fallback), never from
guessing at names; a model whose classes are unknown gets the layout found from its names
(:func:`detect_layout`, which ends in the generic rules), and :meth:`TargetPlan.describe` says so and lists
what was selected.

Presets (what each family counts as its cross-attention and time-embedding analogue, with the reason, is
the family record in ``para_core/families.py``):

* ``ExCA`` - the paper's default, "all layers except cross-attention and time embedding". Excluded per
  family: the *cross-attention analogue* (where the text conditioning enters) and the *time-embedding
  analogue* (timestep / guidance / pooled-vector embedders and every modulation they drive).
* ``self_attention`` - the image-token attention projections (in joint-attention blocks that mix text and
  image tokens, the shared projections).
* ``attention`` - ``self_attention`` plus the attention projections of the cross-attention analogue.
* ``all`` - every candidate.

family key     model classes                    cross-attention analogue (ExCA drops)      time-embedding analogue (ExCA drops)
============== ================================ ========================================== ===============================================
unet           SD1.x, SD2.x, SDXL (+refiner,    ``attn2`` (true cross-attention)           ``time_embed``, ``label_emb`` (SDXL pooled+size
               SSD-1B, Vega, KOALA, SVD, ...)                                              vector), resblocks' ``emb_layers``
unet_diffusers the same UNet under diffusers       ``attn2``                                  ``time_embedding``, ``add_embedding``,
               names (kohya sd-scripts' SD1.x)                                             resnets' ``time_emb_proj``
mmdit          SD3 / SD3.5                      ``context_block`` (text stream: its attn   ``t_embedder``, ``y_embedder``, every
                                                qkv/proj and mlp), ``context_embedder``    ``adaLN_modulation``
flux           Flux.1 dev/schnell/fill, Flux.2, ``txt_attn``, ``txt_mlp`` (text stream of  ``time_in``, ``vector_in``, ``guidance_in``,
               Chroma, HunyuanVideo,            the double blocks), ``txt_in`` (text       ``img_mod``/``txt_mod``/single ``modulation``/
               HunyuanImage 2.1                 projection; Hunyuan: the whole token       Flux.2 shared modulations, ``adaLN_modulation``,
                                                refiner ``txt_in.*``)                      Chroma's ``distilled_guidance_layer``
auraflow       AuraFlow                         ``cond_seq_linear`` (text projection),     ``t_embedder``, ``modC``/``modX``/``modCX``/
                                                double layers' context stream ``attn.w1q/  ``modF`` (modulations)
                                                k/v/o`` and ``mlpC``
cosmos_predict2 Cosmos Predict2                 ``cross_attn``                             ``t_embedder``, every ``adaln_modulation_*``
cascade        Stable Cascade C / B             ``clip_txt_mapper``, ``clip_txt_pooled_    TimestepBlocks' ``mapper``, ``mapper_sca``,
                                                mapper``, ``clip_img_mapper``, the         ``mapper_crp`` (r / sca / crp embeddings)
                                                AttnBlocks' ``kv_mapper`` (text -> keys)
pixart         PixArt-α / Σ                     ``cross_attn``, ``y_embedder`` (caption    ``t_embedder``, ``t_block`` (adaLN from t),
                                                projection)                                ``ar_embedder``/``csize_embedder``
lumina2        Lumina 2, Z-Image                ``context_refiner.*`` (text-only refiner   ``t_embedder``, every ``adaLN_modulation``,
                                                blocks), ``cap_embedder``                  ``clip_text_pooled_proj``/``time_text_embed``
qwen_image     Qwen-Image                       ``txt_in``, ``txt_mlp``, ``attn.add_q/k/v_ ``time_text_embed``, ``img_mod``/``txt_mod``,
                                                proj`` and ``attn.to_add_out`` (text       ``norm_out`` (AdaLN-continuous)
                                                stream)
hidream        HiDream-I1                       ``caption_projection``, the text stream    ``t_embedder``, ``p_embedder``, every
                                                ``attn1.to_q/k/v/out_t`` and ``ff_t``      ``adaLN_modulation``
wan            Wan 2.1 / 2.2 (all variants)     ``cross_attn``, ``text_embedding``,        ``time_embedding``, ``time_projection``
                                                ``img_emb`` (CLIP image, i2v)
ltxv           LTX-Video (LTXV, LTXAV)          ``attn2``, ``caption_projection``          ``adaln_single`` (timestep embedding and the
                                                                                           6-way modulation it drives)
generic        anything else                    ``attn2``/``cross_attn``/``cross_attention`` ``*_embed``/``*_embedder``/``time_*``/
                                                                                           ``*modulation*``
============== ================================ ========================================== ===============================================

Why: the paper keeps the layers that generate the image and drops the two places through which the
prompt and the noise level enter, so that the removed subspace shapes *what* is drawn but not how the
text is read or how denoising is scheduled. In joint-attention models (MMDiT, Flux, AuraFlow, Qwen-Image,
HiDream) there is no separate cross-attention; the text enters through its own stream (separate
projections and MLPs for the text tokens), which is therefore the analogue. Projections that both token
kinds pass through (Flux/Hunyuan single blocks ``linear1``/``linear2``, AuraFlow single layers, Lumina's
main ``layers``, Cascade's ``to_k``/``to_v`` over [image; text]) generate image tokens too and are kept,
as ``attn1`` is kept in a UNet. Every modulation is a function of the timestep (and of pooled text or
guidance), i.e. the analogue of the UNet's ``emb_layers``.

``self_attention`` per family: unet ``attn1``; mmdit ``x_block.attn``/``attn2``; flux ``img_attn`` and
the single blocks' ``linear1``/``linear2``; auraflow ``attn.w2*`` of double layers and ``attn.w1*`` of
single layers; cosmos/wan ``self_attn``; cascade the AttnBlocks' ``attention.attn``; pixart ``attn``;
lumina2 the ``attention`` of ``layers`` and ``noise_refiner``; qwen_image ``attn.to_q/k/v/out``; hidream
``attn1.to_q/k/v/out``; ltxv ``attn1``. ``attention`` adds the attention part of the cross-attention
analogue (unet/ltxv ``attn2``, mmdit ``context_block.attn``, flux ``txt_attn`` and Hunyuan's refiner
``self_attn``, auraflow ``attn.w1*`` of double layers, cascade ``kv_mapper``, pixart/cosmos/wan
``cross_attn``, lumina2 ``context_refiner.*.attention``, qwen ``add_*_proj``/``to_add_out``, hidream
``*_t`` projections).

=======
Measured caveat (benchmarks/bench_train.py --init-study, tiny SD1.5): ExCA as the paper words it includes
the UNet's output conv ``out.2``, whose 4 output channels get rank max(1, floor(γ·4)) = 1, so a quarter of
the predicted latent space is removed at every pixel; excluding it (``exclude="^diffusion_model[.]out[.]"``)
halved the loss reached in 60 steps (0.20 vs 0.38). The preset keeps the paper's wording; the Train PaRa
tooltip suggests the pattern.

Rank boundary γ (paper: ≈1/40 keeps training stable): a layer with output dim `out` gets rank
min(rank, max(1, floor(γ·out))), and never more than out - 1 (rank = out would remove every output
direction and leave only the bias); γ = 0 turns the boundary off.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .families import BY_CONFIG_CLASS, BY_MODEL_CLASS
from .families import FAMILIES as _FAMILY_RECORDS

PRESETS = ("ExCA", "self_attention", "attention", "all")
DEFAULT_PRESET = "ExCA"
DEFAULT_GAMMA = 0.025
PREFIX = "diffusion_model."

FAMILIES = tuple(_FAMILY_RECORDS)


def family_for_model(config_class: str | None, diffusion_model_class: str | None = None) -> str | None:
    """The family key for ComfyUI's model classes (class names, e.g. ``"Flux"``, ``"WanModel"``), or None
    when neither is known (the caller then falls back to the layout found from module names)."""
    return BY_CONFIG_CLASS.get(config_class or "") or BY_MODEL_CLASS.get(diffusion_model_class or "")


def strip_prefix(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def detect_layout(names: Iterable[str]) -> str:
    """The family whose ``layout_prefixes`` the module names show (unet, mmdit, flux), else 'generic': from
    the names alone, for models whose ComfyUI classes :func:`family_for_model` does not know."""
    names = [strip_prefix(n) for n in names]
    for key, fam in _FAMILY_RECORDS.items():
        if fam.layout_prefixes and any(n.startswith(fam.layout_prefixes) for n in names):
            return key
        if fam.layout_pattern and any(re.match(fam.layout_pattern, n) for n in names):
            return key
    return "generic"


def _match(pattern: str | None, name: str) -> bool:
    return bool(pattern) and re.search(pattern, name) is not None


def preset_selects(preset: str, name: str, layout: str) -> bool:
    """Whether `preset` selects module `name` (prefix optional) of a model with this layout."""
    if preset not in PRESETS:
        raise ValueError(f"unknown target preset '{preset}', expected one of {', '.join(PRESETS)}")
    fam = _FAMILY_RECORDS[layout]
    n = strip_prefix(name)
    if preset == "all":
        return True
    if preset == "ExCA":
        return not (_match(fam.cross, n) or _match(fam.embed, n))
    is_self = _match(fam.self_attention, n) and not _match(fam.embed, n)
    if preset == "self_attention":
        return is_self
    return is_self or (_match(fam.cross_attention or fam.cross, n) and not _match(fam.embed, n))


def _compile(patterns: str | Iterable[str] | None, what: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [p for p in re.split(r"[\n,]", patterns)]
    out = []
    for p in patterns:
        p = p.strip()
        if not p:
            continue
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{what} pattern '{p}' is not a valid regular expression: {e}") from None
    return out


def select(names: Iterable[str], preset: str = DEFAULT_PRESET, include: str | Iterable[str] | None = None,
           exclude: str | Iterable[str] | None = None, layout: str | None = None) -> list[str]:
    """The candidate names a preset selects, plus names matching an include pattern, minus names matching
    an exclude pattern (regexes searched in the full name; comma- or newline-separated in a string).
    Order follows `names`."""
    names = list(names)
    layout = layout or detect_layout(names)
    inc = _compile(include, "include")
    exc = _compile(exclude, "exclude")
    out = []
    for n in names:
        chosen = preset_selects(preset, n, layout) or any(p.search(n) for p in inc)
        if chosen and not any(p.search(n) for p in exc):
            out.append(n)
    return out


def effective_rank(rank: int, out: int, gamma: float = DEFAULT_GAMMA) -> int:
    """min(rank, max(1, floor(γ·out))) (γ > 0); γ <= 0: min(rank, out - 1). Never above out - 1 (for out > 1):
    rank = out would remove the whole output space - the layer's output becomes its bias, whatever B is,
    so nothing can be learned there (with γ = 0 the 4-channel UNet output conv hit this and froze the model)."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    r = min(rank, max(1, out - 1))
    if gamma > 0:
        r = min(r, max(1, int(gamma * out + 1e-9)))
    return r


@dataclass
class TargetPlan:
    """The selected layers and their effective ranks."""
    preset: str
    layout: str
    ranks: dict[str, int] = field(default_factory=dict)
    out_dims: dict[str, int] = field(default_factory=dict)
    requested_rank: int = 0
    gamma: float = DEFAULT_GAMMA
    include: str = ""
    exclude: str = ""
    from_names: bool = False  # set by a caller whose model's classes named no family (layout found from names)

    @property
    def names(self) -> list[str]:
        return list(self.ranks)

    def capped(self) -> int:
        """How many layers the rank boundary lowered below the requested rank."""
        return sum(1 for r in self.ranks.values() if r < self.requested_rank)

    def describe(self) -> str:
        """Layer count, family, rank histogram, how many were capped by γ. For a model whose family is not
        known, a second line says so and lists the selected layers (block indices collapsed to N)."""
        hist = Counter(self.ranks.values())
        ranks = ", ".join(f"r={r}: {c}" for r, c in sorted(hist.items(), reverse=True))
        capped = self.capped()
        note = f"; {capped} capped by rank boundary γ={self.gamma:g}" if capped else ""
        line = f"{len(self.ranks)} layers ({self.preset}, {self.layout}); {ranks}{note}"
        if self.layout == "generic":
            line += ("\nmodel family not recognised: generic name rules (cross-attention = attn2/cross_attn, "
                     "time embedding = *_embed*/time_*/*modulation*); selected: " + ", ".join(name_patterns(self.names)))
        elif self.from_names:
            line += (f"\nmodel family not recognised from its classes: {self.layout} rules chosen from the layer names; "
                     "selected: " + ", ".join(name_patterns(self.names)))
        return line

    def targets_string(self) -> str:
        """The file's `targets` metadata: the preset plus any patterns."""
        s = self.preset
        if self.include:
            s += f" +include({self.include})"
        if self.exclude:
            s += f" -exclude({self.exclude})"
        return s


def name_patterns(names: Iterable[str]) -> list[str]:
    """Names with block indices replaced by N, each once, in order, with a count when it repeats
    (``layers.N.attention.qkv ×24``): a readable summary of a selection."""
    counts: dict[str, int] = {}
    for n in names:
        key = re.sub(r"(?<=\.)\d+(?=\.|$)", "N", strip_prefix(n))
        counts[key] = counts.get(key, 0) + 1
    return [k if c == 1 else f"{k} ×{c}" for k, c in counts.items()]


def plan(out_dims: Mapping[str, int], preset: str = DEFAULT_PRESET, rank: int = 8, gamma: float = DEFAULT_GAMMA,
         include: str | None = None, exclude: str | None = None, layout: str | None = None) -> TargetPlan:
    """Select layers from candidates {name: output dim} and give each its effective rank. `layout` is a family
    key (``para_core.families``; from :func:`family_for_model`); None: the layout found from the names."""
    if layout is not None and layout not in _FAMILY_RECORDS:
        raise ValueError(f"unknown model family '{layout}', expected one of {', '.join(FAMILIES)}")
    layout = layout or detect_layout(out_dims)
    chosen = select(out_dims, preset, include, exclude, layout)
    p = TargetPlan(preset, layout, requested_rank=rank, gamma=gamma, include=(include or "").strip(),
                   exclude=(exclude or "").strip())
    for n in chosen:
        p.ranks[n] = effective_rank(rank, out_dims[n], gamma)
        p.out_dims[n] = out_dims[n]
    return p

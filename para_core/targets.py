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

Presets:

* ``ExCA`` - the paper's default, "all layers except cross-attention and time embedding". Excluded per
  family: the *cross-attention analogue* (where the text conditioning enters) and the *time-embedding
  analogue* (timestep / guidance / pooled-vector embedders and every modulation they drive), see the table.
* ``self_attention`` - the image-token attention projections (in joint-attention blocks that mix text and
  image tokens, the shared projections).
* ``attention`` - ``self_attention`` plus the attention projections of the cross-attention analogue.
* ``all`` - every candidate.

Per family (regexes in ``_RULES``; names without ``diffusion_model.``; N = block index):

============== ================================ ========================================== ===============================================
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

PRESETS = ("ExCA", "self_attention", "attention", "all")
DEFAULT_PRESET = "ExCA"
DEFAULT_GAMMA = 0.025
PREFIX = "diffusion_model."

# Per family: regexes on the name without the "diffusion_model." prefix (see the table in the docstring).
# cross: the cross-attention analogue (dropped by ExCA); cross_attention: its attention part (added by
# `attention`; default: all of cross); embed: the time-embedding analogue (dropped by ExCA, never attention);
# self: the image self-attention projections.
_FLUX = {
    "cross": r"\.txt_(attn|mlp)\.|^txt_in(\.|$)",
    "cross_attention": r"\.txt_attn\.|^txt_in\..*\.self_attn\.",
    "embed": r"^(time_in|vector_in|guidance_in|time_text_embed|distilled_guidance_layer)(\.|$)"
             r"|\.(img_mod|txt_mod|modulation)\.|(^|\.)\w*modulation\w*(\.|$)|^txt_in\.(t_embedder|c_embedder)\.",
    "self": r"\.img_attn\.|^single_blocks\.\d+\.linear[12]$",
}
_LUMINA2 = {
    "cross": r"^(context_refiner|cap_embedder)(\.|$)",
    "cross_attention": r"^context_refiner\.\d+\.attention\.",
    "embed": r"^(t_embedder|clip_text_pooled_proj|time_text_embed)(\.|$)|(^|\.)adaLN_modulation(\.|$)",
    "self": r"^(layers|noise_refiner)\.\d+\.attention\.",
}
_RULES: dict[str, dict[str, str]] = {
    "unet": {
        "cross": r"\.attn2\.",
        "embed": r"^(time_embed|label_emb)(\.|$)|\.emb_layers\.",
        "self": r"\.attn1\.",
    },
    "mmdit": {
        "cross": r"\.context_block\.|^context_embedder(\.|$)",
        "cross_attention": r"\.context_block\.attn2?\.",
        "embed": r"^(t_embedder|y_embedder)(\.|$)|(^|\.)adaLN_modulation\.",
        "self": r"\.x_block\.attn2?\.",
    },
    "unet_diffusers": {  # sd-scripts' SD1.x UNet (library/original_unet.py): diffusers module names
        "cross": r"\.attn2\.",
        "embed": r"^(time_embedding|add_embedding)(\.|$)|\.time_emb_proj$",
        "self": r"\.attn1\.",
    },
    "flux": _FLUX,
    "auraflow": {
        "cross": r"^cond_seq_linear(\.|$)|^double_layers\.\d+\.(mlpC|attn\.w1[qkvo])(\.|$)",
        "cross_attention": r"^double_layers\.\d+\.attn\.w1[qkvo]$",
        "embed": r"^t_embedder\.|(^|\.)mod(C|X|CX|F)(\.|$)",
        "self": r"^double_layers\.\d+\.attn\.w2[qkvo]$|^single_layers\.\d+\.attn\.w1[qkvo]$",
    },
    "cosmos_predict2": {
        "cross": r"\.cross_attn\.",
        "embed": r"^t_embedder\.|(^|\.)adaln_modulation",
        "self": r"\.self_attn\.",
    },
    "cascade": {
        "cross": r"^clip_(txt|txt_pooled|img)_mapper(\.|$)|\.kv_mapper\.",
        "cross_attention": r"\.kv_mapper\.",
        "embed": r"\.mapper(_sca|_crp)?$",
        "self": r"\.attention\.attn\.",
    },
    "pixart": {
        "cross": r"\.cross_attn\.|^y_embedder\.",
        "cross_attention": r"\.cross_attn\.",
        "embed": r"^(t_block|t_embedder|ar_embedder|csize_embedder)(\.|$)",
        "self": r"^blocks\.\d+\.attn\.",
    },
    "lumina2": _LUMINA2,
    "qwen_image": {
        "cross": r"^txt_in(\.|$)|\.txt_mlp\.|\.attn\.(add_[qkv]_proj|to_add_out)$",
        "cross_attention": r"\.attn\.(add_[qkv]_proj|to_add_out)$",
        "embed": r"^(time_text_embed|norm_out)\.|\.(img_mod|txt_mod)\.",
        "self": r"\.attn\.(to_[qkv]|to_out\.\d+)$",
    },
    "hidream": {
        "cross": r"^caption_projection\.|\.attn1\.to_(q|k|v|out)_t$|\.ff_t\.",
        "cross_attention": r"\.attn1\.to_(q|k|v|out)_t$",
        "embed": r"^(t_embedder|p_embedder)\.|(^|\.)adaLN_modulation(\.|$)",
        "self": r"\.attn1\.to_(q|k|v|out)$",
    },
    "wan": {
        "cross": r"^(text_embedding|img_emb)(\.|$)|\.cross_attn\.",
        "cross_attention": r"\.cross_attn\.",
        "embed": r"^(time_embedding|time_projection)(\.|$)",
        "self": r"\.self_attn\.",
    },
    "ltxv": {
        "cross": r"^(audio_)?caption_projection(\.|$)|\.(audio_)?attn2\.",
        "cross_attention": r"\.(audio_)?attn2\.",
        "embed": r"(^|_)adaln_single(\.|$)",
        "self": r"\.(audio_)?attn1\.",
    },
    "generic": {
        "cross": r"(^|\.)(attn2|cross_attn|crossattn|cross_attention)(\.|$)",
        "embed": r"(^|[._])(time|t|y|label|timestep|guidance|vector|context|pooled)_?(embed|embedder|emb|embedding|in|proj)(\.|$)"
                 r"|(^|\.)emb_layers\.|modulation",
        "self": r"(^|\.)(attn1|self_attn|attn|attention)(\.|$)",
    },
}
FAMILIES = tuple(_RULES)

# ComfyUI model classes -> family key. First the model config class (comfy.supported_models.<name>), which
# names the architecture; then the diffusion model's class for configs this table does not list.
_CONFIG_FAMILIES = {
    **dict.fromkeys(("SD15", "SD20", "SD21UnclipL", "SD21UnclipH", "SDXLRefiner", "SDXL", "SSD1B", "Segmind_Vega",
                     "KOALA_700M", "KOALA_1B", "SVD_img2vid", "SV3D_u", "SV3D_p", "Stable_Zero123", "SD_X4Upscaler",
                     "SD15_instructpix2pix", "SDXL_instructpix2pix", "LotusD"), "unet"),
    "SD3": "mmdit",
    **dict.fromkeys(("Flux", "FluxInpaint", "FluxSchnell", "Flux2", "Chroma", "ChromaRadiance", "HunyuanVideo",
                     "HunyuanVideoI2V", "HunyuanVideoSkyreelsI2V", "HunyuanImage21", "HunyuanImage21Refiner",
                     "HunyuanVideo15", "HunyuanVideo15_SR_Distilled"), "flux"),
    "AuraFlow": "auraflow",
    **dict.fromkeys(("CosmosT2IPredict2", "CosmosI2VPredict2"), "cosmos_predict2"),
    **dict.fromkeys(("Stable_Cascade_C", "Stable_Cascade_B"), "cascade"),
    **dict.fromkeys(("PixArtAlpha", "PixArtSigma"), "pixart"),
    **dict.fromkeys(("Lumina2", "ZImage"), "lumina2"),
    "QwenImage": "qwen_image",
    "HiDream": "hidream",
    **dict.fromkeys(("WAN21_T2V", "WAN21_I2V", "WAN21_FunControl2V", "WAN21_Camera", "WAN22_Camera", "WAN21_Vace",
                     "WAN21_HuMo", "WAN22_S2V", "WAN22_Animate", "WAN22_T2V"), "wan"),
    **dict.fromkeys(("LTXV", "LTXAV"), "ltxv"),
}
_MODEL_FAMILIES = {
    "UNetModel": "unet", "OpenAISignatureMMDITWrapper": "mmdit", "Flux": "flux", "Chroma": "flux",
    "ChromaRadiance": "flux", "HunyuanVideo": "flux", "MiniTrainDIT": "cosmos_predict2", "StageC": "cascade",
    "StageB": "cascade", "PixArtMS": "pixart", "PixArt": "pixart", "NextDiT": "lumina2",
    "QwenImageTransformer2DModel": "qwen_image", "HiDreamImageTransformer2DModel": "hidream", "WanModel": "wan",
    "VaceWanModel": "wan", "CameraWanModel": "wan", "HumoWanModel": "wan", "WanModel_S2V": "wan",
    "AnimateWanModel": "wan", "LTXVModel": "ltxv", "LTXAVModel": "ltxv",
}


def family_for_model(config_class: str | None, diffusion_model_class: str | None = None) -> str | None:
    """The family key for ComfyUI's model classes (class names, e.g. ``"Flux"``, ``"WanModel"``), or None
    when neither is known (the caller then falls back to the layout found from module names)."""
    return _CONFIG_FAMILIES.get(config_class or "") or _MODEL_FAMILIES.get(diffusion_model_class or "")


def strip_prefix(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def detect_layout(names: Iterable[str]) -> str:
    """'unet', 'unet_diffusers', 'mmdit', 'flux' or 'generic', from the module names alone (for models whose ComfyUI classes
    :func:`family_for_model` does not know)."""
    names = [strip_prefix(n) for n in names]
    if any(n.startswith("joint_blocks.") for n in names):
        return "mmdit"
    if any(n.startswith(("double_blocks.", "single_blocks.")) for n in names):
        return "flux"
    if any(n.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for n in names):
        return "unet"
    if any(re.match(r"(down_blocks|up_blocks)\.\d+\.(attentions|resnets)\.|mid_block\.(attentions|resnets)\.", n)
           for n in names):  # diffusers' UNet (Stable Cascade's down_blocks.N.M are not this)
        return "unet_diffusers"
    return "generic"


def _match(pattern: str | None, name: str) -> bool:
    return bool(pattern) and re.search(pattern, name) is not None


def preset_selects(preset: str, name: str, layout: str) -> bool:
    """Whether `preset` selects module `name` (prefix optional) of a model with this layout."""
    if preset not in PRESETS:
        raise ValueError(f"unknown target preset '{preset}', expected one of {', '.join(PRESETS)}")
    rules = _RULES[layout]
    n = strip_prefix(name)
    if preset == "all":
        return True
    if preset == "ExCA":
        return not (_match(rules["cross"], n) or _match(rules["embed"], n))
    is_self = _match(rules["self"], n) and not _match(rules["embed"], n)
    if preset == "self_attention":
        return is_self
    cross_attn = rules.get("cross_attention", rules["cross"])
    return is_self or (_match(cross_attn, n) and not _match(rules["embed"], n))


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
    key (see the table; from :func:`family_for_model`); None: the layout found from the names."""
    if layout is not None and layout not in _RULES:
        raise ValueError(f"unknown model family '{layout}', expected one of {', '.join(FAMILIES)}")
    layout = layout or detect_layout(out_dims)
    chosen = select(out_dims, preset, include, exclude, layout)
    p = TargetPlan(preset, layout, requested_rank=rank, gamma=gamma, include=(include or "").strip(),
                   exclude=(exclude or "").strip())
    for n in chosen:
        p.ranks[n] = effective_rank(rank, out_dims[n], gamma)
        p.out_dims[n] = out_dims[n]
    return p

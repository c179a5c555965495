"""Which layers PaRa trains: presets over ComfyUI-native module names, include/exclude patterns, and the
rank boundary γ.

Names are ComfyUI-native (``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q``); the
``diffusion_model.`` prefix is optional. Candidates are the modules the core LoRA trainer would train:
every module with a ≥2-D weight (linear, conv, ...). Presets:

* ``ExCA`` - the paper's default ("all layers except cross-attention and time embedding"):
  - SD UNets (SD1.x/SD2.x/SDXL): everything except ``attn2`` (cross-attention), ``time_embed``,
    ``label_emb`` (SDXL's pooled/size embedding) and the resblocks' ``emb_layers`` (time embedding
    projections).
  - SD3 MMDiT: joint attention has no separate cross-attention; text enters through the text stream
    (``context_block``: its qkv/proj/mlp), which is the analogue and is excluded, together with the
    embedders ``t_embedder``, ``y_embedder``, ``context_embedder`` and every ``adaLN_modulation``
    (timestep/pooled-text modulation: the analogue of ``emb_layers``). Kept: ``x_block`` attention
    (``attn``, and ``attn2`` of SD3.5, which is image self-attention), ``x_block.mlp``,
    ``x_embedder``, ``final_layer.linear``.
  - Flux: the text stream of the double blocks (``txt_attn``, ``txt_mlp``, ``txt_mod``) and
    ``txt_in`` are excluded as the cross-attention analogue; ``time_in``, ``vector_in``,
    ``guidance_in`` and all modulation layers (``img_mod``, single blocks' ``modulation``,
    ``final_layer.adaLN_modulation``) as the time-embedding analogue. Kept: ``img_attn``, ``img_mlp``,
    the single blocks' ``linear1``/``linear2`` (shared by text and image tokens), ``img_in``,
    ``final_layer.linear``.
* ``self_attention`` - UNet ``attn1``; MMDiT ``x_block.attn``/``x_block.attn2``; Flux ``img_attn`` and
  the single blocks' ``linear1``/``linear2`` (fused attention+MLP projections).
* ``attention`` - ``self_attention`` plus cross-attention: UNet ``attn2``; MMDiT ``context_block.attn``;
  Flux ``txt_attn``.
* ``all`` - every candidate.

Measured caveat (benchmarks/bench_train.py --init-study, tiny SD1.5): ExCA as the paper words it includes
the UNet's output conv ``out.2``, whose 4 output channels get rank max(1, floor(γ·4)) = 1, so a quarter of
the predicted latent space is removed at every pixel; excluding it (``exclude="^diffusion_model[.]out[.]"``)
halved the loss reached in 60 steps (0.20 vs 0.38). The preset keeps the paper's wording; the Train PaRa
tooltip suggests the pattern.

Unknown layouts use generic name rules (``attn2``/``cross_attn`` = cross-attention, ``*_embed``/
``*_embedder``/``time_*``/``*modulation*`` = embeddings).

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

# Per layout: regexes on the name without the "diffusion_model." prefix.
_RULES: dict[str, dict[str, str]] = {
    "unet": {
        "cross": r"\.attn2\.",
        "embed": r"^(time_embed|label_emb)(\.|$)|\.emb_layers\.",
        "self": r"\.attn1\.",
    },
    "mmdit": {
        "cross": r"\.context_block\.",
        "cross_attention": r"\.context_block\.attn2?\.",
        "embed": r"^(t_embedder|y_embedder|context_embedder)(\.|$)|(^|\.)adaLN_modulation\.",
        "self": r"\.x_block\.attn2?\.",
    },
    "flux": {
        "cross": r"\.txt_(attn|mlp|mod)\.|^txt_in(\.|$)",
        "cross_attention": r"\.txt_attn\.",
        "embed": r"^(time_in|vector_in|guidance_in|time_text_embed)(\.|$)|\.(img_mod|txt_mod|modulation)\.|(^|\.)adaLN_modulation\.",
        "self": r"\.img_attn\.|^single_blocks\.\d+\.linear[12]$",
    },
    "generic": {
        "cross": r"(^|\.)(attn2|cross_attn|crossattn|cross_attention)(\.|$)",
        "embed": r"(^|[._])(time|t|y|label|timestep|guidance|vector|context|pooled)_?(embed|embedder|emb|embedding|in|proj)(\.|$)"
                 r"|(^|\.)emb_layers\.|modulation",
        "self": r"(^|\.)(attn1|self_attn|attn|attention)(\.|$)",
    },
}


def strip_prefix(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def detect_layout(names: Iterable[str]) -> str:
    """'unet', 'mmdit', 'flux' or 'generic', from the module names alone."""
    names = [strip_prefix(n) for n in names]
    if any(n.startswith("joint_blocks.") for n in names):
        return "mmdit"
    if any(n.startswith(("double_blocks.", "single_blocks.")) for n in names):
        return "flux"
    if any(n.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for n in names):
        return "unet"
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
        """One line: layer count, rank histogram, how many were capped by γ."""
        hist = Counter(self.ranks.values())
        ranks = ", ".join(f"r={r}: {c}" for r, c in sorted(hist.items(), reverse=True))
        capped = self.capped()
        note = f"; {capped} capped by rank boundary γ={self.gamma:g}" if capped else ""
        return f"{len(self.ranks)} layers ({self.preset}, {self.layout}); {ranks}{note}"

    def targets_string(self) -> str:
        """The file's `targets` metadata: the preset plus any patterns."""
        s = self.preset
        if self.include:
            s += f" +include({self.include})"
        if self.exclude:
            s += f" -exclude({self.exclude})"
        return s


def plan(out_dims: Mapping[str, int], preset: str = DEFAULT_PRESET, rank: int = 8, gamma: float = DEFAULT_GAMMA,
         include: str | None = None, exclude: str | None = None, layout: str | None = None) -> TargetPlan:
    """Select layers from candidates {name: output dim} and give each its effective rank."""
    layout = layout or detect_layout(out_dims)
    chosen = select(out_dims, preset, include, exclude, layout)
    p = TargetPlan(preset, layout, requested_rank=rank, gamma=gamma, include=(include or "").strip(),
                   exclude=(exclude or "").strip())
    for n in chosen:
        p.ranks[n] = effective_rank(rank, out_dims[n], gamma)
        p.out_dims[n] = out_dims[n]
    return p

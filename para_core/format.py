"""The PaRa file format and its in-memory model.

One .safetensors file. For a module with ComfyUI-native path M (``diffusion_model.<path>`` or
``text_encoders.<clip_x>.<path>``):

* ``M.para_q``   out x r, orthonormal columns (stored fp16 unless asked otherwise)
* ``M.para_b``   out x r, any full-rank B; orthonormalised on load (files from other tools)
* ``M.para_q_1``, ``M.para_q_2``, ... further *stages* of a sequential merge, applied in order
  after ``M.para_q`` (stage 0): W_k = W_{k-1} - Q_k Q_kᵀ W_{k-1}.

Each tensor is 2-D, floating point (fp8 is upcast to float32 when read), finite, full rank, with
1 <= r <= out - 1 (r = 1 for out = 1): r = out would project the whole output space away and zero
the layer, so such files are refused (see `max_rank`).

Header metadata: ``format=para``, ``para_version=1``, ``rank``, ``stages``, and optionally
``base_model``, ``targets``, ``merge_mode``, ``training`` (JSON).

The bases used for patching are always derived from the stored tensors (fp32 QR, sign-fixed), so a
file saved and reloaded patches to exactly the same weights as the model that wrote it.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import safetensors_io
from .basis import orthonormal_bases, orthonormality_error
from .errors import ParaError, ParaFormatError

FORMAT_NAME = "para"
FORMAT_VERSION = 1
KEY_RE = re.compile(r"^(?P<module>.+)\.para_(?P<kind>[qb])(?:_(?P<stage>[1-9][0-9]*))?$")
STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

log = logging.getLogger(__name__)


def stage_key(module: str, stage: int, kind: str = "q") -> str:
    return f"{module}.para_{kind}" + (f"_{stage}" if stage else "")


class ParaModel:
    """An ordered chain of orthonormal bases per module, plus the file representation."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 source: str = "<memory>"):
        self.source = source
        self.tensors = dict(tensors)
        self.metadata = dict(metadata or {})
        self.stages: dict[str, list[torch.Tensor]] = _parse_and_validate(self.tensors, self.metadata, source)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_bases(cls, stages: dict[str, list[torch.Tensor]], metadata: dict[str, str] | None = None,
                   dtype: torch.dtype = torch.float16) -> "ParaModel":
        """Build from (not necessarily orthonormal) fp32 bases; stored as `dtype` para_q tensors."""
        tensors = {}
        for module, chain in stages.items():
            for i, q in enumerate(chain):
                tensors[stage_key(module, i)] = q.detach().to("cpu", dtype).contiguous()
        meta = {k: v for k, v in (metadata or {}).items() if k not in ("rank", "stages")}
        return cls(tensors, _standard_metadata(tensors, meta))

    @classmethod
    def load(cls, path: str) -> "ParaModel":
        tensors, meta = safetensors_io.load_file(path)
        return cls(tensors, meta, source=path)

    def save(self, path: str, force: bool = False) -> None:
        safetensors_io.save_file(self.tensors, path, self.metadata, force=force)

    def to_bytes(self) -> bytes:
        return safetensors_io.to_bytes(self.tensors, self.metadata)

    # ---- queries ------------------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        return list(self.stages)

    def ranks(self) -> dict[str, list[int]]:
        return {m: [q.shape[1] for q in chain] for m, chain in self.stages.items()}

    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def max_stages(self) -> int:
        return max((len(c) for c in self.stages.values()), default=0)

    def rank_summary(self) -> str:
        rs = sorted({r for chain in self.ranks().values() for r in chain})
        return "none" if not rs else str(rs[0]) if len(rs) == 1 else f"{rs[0]}-{rs[-1]}"

    def orthonormality_errors(self) -> dict[str, float]:
        """Per stored key, max |QᵀQ - I| of the stored tensor (para_b keys are not expected to be orthonormal)."""
        return {k: orthonormality_error(t) for k, t in self.tensors.items() if ".para_q" in k}

    def select(self, keep: Callable[[str], bool]) -> "ParaModel":
        tensors = {k: v for k, v in self.tensors.items() if keep(KEY_RE.match(k)["module"])}
        return ParaModel(tensors, self.metadata, self.source)

    def __repr__(self) -> str:
        return f"ParaModel({len(self.stages)} modules, rank {self.rank_summary()}, {self.max_stages()} stage(s), {self.source})"


def max_rank(out: int) -> int:
    """Largest rank a basis of a layer with `out` output rows may have: out - 1 (1 for out = 1).

    r = out spans the whole output space, so W - QQᵀW = 0: the layer would output nothing (bias aside)
    however the subspace was learned. The trainer never makes one (it caps at out - 1), and files
    that have one are refused with the same bound, so every path (loader, bake, merge) agrees.
    """
    return max(1, out - 1)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """fp8 (and any other storage-only float) -> float32 for validation and QR; fp16/bf16/fp32/fp64 as they are.

    A ``para_q``/``para_b`` stored in F8_E4M3 or F8_E5M2 is read like any other B: upcast exactly to
    float32, checked for NaN/Inf, orthonormalised (its 3-bit mantissa is far from orthonormal).
    """
    return t if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else t.to(torch.float32)


def _standard_metadata(tensors: dict[str, torch.Tensor], extra: dict[str, str]) -> dict[str, str]:
    ranks = sorted({t.shape[1] for t in tensors.values()})
    stages = 1
    for k in tensors:
        m = KEY_RE.match(k)
        if m and m["stage"]:
            stages = max(stages, int(m["stage"]) + 1)
    meta = {"format": FORMAT_NAME, "para_version": str(FORMAT_VERSION),
            "rank": str(ranks[0]) if len(ranks) == 1 else "mixed", "stages": str(stages)}
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def _parse_and_validate(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> dict[str, list[torch.Tensor]]:
    """Check every key before anything touches a model; return module -> ordered fp32 bases."""
    fmt = metadata.get("format")
    if fmt is not None and fmt != FORMAT_NAME:
        raise ParaFormatError(f"{source}: metadata says format '{fmt}', not '{FORMAT_NAME}'")
    ver = metadata.get("para_version")
    if ver is not None:
        try:
            v = int(ver)
        except ValueError:
            raise ParaFormatError(f"{source}: para_version '{ver}' is not a number") from None
        if v > FORMAT_VERSION:
            raise ParaFormatError(f"{source}: written by a newer comfyui-para (para_version {v}); this one reads version {FORMAT_VERSION}")
    if not tensors:
        raise ParaFormatError(f"{source}: contains no tensors")
    found: dict[str, dict[int, tuple[str, str]]] = {}
    for key, t in tensors.items():
        m = KEY_RE.match(key)
        if m is None:
            hint = " (this looks like a LoRA file: load it with a LoRA loader)" if ("lora_" in key or key.endswith(".alpha")) else ""
            raise ParaFormatError(f"{source}: key '{key}': unknown suffix; expected '<module>.para_q' or '<module>.para_b'{hint}")
        if not t.is_floating_point():
            raise ParaFormatError(f"{source}: key '{key}': dtype {t.dtype} is not a floating-point type")
        if t.ndim != 2:
            raise ParaFormatError(f"{source}: key '{key}': expected a 2-D (out x r) basis, got shape {tuple(t.shape)}")
        out, r = t.shape
        if r == 0 or r > max_rank(out):
            why = "; r = out would remove every output direction (the layer's output would be zero)" if r == out else ""
            raise ParaFormatError(f"{source}: key '{key}': rank r={r} must be between 1 and {max_rank(out)} for out={out} "
                                  f"(shape {tuple(t.shape)}){why}")
        if not torch.isfinite(_upcast(t)).all():
            raise ParaFormatError(f"{source}: key '{key}': contains NaN or Inf values (shape {tuple(t.shape)})")
        stage = int(m["stage"] or 0)
        slot = found.setdefault(m["module"], {})
        if stage in slot:
            raise ParaFormatError(f"{source}: keys '{slot[stage][0]}' and '{key}' both define stage {stage} of module '{m['module']}'")
        slot[stage] = (key, m["kind"])
    order: list[tuple[str, str]] = []  # (module, key) in chain order
    for module in sorted(found):
        slot = found[module]
        if sorted(slot) != list(range(len(slot))):
            raise ParaFormatError(f"{source}: module '{module}': stages {sorted(slot)} are not 0..{len(slot) - 1} "
                                  f"(first key '{slot[min(slot)][0]}')")
        first = tensors[slot[0][0]]
        for i in range(len(slot)):
            key = slot[i][0]
            if tensors[key].shape[0] != first.shape[0]:
                raise ParaFormatError(f"{source}: key '{key}': shape {tuple(tensors[key].shape)} does not match stage 0's output dim {first.shape[0]}")
            order.append((module, key))
    try:
        bases = orthonormal_bases([_upcast(tensors[k]) for _, k in order], [f"{source}: key '{k}'" for _, k in order])
    except ParaError as e:
        raise ParaFormatError(str(e)) from None
    stages: dict[str, list[torch.Tensor]] = {}
    for (module, _), q in zip(order, bases):
        stages.setdefault(module, []).append(q)
    return stages


# ---- matching against a model ----------------------------------------------------------------
@dataclass
class MatchReport:
    """Result of matching a PaRa file's modules against a model: one summary, not a warning per key."""
    source: str
    matched: dict[str, object] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], int]] = field(default_factory=list)  # module, basis shape, model out-dim

    @property
    def ok(self) -> bool:
        return not self.mismatched and bool(self.matched)

    def summary(self, first: int = 3) -> str:
        parts = [f"{len(self.matched)} matched"]
        if self.unmatched:
            parts.append(f"{len(self.unmatched)} not in the model (first: {', '.join(self.unmatched[:first])})")
        if self.mismatched:
            ex = "; ".join(f"{m} basis {tuple(s)} vs weight out-dim {o}" for m, s, o in self.mismatched[:first])
            parts.append(f"{len(self.mismatched)} shape mismatches (first: {ex})")
        return f"{self.source}: " + ", ".join(parts)

    def raise_if_bad(self) -> None:
        if self.mismatched:
            raise ParaError(f"PaRa file does not fit this model: {self.summary()}")
        if not self.matched:
            raise ParaError(f"PaRa file matches no layer of this model: {self.summary()}")


def match_modules(para: ParaModel, resolve: Callable[[str], tuple[object, int] | None]) -> MatchReport:
    """resolve(module) -> (target, output_dim) or None. Returns a report; never logs per key."""
    rep = MatchReport(para.source)
    for module, chain in para.stages.items():
        hit = resolve(module)
        if hit is None:
            rep.unmatched.append(module)
            continue
        target, out_dim = hit
        if chain[0].shape[0] != out_dim:
            rep.mismatched.append((module, tuple(chain[0].shape), out_dim))
            continue
        rep.matched[module] = target
    return rep


def training_metadata(training: dict, targets: str, name: str, base_model: str = "") -> dict[str, str]:
    """The header entries of a trained PaRa: ``training`` (the run's settings as JSON with sorted keys, read
    back by `parse_training_metadata`), ``targets``, ``name`` and, when known, ``base_model``."""
    meta = {"targets": targets, "training": json.dumps(training, sort_keys=True), "name": name}
    if base_model:
        meta["base_model"] = base_model
    return meta


def parse_training_metadata(para: ParaModel) -> dict:
    """The ``training`` entry written by `training_metadata` as a dict ({} if absent or not a JSON object)."""
    raw = para.metadata.get("training")
    if not raw:
        return {}
    try:
        v = json.loads(raw)
        return v if isinstance(v, dict) else {}
    except ValueError:
        return {}

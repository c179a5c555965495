"""Checkpoint files: which tensor of a checkpoint is which PaRa module, and the streamed edits
(bake, export-lora) that the command line runs without ComfyUI.

A checkpoint's ``model.diffusion_model.X.weight`` is module ``diffusion_model.X``. Text encoders:

* SD1.5  ``cond_stage_model.transformer.text_model.X.weight``           -> ``text_encoders.clip_l.transformer.text_model.X``
* SDXL   ``conditioner.embedders.0.transformer.text_model.X.weight``    -> ``text_encoders.clip_l.transformer.text_model.X``
* SDXL   ``conditioner.embedders.1.model.transformer.resblocks.N.*``    -> ``text_encoders.clip_g.transformer.text_model.encoder.layers.N.*``
  (open_clip layout: the fused ``attn.in_proj_weight`` holds q, k, v as row blocks, so q_proj/k_proj/v_proj
  are row slices of it; ``attn.out_proj``, ``mlp.c_fc``, ``mlp.c_proj`` are out_proj, fc1, fc2)
* SD2    ``cond_stage_model.model.transformer.resblocks.N.*``          -> ``text_encoders.clip_h...`` (same open_clip rules)

A bare diffusion-model file (keys ``input_blocks...``, ``joint_blocks...``, ``double_blocks...``) maps to
``diffusion_model.X`` too.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import safetensors_io
from .errors import ParaError
from .families import BARE_CHECKPOINT
from .format import MatchReport, ParaModel, match_modules
from .lora import chain_factors
from .projection import apply_stages_

log = logging.getLogger(__name__)

_OPEN_CLIP_PARTS = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPEN_CLIP_ROOTS = {"conditioner.embedders.1.model.": "text_encoders.clip_g.", "cond_stage_model.model.": "text_encoders.clip_h."}
_HF_CLIP_ROOTS = {"conditioner.embedders.0.transformer.": "text_encoders.clip_l.transformer.",
                  "cond_stage_model.transformer.": "text_encoders.clip_l.transformer."}


@dataclass(frozen=True)
class TensorSlice:
    """Where a module's weight lives in the checkpoint: a key and an optional row range."""
    key: str
    rows: tuple[int, int] | None = None  # (start, length) along dim 0, for fused open_clip in_proj
    out_dim: int = 0


def module_map(infos: list[safetensors_io.TensorInfo]) -> dict[str, TensorSlice]:
    """ComfyUI-native module name -> location of its weight, for every ≥2-D weight in the file."""
    keys = {t.name: t for t in infos}
    bare = sum(1 for k in keys if BARE_CHECKPOINT.match(k)) > 5 and not any(k.startswith("model.diffusion_model.") for k in keys)
    out: dict[str, TensorSlice] = {}
    for name, t in keys.items():
        if len(t.shape) < 2:
            continue
        if name.startswith("model.diffusion_model.") and name.endswith(".weight"):
            out["diffusion_model." + name[len("model.diffusion_model."):-len(".weight")]] = TensorSlice(name, None, t.shape[0])
            continue
        if bare and name.endswith(".weight") and BARE_CHECKPOINT.match(name):
            out["diffusion_model." + name[:-len(".weight")]] = TensorSlice(name, None, t.shape[0])
            continue
        for root, target in _HF_CLIP_ROOTS.items():
            if name.startswith(root) and name.endswith(".weight"):
                out[target + name[len(root):-len(".weight")]] = TensorSlice(name, None, t.shape[0])
        for root, target in _OPEN_CLIP_ROOTS.items():
            if not name.startswith(root):
                continue
            m = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)$", name[len(root):])
            if not m:
                continue
            layer = f"{target}transformer.text_model.encoder.layers.{m[1]}."
            rest = m[2]
            if rest == "attn.in_proj_weight":
                h = t.shape[0] // 3
                for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[layer + "self_attn." + proj] = TensorSlice(name, (i * h, h), h)
            elif rest.endswith(".weight") and rest[:-len(".weight")] in _OPEN_CLIP_PARTS:
                out[layer + _OPEN_CLIP_PARTS[rest[:-len(".weight")]]] = TensorSlice(name, None, t.shape[0])
    return out


def match_checkpoint(para: ParaModel, ckpt_path: str) -> tuple[MatchReport, list[safetensors_io.TensorInfo]]:
    _, infos = safetensors_io.read_header(ckpt_path)
    mapping = module_map(infos)
    rep = match_modules(para, lambda m: (mapping[m], mapping[m].out_dim) if m in mapping else None)
    rep.source = f"{para.source} on {ckpt_path}"
    return rep, infos


def _require_fit(rep: MatchReport) -> None:
    if rep.mismatched or rep.unmatched:
        raise ParaError(f"PaRa does not fit the checkpoint: {rep.summary()}")
    if not rep.matched:
        raise ParaError(f"PaRa matches no tensor of the checkpoint: {rep.summary()}")


def _edits_by_key(paras: list[ParaModel], ckpt_path: str) -> tuple[dict[str, list[tuple[TensorSlice, list[torch.Tensor]]]], list]:
    """checkpoint key -> [(slice, stages)] in application order (all PaRa models, in the order given)."""
    edits: dict[str, list[tuple[TensorSlice, list[torch.Tensor]]]] = {}
    infos = None
    for para in paras:
        rep, infos = match_checkpoint(para, ckpt_path)
        _require_fit(rep)
        for module, sl in rep.matched.items():
            edits.setdefault(sl.key, []).append((sl, para.stages[module]))
    return edits, infos


def _apply_edits(t: torch.Tensor, edits: list[tuple[TensorSlice, list[torch.Tensor]]], strength: float, key: str) -> torch.Tensor:
    w = t.to(torch.float32, copy=True).contiguous()
    for sl, stages in edits:
        part = w if sl.rows is None else w.narrow(0, sl.rows[0], sl.rows[1])
        apply_stages_(part, stages, strength, what=f"checkpoint key '{key}'")
    return w.to(t.dtype)


def bake(ckpt_path: str, paras: list[ParaModel], out_path: str, strength: float = 1.0, force: bool = False,
         progress: Callable[[int, int], None] | None = None) -> MatchReport:
    """Write a full checkpoint with the PaRa models applied in order (a sequential chain).

    Streams tensor by tensor; untouched tensors are copied unchanged (same dtype, same bytes); edited ones are
    computed in float32 and rounded once to their own dtype. The output's tensors are laid out aligned (element
    size descending, then name: see safetensors_io.data_order); it appears only when complete.
    Returns the match report of the last PaRa model (all are validated before anything is written).
    """
    edits, infos = _edits_by_key(paras, ckpt_path)
    meta, _ = safetensors_io.read_header(ckpt_path)
    names = [t.name for t in infos]
    with safetensors_io.open_tensors(ckpt_path) as f:
        entries = []
        for t in infos:
            dtype = safetensors_io.ST_TO_DTYPE.get(t.dtype)
            if dtype is None:
                raise ParaError(f"{ckpt_path}: key '{t.name}': dtype {t.dtype} is not supported")
            entries.append((t.name, dtype, t.shape))
        total = sum(t.nbytes for t in infos)
        done = [0]

        def produce(i: int) -> torch.Tensor:
            key = names[i]
            t = f.get_tensor(key)
            return _apply_edits(t, edits[key], strength, key) if key in edits else t

        def tick(n: int) -> None:
            done[0] += n
            if progress:
                progress(done[0], total)

        meta = dict(meta)
        meta["para_baked"] = " + ".join(p.source for p in paras) + f" @ strength {strength:g}"
        safetensors_io.write_stream(out_path, entries, produce, meta, force=force, progress=tick)
    rep = match_checkpoint(paras[-1], ckpt_path)[0]
    return rep


def export_lora(ckpt_path: str, para: ParaModel, out_path: str, strength: float = 1.0, force: bool = False,
                progress: Callable[[int, int], None] | None = None) -> MatchReport:
    """Write the PaRa edit of this checkpoint as an ordinary LoRA (ComfyUI-native module names).

    For a chain Q_1..Q_k: ΔW = Σ_j -s·Q_j (Q_jᵀ W_{j-1}) = U·D with U = [-sQ_1 | ... | -sQ_k] (lora_up),
    D = [Q_1ᵀW_0 ; ... ; Q_kᵀW_{k-1}] (lora_down) and alpha = rank, so scale alpha/rank = 1.
    """
    rep, _ = match_checkpoint(para, ckpt_path)
    _require_fit(rep)
    tensors: dict[str, torch.Tensor] = {}
    items = sorted(rep.matched.items())
    with safetensors_io.open_tensors(ckpt_path) as f:
        for n, (module, sl) in enumerate(items):
            w = f.get_tensor(sl.key)
            if sl.rows is not None:
                w = w.narrow(0, sl.rows[0], sl.rows[1])
            store = w.dtype if w.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
            up, down = chain_factors(para.stages[module], w, up_scale=strength, down_scale=1.0, what=f"{ckpt_path}: {sl.key}")
            r = up.shape[1]
            tensors[f"{module}.lora_up.weight"] = up.reshape(up.shape[0], r, *([1] * (w.ndim - 2))).to(store)
            tensors[f"{module}.lora_down.weight"] = down.reshape(r, *w.shape[1:]).to(store)
            tensors[f"{module}.alpha"] = torch.tensor(float(r))
            if progress:
                progress(n + 1, len(items))
    meta = {"source": "comfyui-para export-lora", "para_source": para.source, "para_strength": f"{strength:g}"}
    safetensors_io.save_file(tensors, out_path, meta, force=force)
    return rep

"""PaRa inference nodes: load, apply, merge, combine with a LoRA, save.

PaRa enters the model as weight patches (see patching.py and weight_adapter/), the same mechanism as ComfyUI's LoRA
loader: baked into the weights once when the model loads, undone bit-exactly when it unloads, no cost
per sampling step.
"""
from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict

import folder_paths
import torch
from comfy_api.latest import io

import comfy.utils

from ..para_core.errors import ParaError
from ..para_core.format import ParaModel
from ..para_core.lora import COMBINE_MODES
from ..para_core.merge import MERGE_MODES, merge, subspace_overlap
from . import folders, paths, ui_text
from .patching import apply_para, apply_para_lora

log = logging.getLogger(__name__)

folders.register()

Para = io.Custom("PARA")
CATEGORY = "loaders/para"
_STRENGTH = dict(default=1.0, min=-10.0, max=10.0, step=0.01)

# ---- file cache --------------------------------------------------------------------------------
# V3 node classes are locked (no per-instance state), so parsed files live here, keyed by what
# identifies the file's content: a file fixed or replaced on disk is read again.
_CACHE: OrderedDict[tuple[str, int, int], ParaModel] = OrderedDict()
_CACHE_SIZE = 8


def _file_id(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return path, st.st_mtime_ns, st.st_size


def load_para_file(name: str) -> ParaModel:
    """Parse (or reuse) a file of the `para` folder. Raises ValueError with one line naming the file."""
    path = folder_paths.get_full_path("para", name)
    if path is None:
        raise ValueError(f"PaRa file '{name}' not found in the para folders: {', '.join(folder_paths.get_folder_paths('para'))}")
    key = _file_id(path)
    para = _CACHE.get(key)
    if para is not None:
        _CACHE.move_to_end(key)
        return para
    try:
        para = ParaModel.load(path)
    except ParaError as e:
        raise ValueError(str(e)) from None
    _CACHE[key] = para
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    log.info("PaRa: loaded %s", para)
    return para


def para_line(para: ParaModel) -> str:
    """One short line about a PaRa for the node text: layers, ranks, stages (the file name is on the node)."""
    stages = para.max_stages()
    n = len(para.stages)
    return f"{n} layer{'' if n == 1 else 's'}, rank {para.rank_summary()}" + (f", {stages} stages (sequential merge)" if stages > 1 else "")


def _fingerprint(folder: str, name: str):
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        return name
    try:
        return _file_id(path)
    except OSError:
        return name


def _run(what: str, fn, *args):
    """Run a patching step; turn the user's-input errors into one ValueError line for ComfyUI's dialog."""
    try:
        return fn(*args)
    except ParaError as e:
        raise ValueError(f"{what}: {e}") from None


# ---- inputs shared by several nodes --------------------------------------------------------------
def _model_in():
    return io.Model.Input("model", tooltip="The diffusion model to patch. It is cloned; the input model is left unchanged.")


def _clip_in():
    return io.Clip.Input("clip", optional=True,
                         tooltip="Optional text encoder. PaRa files that contain text-encoder layers patch it; "
                                 "leave it unconnected to patch the diffusion model only.")


def _strength_inputs():
    return [
        io.Float.Input("strength_model", **_STRENGTH,
                       tooltip="How much of the subspace to remove from the diffusion model: W - s·Q(QᵀW). 1 removes it, "
                               "0 leaves the model unchanged, above 1 over-subtracts, negative values amplify it."),
        io.Float.Input("strength_clip", **_STRENGTH,
                       tooltip="The same for the text-encoder layers of the file (needs a CLIP input)."),
    ]


def _block_strength_in(checked: str = ""):
    return io.String.Input("block_strength", default="", optional=True,
                           tooltip="Optional strength per block of the diffusion model, multiplying strength_model: "
                                   "'input:1, middle:0.5, output:0' (SD UNets), 'double:1, single:0.5' (Flux), "
                                   "'joint.3:0' (SD3, one block), '*:0, output:1', or 'regex:value' on layer names. "
                                   "Empty: every layer at strength_model. A block the model lacks is an error" + checked + ".")


def _outputs():
    return [io.Model.Output(display_name="MODEL", tooltip="The patched diffusion model."),
            io.Clip.Output(display_name="CLIP", tooltip="The patched text encoder (None if no CLIP was connected).")]


# ---- nodes -------------------------------------------------------------------------------------
_BYPASS_NOTE = (" Bypass: the weights stay untouched and each patched layer's output is projected instead, "
                "y - s·QQᵀ(y - b) (the same result): for fp8 / quantized or offloaded models, where patching a "
                "weight rounds it into the storage format. Costs a little per step; acts after weight patches and "
                "bypass LoRAs of the same layer.")


class PaRaLoader(io.ComfyNode):
    """Load a PaRa file and patch the model with it (the personalised model of the paper)."""

    NODE_ID, DISPLAY, BYPASS = "PaRaLoader", "Load PaRa", False

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.DISPLAY,
            category=CATEGORY,
            description="Personalise a model with a PaRa file (Parameter Rank Reduction, ICLR 2025): removes a learned "
                        "low-rank subspace from each patched weight, W - Q(QᵀW). Chaining two loaders applies them in "
                        "order (the paper's sequential merge); a LoRA loaded after it acts on the PaRa model."
                        + (_BYPASS_NOTE if cls.BYPASS else ""),
            is_experimental=True,
            inputs=[
                _model_in(),
                _clip_in(),
                io.Combo.Input("para_name", options=paths.para_options(),
                               tooltip="A .safetensors PaRa file from models/para or output/para (Save PaRa's files "
                                       "first, then Train PaRa's save_every checkpoints, newest step first)."),
                *_strength_inputs(),
                _block_strength_in(),
            ],
            outputs=[*_outputs(), Para.Output(display_name="PARA", tooltip="The loaded PaRa, for Merge PaRa / PaRa + LoRA / Save PaRa.")],
            hidden=[ui_text.NODE_ID],
        )

    @classmethod
    def validate_inputs(cls, para_name=None):
        return paths.para_name_problem("Load PaRa", para_name)

    @classmethod
    def fingerprint_inputs(cls, para_name, **kwargs):
        return _fingerprint("para", para_name)

    @classmethod
    def execute(cls, model, para_name, strength_model, strength_clip, clip=None, block_strength="") -> io.NodeOutput:
        para = load_para_file(para_name)
        m, c, text = _run(f"{cls.DISPLAY} '{para_name}'", apply_para, para, model, clip, strength_model, strength_clip,
                          block_strength or "", cls.BYPASS)
        log.info("PaRa %s: %s", para_name, text)
        return io.NodeOutput(m, c, para, ui=ui_text.report(cls, text))


class PaRaApply(io.ComfyNode):
    """Patch a model with a PARA value (from Load PaRa or Merge PaRa)."""

    NODE_ID, DISPLAY, BYPASS = "PaRaApply", "Apply PaRa", False

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.DISPLAY,
            category=CATEGORY,
            description="Patch a model with a PaRa (for example the output of Merge PaRa): W - Q(QᵀW) per layer, "
                        "stage by stage for a sequential merge." + (_BYPASS_NOTE if cls.BYPASS else ""),
            is_experimental=True,
            inputs=[
                _model_in(),
                _clip_in(),
                Para.Input("para", tooltip="The PaRa to apply (from Load PaRa File, Load PaRa or Merge PaRa)."),
                *_strength_inputs(),
                _block_strength_in(),
            ],
            outputs=_outputs(),
            hidden=[ui_text.NODE_ID],
        )

    @classmethod
    def execute(cls, model, para, strength_model, strength_clip, clip=None, block_strength="") -> io.NodeOutput:
        m, c, text = _run(f"{cls.DISPLAY} ({para.source})", apply_para, para, model, clip, strength_model, strength_clip,
                          block_strength or "", cls.BYPASS)
        return io.NodeOutput(m, c, ui=ui_text.report(cls, text))


class PaRaLoaderBypass(PaRaLoader):
    """Load PaRa without touching the weights (ComfyUI's bypass mode, as core Load LoRA (Bypass))."""

    NODE_ID, DISPLAY, BYPASS = "PaRaLoaderBypass", "Load PaRa (Bypass)", True


class PaRaApplyBypass(PaRaApply):
    """Apply PaRa without touching the weights (bypass mode)."""

    NODE_ID, DISPLAY, BYPASS = "PaRaApplyBypass", "Apply PaRa (Bypass)", True


class PaRaMerge(io.ComfyNode):
    """Combine two subjects' PaRa into one (multi-subject generation)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PaRaMerge",
            display_name="Merge PaRa",
            category=CATEGORY,
            description="Merge two PaRa. sequential: W1 = W - Q_aQ_aᵀW, then W1 - Q_bQ_bᵀW1 (the paper's merge; order "
                        "matters). union: remove span([Q_a Q_b]) at once (order-free). They agree when the subspaces "
                        "are orthogonal; after a run the node shows how much they overlap (principal angles) below its widgets.",
            is_experimental=True,
            inputs=[
                Para.Input("para_a", tooltip="The first PaRa (applied first in sequential mode)."),
                Para.Input("para_b", tooltip="The second PaRa."),
                io.Combo.Input("mode", options=list(MERGE_MODES), default="sequential",
                               tooltip="sequential: apply a, then b to the result (paper). union: project out the union "
                                       "of both subspaces in one step."),
            ],
            outputs=[Para.Output(display_name="PARA", tooltip="The merged PaRa: connect it to Apply PaRa or Save PaRa.")],
            hidden=[ui_text.NODE_ID],
        )

    @classmethod
    def execute(cls, para_a, para_b, mode) -> io.NodeOutput:
        try:
            merged = merge([para_a, para_b], mode, dtype=_storage_dtype(para_a, para_b))
            overlap = subspace_overlap(para_a, para_b).summary()
        except ParaError as e:
            raise ValueError(f"Merge PaRa ({para_a.source} + {para_b.source}): {e}") from None
        merged.source = f"merge {mode}({para_a.source}, {para_b.source})"
        return io.NodeOutput(merged, ui=ui_text.report(cls, f"overlap: {overlap}\n{mode} merge: {para_line(merged)}"))


def _storage_dtype(*paras: ParaModel) -> torch.dtype:
    """Store the merge as precisely as its inputs: all-fp16 stays fp16 (small files), anything else fp32."""
    dtypes = {t.dtype for p in paras for t in p.tensors.values()}
    if len(dtypes) == 1 and dtypes <= {torch.float16, torch.bfloat16}:
        return dtypes.pop()
    return torch.float32


class PaRaLoRACombine(io.ComfyNode):
    """A PaRa and a style LoRA on the same model, combined per layer."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PaRaLoRACombine",
            display_name="PaRa + LoRA",
            category=CATEGORY,
            description="Apply a PaRa (subject) and a LoRA (style) together: one update ΔW = U@D per layer, computed from "
                        "the base weight W0. stacked: -α1²·QQᵀW0 + α2²·BA, i.e. at α = 1 exactly 'PaRa first, then LoRA' "
                        "(the order the paper recommends; LoRA first would project the LoRA away). product: the literal "
                        "(-α1Q + α2B)(α1QᵀW0 + α2A), with cross terms; needs equal ranks. Layers with only a LoRA get "
                        "α2²·BA, layers with only PaRa -α1²·QQᵀW0. Only plain LoRA files (no LoHa/LoKr/DoRA/LoCon mid).",
            is_experimental=True,
            inputs=[
                _model_in(),
                _clip_in(),
                Para.Input("para", tooltip="The PaRa (subject), from Load PaRa or Merge PaRa. Connect it to this node only: "
                                           "use the model from before Load PaRa, or it is applied twice."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file from models/loras (plain B@A LoRA, any key naming ComfyUI reads)."),
                io.Float.Input("alpha_para", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="α1, the PaRa factor scale. The PaRa term scales with α1² in both modes."),
                io.Float.Input("alpha_lora", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="α2, the LoRA factor scale. The LoRA term scales with α2² in both modes."),
                io.Combo.Input("mode", options=list(COMBINE_MODES), default="stacked",
                               tooltip="stacked: -α1²·QQᵀW0 + α2²·BA (PaRa then LoRA, any ranks). product: "
                                       "(-α1Q + α2B)(α1QᵀW0 + α2A), the formula with cross terms; PaRa and LoRA ranks must match."),
            ],
            outputs=_outputs(),
            hidden=[ui_text.NODE_ID],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **kwargs):
        return _fingerprint("loras", lora_name)

    @classmethod
    def execute(cls, model, para, lora_name, alpha_para, alpha_lora, mode, clip=None) -> io.NodeOutput:
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise ValueError(f"PaRa + LoRA: LoRA file '{lora_name}' not found in the loras folders")
        try:
            lora_sd = comfy.utils.load_torch_file(path, safe_load=True)
        except Exception as e:
            raise ValueError(f"PaRa + LoRA: cannot read LoRA file {path}: {e}") from None
        m, c, text = _run(f"PaRa + LoRA ({para.source} + {lora_name})", apply_para_lora,
                          para, lora_sd, path, model, clip, alpha_para, alpha_lora, mode)
        return io.NodeOutput(m, c, ui=ui_text.report(cls, text))


def save_location(prefix: str, out_dir: str) -> tuple[str, str, str]:
    """(folder, file name stem, subfolder) of a Save PaRa filename_prefix under `out_dir` (the pack's one
    prefix rule, nodes/paths.py). Raises ValueError, one line, naming the prefix."""
    return paths.resolve_prefix("Save PaRa", prefix, out_dir)


def next_number(folder: str, stem: str) -> int:
    """1 + the highest NNNNN of this node's own files `<stem>_NNNNN_.safetensors` in `folder` (1 if none).

    Only that exact pattern counts: the trainer's `<stem>_<step>_steps_<n>_.safetensors` (same prefix) and
    any other file are ignored, so they never shift the numbering.
    """
    own = re.compile(re.escape(stem) + r"_(\d{5,})_\.safetensors")
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 1
    return 1 + max((int(m.group(1)) for m in map(own.fullmatch, names) if m), default=0)


class PaRaSave(io.ComfyNode):
    """Write a PARA (for example a merge) to output/para, next to files Load PaRa lists."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PaRaSave",
            display_name="Save PaRa",
            category=CATEGORY,
            description="Save a PaRa as a .safetensors file under the output folder, numbered <prefix>_00001_, _00002_, ... "
                        "by its own files only (never overwrites). Files in output/para are listed by Load PaRa.",
            is_experimental=True,
            is_output_node=True,
            inputs=[
                Para.Input("para", tooltip="The PaRa to save."),
                io.String.Input("filename_prefix", default="para/ComfyUI_para",
                                tooltip="Relative path under the output folder (e.g. para/my_subject): plain names, "
                                        "at most 200 bytes; '_00001_.safetensors' and so on is appended. Checked "
                                        "before the prompt runs."),
            ],
            outputs=[],
            hidden=[ui_text.NODE_ID],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None):
        """Before any node of the prompt runs (a trainer upstream included)."""
        return paths.validate_prefix("Save PaRa", filename_prefix)

    @classmethod
    def execute(cls, para, filename_prefix) -> io.NodeOutput:
        folder, stem, subfolder = save_location(filename_prefix, folder_paths.get_output_directory())
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise ValueError(f"Save PaRa: cannot create folder {folder}: {e.strerror or e}") from None
        number = next_number(folder, stem)
        while True:
            name = f"{stem}_{number:05}_.safetensors"
            path = os.path.join(folder, name)
            try:
                para.save(path)  # temp file + rename; refuses to overwrite
                break
            except ParaError as e:
                if os.path.exists(path):  # another writer took this number meanwhile: take the next one
                    number += 1
                    continue
                raise ValueError(f"Save PaRa: {e}") from None
        rel = f"{subfolder}/{name}" if subfolder else name
        log.info("PaRa: saved %s", path)
        return io.NodeOutput(ui=ui_text.report(cls, f"saved {rel}\n{para_line(para)}"))


class PaRaLoadFile(io.ComfyNode):
    """Read a PaRa file as a PARA value, without a model (for Merge PaRa, Hook PaRa, Apply PaRa, Save PaRa)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PaRaLoadFile",
            display_name="Load PaRa File",
            category=CATEGORY,
            description="Read a PaRa file from models/para or output/para and output it as PARA, without patching "
                        "any model: the input of Merge PaRa, PaRa + LoRA, Hook PaRa and Apply PaRa.",
            is_experimental=True,
            inputs=[io.Combo.Input("para_name", options=paths.para_options(),
                                   tooltip="A .safetensors PaRa file from models/para or output/para (Save PaRa's files "
                                           "first, then Train PaRa's save_every checkpoints, newest step first).")],
            outputs=[Para.Output(display_name="PARA", tooltip="The PaRa of the file.")],
            hidden=[ui_text.NODE_ID],
        )

    @classmethod
    def validate_inputs(cls, para_name=None):
        return paths.para_name_problem("Load PaRa File", para_name)

    @classmethod
    def fingerprint_inputs(cls, para_name, **kwargs):
        return _fingerprint("para", para_name)

    @classmethod
    def execute(cls, para_name) -> io.NodeOutput:
        para = load_para_file(para_name)
        return io.NodeOutput(para, ui=ui_text.report(cls, para_line(para)))


NODES = [PaRaLoader, PaRaLoaderBypass, PaRaLoadFile, PaRaApply, PaRaApplyBypass, PaRaMerge, PaRaLoRACombine, PaRaSave]

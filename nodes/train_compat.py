"""Make ComfyUI's inference-oriented model code differentiable for the duration of a training run.

ComfyUI's diffusion models are written for sampling, and two things in them break ``backward()``
(measured on ComfyUI 0.8.0 with tiny instances of 19 families, see tests/integration/test_families.py):

1. **RoPE through comfy_kitchen.** ``comfy/ldm/flux/math.py`` binds ``apply_rope``/``apply_rope1`` to
   ``comfy_kitchen``'s custom ops (``torch.ops.comfy_kitchen.apply_rope*``), which have no autograd formula
   ("Trying to backward through comfy_kitchen.apply_rope.default ..."). Flux, Chroma, HunyuanVideo /
   HunyuanImage, Qwen-Image, Wan, Lumina 2 / Z-Image, HiDream and Kandinsky import these names into their own
   module namespaces. Fix: while training, every module-level binding of a kitchen RoPE function in
   ``comfy.*`` (and the kitchen module's own attributes, which ``comfy.quant_ops.ck`` exposes) points to the
   same function of kitchen's pure-torch ``eager`` backend - the code ComfyUI itself runs when kitchen's
   kernels are unavailable - which autograd differentiates.
2. **In-place updates of tensors that autograd saved.** The residual updates ``img += ...``/``txt += ...``/
   ``x += ...`` in ``comfy/ldm/flux/layers.py`` (DoubleStreamBlock, SingleStreamBlock; Chroma and Hunyuan
   reuse them) overwrite the block input that the preceding norm saved for backward, and LTX's
   ``BasicTransformerBlock`` does the same with ``x.addcmul_(...)`` and ``x += ...``
   (``comfy/ldm/lightricks/model.py``) ("one of the variables needed for gradient computation has been
   modified by an inplace operation"). Fix: while training, every tensor autograd saves that is part of the
   graph (``requires_grad``) is saved as a copy (``torch.autograd.graph.saved_tensors_hooks``), so a later
   in-place update cannot change what backward reads. The forward itself runs unchanged, op for op, so
   it computes exactly what sampling computes; the gradient is exactly that of the out-of-place code.
   Gradient checkpointing needs one more step: inside a checkpointed unit torch's own hooks take over and
   the recomputation in backward stores *aliases* of saved tensors, which the unit's in-place updates then
   overwrite (silently wrong gradients, measured). So every composite module of the diffusion model gets a
   forward wrapper that, when it runs under another saved-tensor hook (checkpointing's), hands that hook a
   copy instead of the live tensor, and gives the unit copies of its tensor arguments: checkpointing
   recomputes from the inputs it saved, and Flux's blocks update ``txt`` in place even where it does not
   require grad (so no saved-tensor hook sees it). Nested wrappers and the outer context do not copy twice.
   Cost: one copy of each saved activation (the originals are no longer kept by autograd, so the peak grows
   by the activations the forward code itself still holds, typically the residual stream); nothing for
   frozen weights, which never require grad. So this part is switched on only for the families that need it
   (Flux, Chroma, Hunyuan, LTX) and for families the pack does not know; the RoPE part costs nothing.

3. **`out=` writes.** The Llama/Qwen3 blocks in ``comfy/text_encoders/llama.py``, which HiDream-O1 runs as its
   transformer, end with ``torch.add(residual, x, out=<block input>)``; autograd refuses ``out=``. Fix: while
   training, that module's ``torch`` is a shim whose ``add`` leaves out ``out=`` when autograd records the op
   (same values; the block returns the sum, only the overwrite of its input is skipped).

Everything is undone on exit, also on exceptions: module bindings and forwards are restored to the exact
objects they were, and the hook is popped, so sampling in the same process afterwards is bit-identical to a
process that never trained (asserted in tests/integration/test_families.py).
"""
from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ..para_core.forward_patch import wrap_forwards
from ..para_core.families import FAMILIES, family_of

log = logging.getLogger(__name__)

# kitchen's model-math ops (not its quantization kernels): RoPE, and the fused RMSNorm + adaLN modulation that
# ComfyUI 0.33's LTX / Lumina-style blocks call (`ck.rms_adaln`), equally without an autograd formula.
_ROPE_PREFIXES = ("apply_rope", "rms_rope", "rms_adaln", "adaln")
_MODULE_PREFIXES = ("comfy.", "comfy_extras.")


# ---- 1. RoPE: kitchen custom ops -> kitchen's pure-torch backend ------------------------------------
def _kitchen_rope_replacements() -> dict[int, tuple[object, object]]:
    """{id(kitchen op wrapper): (wrapper, eager function)} for the out-of-place RoPE functions; {} without kitchen."""
    try:
        import comfy.quant_ops
        ck = getattr(comfy.quant_ops, "ck", None)
        if ck is None:
            return {}
        import comfy_kitchen.backends.eager as eager
    except Exception:  # no kitchen: flux/math.py already uses its own pure-torch RoPE
        return {}
    out = {}
    for name in dir(eager):
        if name.startswith(_ROPE_PREFIXES) and not name.endswith("_"):
            fn, pure = getattr(ck, name, None), getattr(eager, name)
            if callable(fn) and fn is not pure:
                out[id(fn)] = (fn, pure)
    return out


def _route_rope_through_autograd() -> Callable[[], None]:
    """Rebind every module-level reference to a kitchen RoPE op to its eager version. Returns the undo."""
    table = _kitchen_rope_replacements()
    if not table:
        return lambda: None
    import comfy.quant_ops
    swapped: list[tuple[object, str, object]] = []
    modules = [m for n, m in list(sys.modules.items()) if m is not None and n.startswith(_MODULE_PREFIXES)]
    modules.append(comfy.quant_ops.ck)
    for mod in modules:
        namespace = getattr(mod, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            hit = table.get(id(value))
            if hit is not None and hit[0] is value:
                swapped.append((mod, name, value))
                setattr(mod, name, hit[1])
    log.debug("PaRa training: %d RoPE bindings routed through comfy_kitchen's eager backend", len(swapped))

    def restore():
        for mod, name, value in reversed(swapped):
            setattr(mod, name, value)
    return restore


# ---- 3. `out=` writes: the Llama/Qwen3 blocks HiDream-O1 runs as its transformer -------------------------
# comfy/text_encoders/llama.py ends each block with torch.add(residual, x, out=<block input>), which autograd refuses
# ("functions with out=... arguments don't support automatic differentiation").
_OUT_WRITING_MODULES = ("comfy.text_encoders.llama",)


class _TorchWithoutOutWhileRecording(types.ModuleType):
    """torch, except that add(..., out=t) returns a new tensor while autograd records it (same values; the block
    returns the result, so only the overwrite of its input is skipped); untouched otherwise."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def add(*args, out=None, **kwargs):
        if out is None or (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            return torch.add(*args, **kwargs)
        return torch.add(*args, out=out, **kwargs)


def _drop_out_writes_while_recording() -> Callable[[], None]:
    """Point the `torch` of the modules above (when loaded) at the shim; returns the undo."""
    shim = _TorchWithoutOutWhileRecording("torch")
    swapped = [m for m in (sys.modules.get(n) for n in _OUT_WRITING_MODULES) if m is not None and m.__dict__.get("torch") is torch]
    for m in swapped:
        m.torch = shim

    def restore():
        for m in swapped:
            m.torch = torch
    return restore


# ---- 2. saved tensors: copies, so in-place updates after the save cannot reach backward -------------
def _snapshot(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone() if t.requires_grad else t.detach()


def _copy(v):
    return v.clone() if isinstance(v, torch.Tensor) else v


def _identity(t):
    return t


def _mark(fn):
    fn._para_snapshot = True
    return fn


# The innermost saved-tensor hooks (None if none). Private torch API; without it (older torch) every wrapper
# pushes its own hook, also inside checkpointed units, which then keep copies of their activations: still
# exact, but checkpointing saves no memory there (untested: the torch versions used here have the API).
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda ignore_is_tracing: None)


class _SnapshotSaves:
    """saved_tensors_hooks that save copies of graph tensors. Under another hook (checkpointing's) it passes
    that hook a copy instead of the live tensor; under one of its own it does nothing (no double copy)."""

    def __enter__(self):
        top = _top_hooks(False)
        self.pushed = False
        self.under_foreign_hook = top is not None and not getattr(top[0], "_para_snapshot", False)
        if top is not None and not self.under_foreign_hook:
            return self
        if top is None:
            pack, unpack = _mark(_snapshot), _identity
        else:
            outer_pack, unpack = top
            pack = _mark(lambda t: outer_pack(_snapshot(t)))
        torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)
        self.pushed = True
        return self

    def __exit__(self, *exc):
        if self.pushed:
            torch._C._autograd._pop_saved_tensors_default_hooks()
        return False


def _composite_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules with children that have a forward of their own (blocks, not ModuleList/ModuleDict)."""
    return [m for m in root.modules() if next(m.children(), None) is not None
            and not isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict))]


def _wrap_forwards(modules: list[torch.nn.Module]) -> Callable[[], None]:
    """Run each module's forward under _SnapshotSaves (see the module docstring). Returns the undo."""
    def make_forward(_m, inner):
        def forward(*args, **kwargs):
            with _SnapshotSaves() as saves:
                if saves.under_foreign_hook:  # a checkpointed unit: it must not update the inputs checkpoint recomputes from
                    args = tuple(_copy(a) for a in args)
                    kwargs = {k: _copy(v) for k, v in kwargs.items()}
                return inner(*args, **kwargs)
        return forward
    return wrap_forwards(modules, make_forward)


def _diffusion_model(model) -> torch.nn.Module:
    """The torch module that holds the blocks: ModelPatcher -> BaseModel -> diffusion_model."""
    base = getattr(model, "model", model)
    dm = getattr(base, "diffusion_model", None)
    if isinstance(dm, torch.nn.Module):
        return dm
    if isinstance(base, torch.nn.Module):
        return base
    raise TypeError(f"training_compat: expected a ModelPatcher, a BaseModel or a torch module, got {type(model).__name__}")


def updates_saved_tensors_in_place(model) -> bool:
    """Whether training this model needs the saved-tensor copies (part 2): True unless its family is one whose
    forward was measured not to update saved tensors in place (plain and checkpointed training give the same
    gradients without the copies; tests/integration/test_families.py): the record's ``in_place_safe``.
    Unknown families get the copies."""
    family = family_of(model)
    return family is None or not FAMILIES[family].in_place_safe


@contextmanager
def training_compat(model) -> Iterator[None]:
    """Inside: the model (ModelPatcher, BaseModel or diffusion model) can be trained (see the module docstring).
    Enter it before the trainer wraps layers or enables gradient checkpointing, so undo happens in reverse order."""
    dm = _diffusion_model(model)
    undo: list[Callable[[], None]] = []
    hooks = _SnapshotSaves() if updates_saved_tensors_in_place(model) else None
    try:
        undo.append(_route_rope_through_autograd())
        undo.append(_drop_out_writes_while_recording())
        if hooks is not None:
            undo.append(_wrap_forwards(_composite_modules(dm)))
            hooks.__enter__()
        try:
            yield
        finally:
            if hooks is not None:
                hooks.__exit__(None, None, None)
    finally:
        for u in reversed(undo):
            u()

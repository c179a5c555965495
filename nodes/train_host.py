"""Train PaRa's host glue: everything the trainer does *to ComfyUI* for a run, and its exact undo.

``para_core.train`` holds the host-independent training (config, loss, batching draw, the step loop,
sidecar); ``nodes/nodes_train.py`` the node and the run's data flow. This module is what sits between
them and ComfyUI's model:

* `borrow_for_training`: the one undo stack (a ``contextlib.ExitStack``) of a run: a clone loaded with
  the compute dtype, the compat patches below, normal-tensor aliases of the inference-tensor parameters
  (`alias_inference_tensors`), and at the end `SharedModel.restore`, which gives the shared torch model
  back exactly as it was. The trainer pushes its own undos (PaRa forwards, checkpointing) on the same stack.
* the comfy-op views the PaRa layers need (`trainable_layers`, `comfy_weight_of`, `comfy_bias_of`);
* the loss forward (`prediction_error`: noise, model, error in the model's prediction space) used by the
  trainer, the validation loss and the benchmarks; `sampling_space`, `prediction_scale_of`, `host_sampling`;
* ComfyUI's conditioning in training form (`own_conds`, `batch_conds`).

Why a run needs compat patches at all (`training_compat`: ComfyUI's inference-oriented model code made
differentiable for the duration of a run). ComfyUI's diffusion models are written for sampling, and four things
in them break ``backward()`` (measured with tiny instances of every family, tests/integration/test_families.py):

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

4. **Caches across calls** (HiDream-O1's text K/V, ``nodes/model_caches.py``). In training every step has other
   weights: a cache made by the previous step's forward still holds that step's graph, so the second
   ``backward()`` fails ("Trying to backward through the graph a second time"); one made by sampling before
   training holds K/V of other weights, which the trainer would silently train against. Fix: while training,
   the cache is cleared before and after each forward of the diffusion model, and on entry and exit.

Everything is undone on exit, also on exceptions: module bindings and forwards are restored to the exact
objects they were, and the hook is popped, so sampling in the same process afterwards is bit-identical to a
process that never trained (asserted in tests/integration/test_families.py).
"""
from __future__ import annotations

import copy
import functools
import logging
import sys
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext

import torch

import comfy.model_management
import comfy.ops

from ..para_core.families import FAMILIES, family_of
from ..para_core.forward_patch import wrap_forwards
from ..para_core.train import prediction_residual, prediction_scale
from .model_caches import cleared_around, cross_call_cache_clearer

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


# ---- 4. caches across calls: none survives a forward while training ------------------------------------
def _fresh_caches_per_forward(dm: torch.nn.Module) -> Callable[[], None]:
    """Clear dm's cross-call caches now, before and after each of its forwards, and on undo (part 4 of the
    module docstring). Returns the undo; a no-op for models without such caches."""
    clear = cross_call_cache_clearer(dm)
    if clear is None:
        return lambda: None
    clear()
    unwrap = wrap_forwards([dm], lambda _m, inner: cleared_around(clear, inner))

    def restore():
        unwrap()
        clear()
    return restore


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
    with ExitStack() as undo:
        undo.callback(_route_rope_through_autograd())
        undo.callback(_drop_out_writes_while_recording())
        undo.callback(_fresh_caches_per_forward(dm))
        if updates_saved_tensors_in_place(model):
            undo.callback(_wrap_forwards(_composite_modules(dm)))
            undo.enter_context(_SnapshotSaves())
        yield


# ---- conditioning in training form ------------------------------------------------------------------------
def own(t):
    """A normal (non-inference) copy of a tensor; other values unchanged."""
    return t.clone() if isinstance(t, torch.Tensor) else t


def own_conds(conds: list[dict]) -> list[dict]:
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
                v = v._copy_with([own(x) for x in inner])
            mc[k] = v
        c["model_conds"] = mc
        out.append(c)
    return out


def batch_conds(conds: list[dict]) -> dict:
    """The model kwargs of a batch in which sample i has caption conds[i] (captions paired, not averaged)."""
    per = [{k: v.process_cond(batch_size=1, area=None) for k, v in c["model_conds"].items()} for c in conds]
    return {k: per[0][k].concat([p[k] for p in per[1:]]) for k in per[0]}


# ---- the shared model: borrowed for a run, given back as it was ----------------------------------------
def _alias(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor on the storage of inference tensor t (no copy): autograd may save it for backward."""
    a = torch.empty(0, dtype=t.dtype, device=t.device)
    return a.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def alias_inference_tensors(model: torch.nn.Module) -> Callable[[], None]:
    """Put normal-tensor aliases in place of inference-tensor parameters and buffers (same storage);
    returns the undo, which puts the original objects back.

    Backward through a frozen layer must save its weight, and inference tensors (what the executor's
    inference_mode loads) cannot be saved. An alias costs no memory and no copy, unlike identity weight
    wrappers (a weight copy per forward).
    """
    swapped = []
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_inference() and type(p.data) is torch.Tensor:
                q = torch.nn.Parameter(_alias(p.detach()), requires_grad=False)
                q.__dict__.update(p.__dict__)
                m._parameters[name] = q
                swapped.append((m._parameters, name, p, q))
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_inference() and type(b) is torch.Tensor:
                a = _alias(b)
                m._buffers[name] = a
                swapped.append((m._buffers, name, b, a))
    log.debug("Train PaRa: %d inference tensors aliased as normal tensors", len(swapped))

    def undo() -> None:
        for where, name, original, alias in reversed(swapped):
            if where.get(name) is alias:
                where[name] = original
    return undo


def module_state(m: torch.nn.Module) -> dict:
    """Every attribute of a module, with the contents of its lists and dicts (weight_function, _parameters,
    _buffers, hooks, ...): what ComfyUI's load, our aliases and forward wrappers can change."""
    state = {}
    for k, v in m.__dict__.items():
        if isinstance(v, list):
            state[k] = (v, list(v))
        elif isinstance(v, dict):
            state[k] = (v, dict(v))
        else:
            state[k] = (v, None)
    return state


def restore_module(m: torch.nn.Module, state: dict) -> None:
    """Put back what `module_state` recorded: the same objects, with the same contents."""
    d = m.__dict__
    for k in [k for k in d if k not in state]:
        del d[k]
    for k, (obj, contents) in state.items():
        if isinstance(obj, list):
            obj[:] = contents
        elif isinstance(obj, dict):
            obj.clear()
            obj.update(contents)
        d[k] = obj


class SharedModel:
    """The torch model under the input ModelPatcher is shared with every other node that uses it. A run
    loads it through a clone (compute dtype, full load), aliases its inference tensors and wraps forwards;
    `restore` gives it back as it was, whatever happened.

    Exactly as before (objects, values, flags, ComfyUI's loaded-model list) when the weights held no
    patches before the run, or the input model's own patches (it was loaded by the input model or an
    equal clone). If another patcher's patches were in the weights (a clone with other LoRAs was loaded
    last), ComfyUI's consistent alternative is used instead: the model is unloaded (base weights, no flags)
    and the next sampler loads it again, as after any model switch.
    """

    def __init__(self, source, patcher):
        self.patcher = patcher
        model = patcher.model
        self.modules = [(m, module_state(m)) for m in model.modules()]
        self.devices = [(t, t.device) for m in model.modules() for t in
                        list(m._parameters.values()) + list(m._buffers.values()) if t is not None]
        self.backup = dict(patcher.backup)
        self.object_patches_backup = dict(patcher.object_patches_backup)
        self.loaded = list(comfy.model_management.current_loaded_models)
        uuid = getattr(model, "current_weight_patches_uuid", None)
        lowvram = bool(getattr(model, "model_lowvram", False))
        self.exact = (uuid is None) or (uuid == source.patches_uuid and not lowvram)
        self.weights_unpatched = uuid is None

    def restore(self) -> None:
        mm = comfy.model_management
        mp = self.patcher
        mine = [lm for lm in mm.current_loaded_models if lm.model is mp]
        for lm in mine:
            mm.current_loaded_models.remove(lm)
            if lm.model_finalizer is not None:
                lm.model_finalizer.detach()
            lm.model_finalizer = None
            lm.real_model = None
        mp.cleanup()
        if not self.exact:
            mp.detach(unpatch_all=True)
            from comfy.model_patcher import wipe_lowvram_weight
            for m in mp.model.modules():
                wipe_lowvram_weight(m)
            log.info("Train PaRa: the model was loaded with other patches before training; it is unloaded now "
                     "(the next sampler loads it again)")
            return
        if self.weights_unpatched:
            mp.detach(unpatch_all=True)  # put back what the clone's own weight patches replaced
        else:
            mp.eject_model()
        for m, state in self.modules:
            restore_module(m, state)
        for t, device in self.devices:
            if t.device != device:
                t.data = t.data.to(device)
        mp.backup.clear()
        mp.backup.update(self.backup)
        mp.object_patches_backup.clear()
        mp.object_patches_backup.update(self.object_patches_backup)
        # ComfyUI's list of loaded models: load_models_gpu took out the clones of this model that were loaded
        # (they hold the same weights as before again, so they go back, with a live finalizer as on load)
        now = list(mm.current_loaded_models)
        keep = []
        for lm in self.loaded:
            if any(lm is x for x in now):
                keep.append(lm)
                continue
            real = lm.real_model() if lm.real_model is not None else None
            if lm.model is not None and lm.model.is_clone(mp) and real is not None:
                if lm.model_finalizer is None or not lm.model_finalizer.alive:
                    lm.model_finalizer = weakref.finalize(real, mm.cleanup_models)
                keep.append(lm)
        new = [x for x in now if not any(x is lm for lm in self.loaded)]
        mm.current_loaded_models[:] = new + keep


# ---- what this ComfyUI's own trainer offers (feature-detected, never by version) ----------------------------
@functools.lru_cache(maxsize=1)
def core_train_inputs() -> dict[str, object]:
    """The inputs of this ComfyUI's core Train LoRA node (comfy_extras.nodes_train.TrainLoraNode), by name;
    {} if it has none. Train PaRa offers the same-named inputs where the host's trainer does."""
    try:
        from comfy_extras.nodes_train import TrainLoraNode
        return {i.id: i for i in TrainLoraNode.define_schema().inputs}
    except Exception as e:  # no core trainer in this ComfyUI: Train PaRa keeps its own inputs only
        log.debug("Train PaRa: no core Train LoRA schema to follow (%s)", e)
        return {}


def host_offers(name: str) -> bool:
    """Whether this ComfyUI's Train LoRA has input `name` (and, where the input drives a host mechanism, the
    mechanism: `training_dtype_none` is the 'none' option of training_dtype; `quantized_backward` also needs
    comfy.model_management.training_fp8_bwd, which ComfyUI's quantized linear reads in backward)."""
    inputs = core_train_inputs()
    if name == "training_dtype_none":
        return "none" in (getattr(inputs.get("training_dtype"), "options", None) or ())
    if name == "quantized_backward":
        return name in inputs and hasattr(comfy.model_management, "training_fp8_bwd")
    return name in inputs


def native_compute_dtype(base) -> torch.dtype:
    """training_dtype 'none': the dtype the model computes in as loaded (its manual cast dtype if it has one,
    else its storage dtype); storage-only formats (fp8, quantized) compute in bf16, as core does."""
    dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16


def set_host_training_flags(stack: ExitStack, quantized_backward: bool = False) -> None:
    """The module flags ComfyUI's own trainer sets while it trains, where this ComfyUI has them (restored on
    exit): model_management.in_training (ops leave inference-only fast paths) and training_fp8_bwd (the
    quantized linear's backward runs as quantized matmuls)."""
    mm = comfy.model_management
    for name, value in (("in_training", True), ("training_fp8_bwd", bool(quantized_backward))):
        if hasattr(mm, name):
            stack.callback(setattr, mm, name, getattr(mm, name))
            setattr(mm, name, value)


def load_for_training(patcher, offloading: bool = False) -> None:
    """Load the clone for training: every weight on the device (as core Train LoRA does), or with
    `offloading` as much as ComfyUI's partial loading puts there - the rest stays on the CPU and ComfyUI's ops
    cast it to the device per layer and forward (core's offloading is the same call)."""
    comfy.model_management.load_models_gpu([patcher], memory_required=1e20, force_full_load=not offloading)


def borrow_for_training(model, dtype: torch.dtype | None, stack: ExitStack, offloading: bool = False,
                        quantized_backward: bool = False):
    """A clone of ModelPatcher `model` ready to train in `dtype` (None: the model's own compute dtype, nothing
    overridden), every change registered on `stack`.

    In this order (undone in the reverse): the clone and the snapshot of the shared model (before anything
    changes it), autograd on (the executor runs nodes under inference_mode), `training_compat`, the full
    load, the aliases of the inference tensors. Undone: aliases, then `SharedModel.restore` (the model as it
    was, ComfyUI's loaded list), then the compat patches. The caller pushes its own undos (forward
    wrappers) after this.
    """
    patcher = model.clone()
    if dtype is not None:
        patcher.set_model_compute_dtype(dtype)
    shared = SharedModel(model, patcher)
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(training_compat(patcher))
    set_host_training_flags(stack, quantized_backward)
    stack.callback(shared.restore)
    load_for_training(patcher, offloading)
    stack.callback(alias_inference_tensors(patcher.model))
    return patcher


# ---- layers ----------------------------------------------------------------------------------------
def trainable_layers(base_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules the core LoRA trainer would train: comfy ops with a ≥2-D weight, by name."""
    return {n: m for n, m in base_model.named_modules()
            if hasattr(m, "weight_function") and getattr(m, "weight", None) is not None and m.weight.ndim >= 2}


def comfy_weight_of(module, x):
    """Weight and bias as the comfy op would use them for input x (its cast and weight functions)."""
    if hasattr(module, "weight_function"):
        return comfy.ops.cast_bias_weight(module, x)
    dtype = x.dtype
    return module.weight.to(x.device, dtype), (module.bias.to(x.device, dtype) if module.bias is not None else None)


def comfy_bias_of(module, x):
    """The bias as the comfy op would add it for input x (its bias functions), or None."""
    b = getattr(module, "bias", None)
    if b is None:
        return None
    b = b.to(x.device)
    for f in getattr(module, "bias_function", ()):
        b = f(b)
    return b


# ---- loss forward ----------------------------------------------------------------------------------
def sampling_space(model_sampling) -> str:
    """The name of the model's prediction space: eps, v, x0, flow (or 'prediction' for other kinds)."""
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


def prediction_scale_of(model_sampling, sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """para_core.train.prediction_scale for a ComfyUI model_sampling."""
    return prediction_scale(model_sampling.calculate_denoised, sigma, ndim)


def prediction_error(base, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, model_kwargs: dict,
                     transformer_options: dict | None = None, space: str = "prediction",
                     autocast=None) -> torch.Tensor:
    """The training residual of one batch: x0 noised to σ with `noise`, denoised by ComfyUI's BaseModel `base`
    (apply_model, with the batch's conditioning `model_kwargs`), and the error against x0 in x0 space
    (space 'x0') or in the model's prediction space (any other value: ε, v or velocity, see
    `para_core.train.prediction_scale`). Float32. The loss the trainer, the validation loss and
    benchmarks/bench_train.py take is `para_core.train.loss_value` of this.
    """
    ms = base.model_sampling
    opts = dict(transformer_options or {}, sigmas=sigma, cond_or_uncond=[0] * x0.shape[0])
    with autocast if autocast is not None else nullcontext():
        xt = ms.noise_scaling(sigma, noise, x0, False)
        x0_pred = base.apply_model(xt, sigma, transformer_options=opts, **model_kwargs)
    scale = prediction_scale_of(ms, sigma, x0_pred.ndim) if space != "x0" else None
    return prediction_residual(x0_pred, x0, scale)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without waiting for the device's queue: a blocking copy from pageable memory
    synchronises the stream; from pinned memory the copy is queued (torch's pinned allocator keeps the
    source alive until it is done)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def host_sampling(model_sampling):
    """A CPU copy of the model's sampling schedule for percent_to_sigma (which calls .item()): drawing σ
    on the host then costs no device synchronisation per step. The model's own object where it already
    lives on the CPU or cannot be copied."""
    tensors = list(model_sampling.parameters()) + list(model_sampling.buffers())
    if all(t.device.type == "cpu" for t in tensors):
        return model_sampling
    try:
        with torch.inference_mode(False):
            return copy.deepcopy(model_sampling).to("cpu")
    except Exception:  # an exotic sampling object: correct, one sync per sample
        return model_sampling

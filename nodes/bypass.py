"""PaRa in bypass mode: the layer's weight is never touched; its output is projected instead.

For a layer y = Wx + b, PaRa's weight W - s·QQᵀW gives (W - s·QQᵀW)x + b = y - s·QQᵀ(y - b): the same edit,
applied to the output (`para_core.layer.project_output`, the form Train PaRa trains with). Stages of a
sequential merge apply in order, y_k = y_{k-1} - s·Q_kQ_kᵀ(y_{k-1} - b), exactly the weight chain. This is
what ComfyUI's bypass mode is for (ComfyUI 0.33's `LoraLoaderBypass`): fp8 / quantized weights, where
baking the patch rounds it into the storage format, and offloaded weights, which are never copied for
patching. Cost: 4·r·out flops per output position, every forward.

How it enters the model: one `PatcherInjection` under the key `para_bypass` (`ModelPatcher.set_injections`,
which ComfyUI calls when it loads the model and undoes when it unloads it) that registers a torch forward
hook per patched module. A forward hook composes with anything else that wraps `module.forward` (core's own
bypass LoRA) and is removed by its handle, whatever the order of ejection. A second bypass node on the same
model appends its entries to the same plan, so two in a row are the sequential merge. The PaRa projects
the layer's whole output, so it acts after weight patches and after core bypass LoRAs of that layer
("PaRa last").

Not covered: weight hooks (Hook PaRa patches weights), and layers whose output is not a tensor.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..para_core.errors import ParaError
from ..para_core.layer import project_output
from .keys import split_target

log = logging.getLogger(__name__)

INJECTION_KEY = "para_bypass"


def unavailable_reason() -> str:
    """'' if this ComfyUI can run PaRa in bypass mode, else one line saying what it lacks (feature-detected)."""
    try:
        import comfy.model_patcher
        import comfy.patcher_extension
    except Exception as e:  # pragma: no cover - every supported ComfyUI has both modules
        return f"this ComfyUI cannot run PaRa in bypass mode ({e}); use Load PaRa"
    if not hasattr(comfy.patcher_extension, "PatcherInjection") or not hasattr(comfy.model_patcher.ModelPatcher, "set_injections"):
        return ("this ComfyUI cannot run PaRa in bypass mode: it has no model injections "
                "(ModelPatcher.set_injections); use Load PaRa, which patches the weights, or update ComfyUI")
    return ""


@dataclass(frozen=True)
class BypassEntry:
    """One PaRa on one module's output: stages (float32, in the model's row layout) on rows [start, start+rows)."""

    stages: tuple[torch.Tensor, ...]
    strength: float
    start: int = 0
    rows: int | None = None


def _channel_dim(module: torch.nn.Module, y: torch.Tensor) -> int:
    """Where the output channels are: dim 1 for a conv's (B, C, ...) output, the last dim otherwise."""
    is_conv = isinstance(module, torch.nn.modules.conv._ConvNd) or "conv" in type(module).__name__.lower()
    return 1 if is_conv and y.ndim >= 3 else -1


def _bias(module: torch.nn.Module, y: torch.Tensor) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    if b is None:
        return None
    if hasattr(b, "dequantize"):  # a quantized tensor (mixed-precision ops)
        b = b.dequantize()
    return b.detach().to(device=y.device, dtype=torch.float32)


def project_module_output(module: torch.nn.Module, y: torch.Tensor, entries: list[BypassEntry]) -> torch.Tensor:
    """y with every entry's projection applied in order, computed in float32 and rounded once to y's dtype."""
    dim = _channel_dim(module, y)
    out = y.to(torch.float32)
    bias = _bias(module, y)
    for e in entries:
        rows = out.shape[dim] - e.start if e.rows is None else e.rows
        part = out.narrow(dim, e.start, rows)
        b = None if bias is None else bias.narrow(0, e.start, rows)
        for q in e.stages:
            part = project_output(part, q.to(out.device), b, dim, e.strength)
        if e.start == 0 and rows == out.shape[dim]:
            out = part
        else:
            out = out.clone() if out is y else out
            out.narrow(dim, e.start, rows).copy_(part)
    return out.to(y.dtype)


class ParaBypassInjection:
    """The `para_bypass` injection of one model patcher: {module name: [entries]}, hooks registered while injected.

    Shared between clones of the patcher (ComfyUI copies the injection list, not its items), so hook handles are
    kept per patcher. The plan is never mutated: a further bypass node builds a new injection.
    """

    def __init__(self, plan: dict[str, list[BypassEntry]]):
        self.plan = plan
        self._handles: dict[int, list] = {}

    def inject(self, model_patcher) -> None:
        import comfy.utils
        handles = self._handles.setdefault(id(model_patcher), [])
        if handles:
            return
        for name, entries in self.plan.items():
            module = comfy.utils.get_attr(model_patcher.model, name)
            handles.append(module.register_forward_hook(_hook(entries)))

    def eject(self, model_patcher) -> None:
        for h in self._handles.pop(id(model_patcher), []):
            h.remove()

    def as_patcher_injection(self):
        import comfy.patcher_extension
        inj = comfy.patcher_extension.PatcherInjection(inject=self.inject, eject=self.eject)
        inj.para_plan = self
        return inj


def _hook(entries: list[BypassEntry]):
    def hook(module, args, output):
        return project_module_output(module, output, entries) if isinstance(output, torch.Tensor) else output
    return hook


def current_plan(patcher) -> dict[str, list[BypassEntry]]:
    """The PaRa bypass plan already on a patcher ({} if none)."""
    for inj in patcher.get_injections(INJECTION_KEY) or []:
        plan = getattr(inj, "para_plan", None)
        if plan is not None:
            return plan.plan
    return {}


def entries_from_patches(groups: dict[float, dict]) -> list[tuple[str, BypassEntry]]:
    """(module name, entry) per patch of `patching.grouped_patches` ({strength: {target: ParaAdapter}}).

    A fused target ('key', (0, start, rows)) projects those output rows; a key-map `function` (ComfyUI's
    scale/shift swap, a permutation of rows) maps each Q from the file's row layout to the model's.
    """
    out = []
    for strength, patches in groups.items():
        for target, adapter in patches.items():
            key, offset, function = split_target(target)
            stages = tuple(function(q) if function is not None else q for q in adapter.weights)
            start, rows = (0, None) if offset is None else (int(offset[1]), int(offset[2]))
            out.append((key[: -len(".weight")], BypassEntry(stages, float(strength), start, rows)))
    return out


def add_bypass(patcher, entries: list[tuple[str, BypassEntry]]) -> int:
    """Append PaRa bypass entries to a (cloned) patcher's plan; returns how many layers the plan now covers."""
    why = unavailable_reason()
    if why:
        raise ParaError(why)
    plan = {k: list(v) for k, v in current_plan(patcher).items()}
    for name, entry in entries:
        plan.setdefault(name, []).append(entry)
    patcher.set_injections(INJECTION_KEY, [ParaBypassInjection(plan).as_patcher_injection()])
    return len(plan)

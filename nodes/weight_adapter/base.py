"""What the pack's adapters share: float32 math on ComfyUI's running weight, rounded once."""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.weight_adapter

log = logging.getLogger(__name__)


def add_rounding_once_(weight: torch.Tensor, diff: torch.Tensor) -> None:
    """weight += diff (float32) in place, rounding once to the weight's dtype.

    `weight += diff.half()` would round the diff first: PaRa's diff can nearly cancel the weight
    (a component removed entirely), and then the diff's own rounding error is many ulps of the result.
    """
    if weight.dtype == torch.float32:
        weight += diff
    else:
        weight.copy_(weight.to(torch.float32).add_(diff))


def float32_on(tensors, device) -> list[torch.Tensor]:
    """The adapter's tensors as float32 on the weight's device (no copy when they already are)."""
    return [comfy.model_management.cast_to_device(t, device, torch.float32) for t in tensors]


class PackAdapter(comfy.weight_adapter.WeightAdapterBase):
    """ComfyUI's contract: `cls(loaded_keys, weights)`, all tensors in `weights`, never mutated afterwards
    (instances are shared between model clones); `calculate_weight` edits the weight in place in float32
    and logs instead of raising (ComfyUI's convention: a broken patch leaves the weight alone)."""

    name = "para_base"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = set(loaded_keys or ())
        self.weights = tuple(weights)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        if strength == 0:
            return weight
        try:
            with torch.no_grad():  # a patch is never differentiated; tensors may be inference tensors (made in a node)
                self.apply_(weight, float(strength), function, key)
        except Exception as e:
            logging.error("ERROR %s %s %s", self.name, key, e)
        return weight

    def apply_(self, weight: torch.Tensor, strength: float, function, key) -> None:
        raise NotImplementedError

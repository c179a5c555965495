"""accelerate's CPU multi-process path made to treat a frozen model as its GPU path does (test-only shim).

With several processes on GPUs, `Accelerator.prepare_model` wraps a model in DistributedDataParallel only if it has
a parameter that requires a gradient (sd-scripts relies on this: it prepares the frozen UNet and text encoders as
well as the network). On CPU (DistributedType.MULTI_CPU, gloo) accelerate 1.6 wraps every model, and DDP refuses
a model without trainable parameters ("DistributedDataParallel is not needed when a module doesn't have any
parameter that requires a gradient"), so sd-scripts stops at `accelerator.prepare(unet)`. This shim changes only
that: on MULTI_CPU a model without trainable parameters is prepared with ``evaluation_mode=True`` (placed on the
device, not wrapped), exactly what the GPU path does. The network itself (trainable) is still wrapped in DDP, and
gradients are synchronised by sd-scripts' own `all_reduce_network`, as on GPUs. Nothing here ships with the pack.

``python cpu_ddp_shim.py SCRIPT ARGS...`` installs the shim and runs SCRIPT as ``__main__`` (for torchrun).
"""
from __future__ import annotations

import runpy
import sys


def install() -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    if getattr(Accelerator.prepare_model, "_para_shim", False):
        return
    orig = Accelerator.prepare_model

    def prepare_model(self, model, device_placement=None, evaluation_mode=False):
        if self.distributed_type == DistributedType.MULTI_CPU and not any(p.requires_grad for p in model.parameters()):
            evaluation_mode = True
        return orig(self, model, device_placement, evaluation_mode)
    prepare_model._para_shim = True
    Accelerator.prepare_model = prepare_model


if __name__ == "__main__":
    install()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(script)))
    runpy.run_path(script, run_name="__main__")

"""Run an sd-scripts trainer (``python kohya_timed.py OUT.json SCRIPT ARGS...``) and record, from inside the process,
the time of every optimizer step (a global optimizer step hook: no change to sd-scripts), the peak resident memory
and, on CUDA, the peak allocated memory. Used by bench_kohya.py."""
from __future__ import annotations

import atexit
import json
import os
import resource
import runpy
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

out_json, script, *args = sys.argv[1:]
stamps: list[float] = []


def _after_step(_opt, _args, _kwargs):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())


register_optimizer_step_post_hook(_after_step)


@atexit.register
def _write():
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    with open(out_json, "w") as f:
        json.dump({"step_ends": stamps, "peak_rss": peak_rss, "cuda_peak": cuda}, f)


sys.argv = [script, *args]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")

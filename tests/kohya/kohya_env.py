"""Whether sd-scripts can run here, for the tests in this folder (see conftest.py)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

REQUIRE = os.environ.get("COMFYUI_PARA_REQUIRE_KOHYA") == "1"
KOHYA = os.environ.get("KOHYA_PATH", "")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TOOLS = os.path.join(HERE, "sd_tools.py")
# sd-scripts' Python, for the trainers and sd_tools.py; default this one. Set it to run a test's ComfyUI side in
# another Python (e.g. a ComfyUI venv without sd-scripts' requirements): every sd-scripts step is a subprocess.
PYTHON = os.environ.get("KOHYA_PYTHON") or sys.executable


def run_python(*args, cwd=None) -> subprocess.CompletedProcess:
    """This Python on a script (sd-scripts' trainers, sd_tools.py) with sd-scripts and the repo importable; must succeed."""
    env = {**os.environ, "KOHYA_PATH": KOHYA, "PYTHONPATH": REPO}
    r = subprocess.run([PYTHON, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{args[:2]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def kohya_missing() -> str:
    """Why sd-scripts cannot run here ('' if it can): its source tree (KOHYA_PATH) and its requirements in this Python."""
    if not KOHYA or not os.path.isfile(os.path.join(KOHYA, "train_network.py")):
        return "KOHYA_PATH does not point at an sd-scripts source tree"
    mods = ("accelerate", "diffusers", "transformers", "safetensors")
    if PYTHON != sys.executable:
        r = subprocess.run([PYTHON, "-c", f"import {', '.join(mods)}"], capture_output=True, text=True)
        return f"KOHYA_PYTHON={PYTHON} cannot import sd-scripts' requirements: {r.stderr[-300:]}" if r.returncode else ""
    for mod in mods:
        if importlib.util.find_spec(mod) is None:
            return f"this Python lacks sd-scripts' requirement {mod}"
    return ""


def needs_kohya():
    """A pytestmark: skip with the reason, or, under COMFYUI_PARA_REQUIRE_KOHYA=1, stop the run."""
    missing = kohya_missing()
    if missing and REQUIRE:
        raise pytest.UsageError(f"COMFYUI_PARA_REQUIRE_KOHYA=1 but {missing}")
    return pytest.mark.skipif(bool(missing), reason=f"needs sd-scripts: {missing}")


def load_para_on_checkpoint(comfy, ckpt: str, para_path: str, fresh_cache: bool = False) -> tuple[str, str]:
    """CheckpointLoaderSimple → Load PaRa (model and CLIP at strength 1) run in ComfyUI, as a user loads a file
    sd-scripts wrote: (the Load PaRa node's id, its summary text)."""
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    lp = g.node("PaRaLoader", model=ck.out(0), clip=ck.out(1), para_name=os.path.basename(para_path),
                strength_model=1.0, strength_clip=1.0)
    g.node("PreviewAny", source=lp.out(0))
    g.node("PreviewAny", source=lp.out(1))
    ui = comfy.run(g.finalize(), fresh_cache=fresh_cache)
    return lp.id, ui[lp.id]["text"][0]

"""sd-scripts' SDXL, Flux and SD3 models: every PaRa layer name para_core.kohya gives them resolves in ComfyUI's LoRA
key map, i.e. Load PaRa finds every layer of a file trained by sdxl_train_network.py, flux_train_network.py or
sd3_train_network.py (names_check.py; models built on the meta device, so this costs seconds, not 30 GB)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from kohya_env import HERE, KOHYA, REPO, needs_kohya

pytestmark = needs_kohya()


def test_sdxl_flux_sd3_names_resolve_in_comfyui():
    comfy = os.environ.get("COMFYUI_PATH", "")
    if not os.path.isfile(os.path.join(comfy, "comfy", "lora.py")):
        pytest.skip("needs ComfyUI: COMFYUI_PATH is not a ComfyUI checkout")
    r = subprocess.run([sys.executable, os.path.join(HERE, "names_check.py")], capture_output=True, text=True,
                       env={**os.environ, "KOHYA_PATH": KOHYA, "COMFYUI_PATH": comfy, "PYTHONPATH": REPO})
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # ExCA: SDXL without attn2 / time and label embeddings / emb_layers; Flux: the image stream and single blocks;
    # SD3.5 medium: the x_blocks (both attentions) and the final layer
    assert {f: (v[0], v[1]) for f, v in got.items()} == {"sdxl": (493, "SDXL"), "flux": (154, "Flux"), "sd3": (124, "SD3")}
    assert all(v[3] == [] for v in got.values()), {f: v[3][:3] for f, v in got.items()}

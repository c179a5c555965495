"""The `para` model folder: models/para and output/para (where Save PaRa writes), safetensors only.

Registered at import: ComfyUI never calls ComfyExtension.on_load in this version, and
extra_model_paths.yaml runs before custom nodes load, so a user's own `para:` entries are kept and
ours are appended after them.
"""
from __future__ import annotations

import os

import folder_paths

FOLDER = "para"
EXTENSIONS = {".safetensors"}


def register() -> list[str]:
    paths, _exts = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    paths = list(paths)
    for p in (os.path.join(folder_paths.models_dir, FOLDER), os.path.join(folder_paths.get_output_directory(), FOLDER)):
        if p not in paths:
            paths.append(p)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))
    return paths

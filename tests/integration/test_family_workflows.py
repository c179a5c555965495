"""The SDXL and Flux subject-personalisation example workflows run end to end in ComfyUI (UI format converted
to an API prompt), with a few training steps on small images made at run time.

ComfyUI's loaders cannot load a tiny SDXL or Flux (detection requires SDXL's exact depths [0,0,2,2,10,10] and
Flux's hidden size 3072), so the loader nodes of the workflow are swapped for test-only loaders (input_nodes.py;
the CLIP and the 4-channel VAE come from the `sd15` fixture) that return:
the tiny SDXL / Flux of families.py (real ComfyUI model classes, sized for CLIP-L conditioning), the real
CLIP-L of the tiny SD1.5 checkpoint as the text encoder (standing in for CLIP-G+L / CLIP-L+T5), and a TAESD
VAE (4 latent channels for SDXL, 16 for Flux). Every other node - dataset, Train PaRa, Save PaRa, loss graph,
text encoding, FluxGuidance, sampling, decoding, saving - is the workflow's own.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from harness import REPO_ROOT, write_subject_images

WORKFLOWS = os.path.join(REPO_ROOT, "example_workflows")


@pytest.fixture(scope="module")
def subject_images(comfy):
    """The workflows' dataset folder (my_subject_images): three small subject photos made at run time."""
    write_subject_images(os.path.join(comfy.dirs["input"], "wf_family_subject"), 3, 5)


SWAPS = {
    "para_train_sdxl_subject.json": ("sdxl", {"CheckpointLoaderSimple": ("ParaTestTinyCheckpoint", {"family": "sdxl"})}),
    "para_train_flux_subject.json": ("flux_dev", {"UNETLoader": ("ParaTestTinyUNet", {"family": "flux_dev"}),
                                                  "DualCLIPLoader": ("ParaTestTinyCLIP", {}),
                                                  "VAELoader": ("ParaTestTinyVAE16", {})}),
}


@pytest.mark.parametrize("name", sorted(SWAPS))
def test_family_training_workflow_runs(comfy, sd15, subject_images, name):
    family, swaps = SWAPS[name]
    prompt = comfy.workflow_to_prompt(os.path.join(WORKFLOWS, name), values={"my_subject_images": "wf_family_subject"},
                                      overrides={"PaRaTrainer": {"steps": 3, "preview_every": 3, "save_every": 0,
                                                                 "training_dtype": "fp32"},
                                                 "EmptyLatentImage": {"width": 64, "height": 64},
                                                 "EmptySD3LatentImage": {"width": 64, "height": 64},
                                                 "KSampler": {"steps": 2}})
    for node in prompt.values():
        if node["class_type"] in swaps:
            node["class_type"], node["inputs"] = swaps[node["class_type"]][0], dict(swaps[node["class_type"]][1])
    ui = comfy.run(prompt)
    comfy.saved_images(prompt, ui)
    trainer = next(nid for nid, v in prompt.items() if v["class_type"] == "PaRaTrainer")
    key = "unet" if family == "sdxl" else "flux"
    assert f"(ExCA, {key})" in ui[trainer]["text"][0]
    assert ui[trainer]["images"]  # the preview, decoded by the workflow's VAE
    losses = comfy.output(trainer, 2)["loss"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    para = comfy.output(trainer, 1)
    assert para.stages and all(name.startswith("diffusion_model.") for name in para.stages)
    saves = [nid for nid, v in prompt.items() if v["class_type"] == "PaRaSave"]
    assert saves and all(ui[nid]["text"][0].startswith("saved para/") for nid in saves)
    loss_graph = next(nid for nid, v in prompt.items() if v["class_type"] == "LossGraphNode")
    assert ui[loss_graph]["images"]


def test_tiny_loaders_before_the_sd15_fixture_name_it(monkeypatch):
    """The loaders that hand out the tiny SD1.5 CLIP / VAE, used before the `sd15` fixture filled them: a message
    that says which fixture to request, not a KeyError."""
    import input_nodes
    monkeypatch.setattr(input_nodes, "SD15", {})
    for node, make in (("ParaTestTinyCLIP", lambda: input_nodes.ParaTestTinyCLIP().make()),
                       ("ParaTestTinyCheckpoint", lambda: input_nodes.ParaTestTinyCheckpoint().make("sdxl"))):
        with pytest.raises(RuntimeError) as e:
            make()
        assert str(e.value) == (f"{node} returns the clip of the tiny SD1.5 checkpoint, which the `sd15` fixture loads: "
                                f"request `sd15` in the test before running a prompt with {node}")


def test_workflow_notes_name_the_model_files():
    import json
    expected = {"para_train_sdxl_subject.json": ["sd_xl_base_1.0.safetensors", "my_subject_images"],
                "para_train_flux_subject.json": ["flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors",
                                                 "ae.safetensors", "my_subject_images"]}
    for name, files in expected.items():
        with open(os.path.join(WORKFLOWS, name), encoding="utf-8") as f:
            wf = json.load(f)
        notes = " ".join(n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Note")
        widgets = [v for n in wf["nodes"] if n["type"] != "Note" for v in n.get("widgets_values", [])]
        for file in files:
            assert file in notes and file in widgets, (name, file)
        trainer = next(n for n in wf["nodes"] if n["type"] == "PaRaTrainer")["widgets_values"]
        assert "ExCA" in trainer and 1 <= trainer[4] <= 16  # the paper's layer set and rank range

"""The three training example workflows run end to end in ComfyUI (UI format converted to an API prompt),
on the tiny SD1.5 checkpoint, with a few training steps and small images made at run time."""
from __future__ import annotations

import os

import pytest

from harness import REPO_ROOT, write_subject_images

WORKFLOWS = os.path.join(REPO_ROOT, "example_workflows")
TRAINING = ["para_train_subject.json", "para_train_one_shot_edit.json", "para_train_multi_subject.json"]




@pytest.fixture(scope="module")
def inputs(comfy, sd15):
    base = comfy.dirs["input"]
    write_subject_images(os.path.join(base, "wf_subject_a"), 3, 1)
    write_subject_images(os.path.join(base, "wf_subject_b"), 3, 2)
    write_subject_images(os.path.join(base, "wf_photo"), 1, 3)
    os.replace(os.path.join(base, "wf_photo", "img_0.png"), os.path.join(base, "wf_photo.png"))
    return {"v1-5-pruned-emaonly.safetensors": sd15["ckpt"], "my_subject_images": "wf_subject_a",
            "subject_a_images": "wf_subject_a", "subject_b_images": "wf_subject_b", "my_photo.png": "wf_photo.png"}


@pytest.mark.parametrize("name", TRAINING)
def test_training_workflow_runs(comfy, inputs, name):
    prompt = comfy.workflow_to_prompt(os.path.join(WORKFLOWS, name), values=inputs, overrides={
        "PaRaTrainer": {"steps": 3, "preview_every": 0, "save_every": 0, "training_dtype": "fp32"},
        "EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2}})
    types = [v["class_type"] for v in prompt.values()]
    assert "PaRaTrainer" in types and "Note" not in types
    ui = comfy.run(prompt)
    comfy.saved_images(prompt, ui)
    for nid, v in prompt.items():
        if v["class_type"] == "PaRaTrainer":
            assert comfy.output(nid, 3) == 3  # steps output
            assert len(comfy.output(nid, 2)["loss"]) == 3
        if v["class_type"] == "LossGraphNode":
            assert ui[nid]["images"]
        if v["class_type"] == "PaRaSave":
            assert any(f.endswith(".safetensors") for f in os.listdir(os.path.join(comfy.dirs["output"], "para")))
    if name == "para_train_one_shot_edit.json":
        stitch = next(nid for nid, v in prompt.items() if v["class_type"] == "ImageStitch")
        assert tuple(comfy.output(stitch).shape) == (1, 64, 128, 3)  # original | edit, side by side

"""Every inference example workflow runs end to end in ComfyUI, converted from the UI format the
frontend loads (example_workflows/*.json) to an API prompt, with the tiny test models substituted."""
from __future__ import annotations

import json
import os

import pytest
import torch

from harness import REPO_ROOT

WORKFLOWS = os.path.join(REPO_ROOT, "example_workflows")
MINE = ["para_personalised_generation.json", "para_two_subjects_merged.json", "para_with_style_lora.json",
        "para_regional_two_subjects.json"]
LIN = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"
FF = "diffusion_model.output_blocks.1.1.transformer_blocks.0.ff.net.0.proj"
TEQ = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def files(comfy, sd15):
    g = torch.Generator().manual_seed(200)
    a = {LIN: [torch.randn(320, 8, generator=g)], FF: [torch.randn(2560, 8, generator=g)], TEQ: [torch.randn(768, 4, generator=g)]}
    b = {LIN: [torch.cat([a[LIN][0][:, :4], torch.randn(320, 4, generator=g)], 1)], TEQ: [torch.randn(768, 4, generator=g)]}
    comfy.write_para("wf_subject.safetensors", a)
    comfy.write_para("wf_subject_b.safetensors", b)
    comfy.write_safetensors("loras", "wf_style.safetensors", {
        f"{FF}.lora_up.weight": torch.randn(2560, 8, generator=g) * 0.1, f"{FF}.lora_down.weight": torch.randn(8, 320, generator=g) * 0.1,
        f"{LIN}.lora_up.weight": torch.randn(320, 8, generator=g) * 0.1, f"{LIN}.lora_down.weight": torch.randn(8, 768, generator=g) * 0.1})
    return {"v1-5-pruned-emaonly.safetensors": sd15["ckpt"], "my_subject_para.safetensors": "wf_subject.safetensors",
            "subject_a_para.safetensors": "wf_subject.safetensors", "subject_b_para.safetensors": "wf_subject_b.safetensors",
            "my_style_lora.safetensors": "wf_style.safetensors"}


def _load(name):
    with open(os.path.join(WORKFLOWS, name), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("name", MINE)
def test_example_workflow_is_well_formed(comfy, name):
    wf = _load(name)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == max(ln[0] for ln in wf["links"])
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert notes and all(".safetensors" in n["widgets_values"][0] and "models/" in n["widgets_values"][0] for n in notes)
    for lid, src, slot, dst, dslot, typ in wf["links"]:
        out, inp = nodes[src]["outputs"][slot], nodes[dst]["inputs"][dslot]
        assert out["type"] == inp["type"] == typ and lid in out["links"] and inp["link"] == lid
    for n in wf["nodes"]:
        if n["type"] == "Note":
            continue
        cls = comfy.nodes.NODE_CLASS_MAPPINGS[n["type"]]
        # a newer ComfyUI may give a node more outputs (0.33's SaveImage returns its IMAGE): what the file declares
        # must be the node's first outputs
        assert [o["type"] for o in n["outputs"]] == list(cls.RETURN_TYPES)[:len(n["outputs"])], n["type"]
        spec = cls.INPUT_TYPES()
        sockets = {k: v[0] for sec in ("required", "optional") for k, v in spec.get(sec, {}).items()}
        for inp in n["inputs"]:
            assert sockets[inp["name"]] == inp["type"], (n["type"], inp["name"])
            if "optional" not in spec or inp["name"] not in spec["optional"]:
                assert inp["link"] is not None, f"{n['type']}.{inp['name']} is required but not connected"


@pytest.mark.parametrize("name", MINE)
def test_example_workflow_runs(comfy, files, name):
    prompt = comfy.workflow_to_prompt(os.path.join(WORKFLOWS, name), values=files,
                                      overrides={"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2},
                                                 "SolidMask": {"width": 64, "height": 64}})
    assert not any(v["class_type"] == "Note" for v in prompt.values())
    unknown = [v for v in prompt.values() if v["class_type"] in ("CheckpointLoaderSimple", "PaRaLoader", "PaRaLoadFile", "PaRaLoRACombine")
               and not {x for x in v["inputs"].values() if isinstance(x, str)} & set(files.values())]
    assert not unknown, f"a model file of the workflow was not substituted: {unknown}"
    ui = comfy.run(prompt)
    comfy.saved_images(prompt, ui)
    texts = {prompt[nid]["class_type"]: ui[nid]["text"][0] for nid in ui if "text" in ui[nid]}
    if name == "para_personalised_generation.json":
        assert texts["PaRaLoader"] == "model: 2 layers patched, clip: 1 layer patched"
    if name == "para_two_subjects_merged.json":
        merges = {prompt[nid]["inputs"]["mode"]: ui[nid]["text"][0] for nid in ui if prompt[nid]["class_type"] == "PaRaMerge"}
        assert set(merges) == {"sequential", "union"} and all("principal angles" in t for t in merges.values())
        assert sorted(t for nid, t in ((n, ui[n]["text"][0]) for n in ui if "text" in ui[n]) if prompt[nid]["class_type"] == "PaRaLoadFile") \
            == ["2 layers, rank 4-8", "3 layers, rank 4-8"]
        assert not any(v["class_type"] == "PaRaLoader" for v in prompt.values()), "merge workflows read files with Load PaRa File"
        saves = [nid for nid, v in prompt.items() if v["class_type"] == "SaveImage"]
        images = [comfy.output(prompt[nid]["inputs"]["images"][0]) for nid in saves]
        assert not torch.equal(images[0], images[1]), "sequential and union of overlapping subjects should differ"
    if name == "para_regional_two_subjects.json":
        hooks = [ui[nid]["text"][0] for nid in ui if prompt[nid]["class_type"] == "PaRaHook"]
        assert sorted(hooks) == ["hook: 2 layers, rank 4-8; strength model 1, clip 1\nactive only on the conditionings that carry it",
                                 "hook: 3 layers, rank 4-8; strength model 1, clip 1\nactive only on the conditionings that carry it"]
        assert not any(v["class_type"] in ("PaRaMerge", "PaRaLoader", "PaRaApply") for v in prompt.values()), "regional: no merge, no patched model"
    if name == "para_with_style_lora.json":
        assert "2 with PaRa and LoRA, 1 PaRa only, 0 LoRA only" in texts["PaRaLoRACombine"]

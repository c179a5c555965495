"""Train PaRa: what test_train_node.py does not cover - the node contract, file metadata, previews (latent
previewer and VAE), weight-space projection on every layer (attn2 reads the executor's inference-mode text
conditioning), bf16 autocast, resuming from a file without training state, and the caption-count error.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

LATENTS = "para_contract_set.latent"
TRAIN = dict(batch_size=2, grad_accumulation_steps=1, learning_rate=1e-3, rank=4, optimizer="AdamW", loss_function="MSE",
             seed=0, training_dtype="fp32", gradient_checkpointing=True, targets="ExCA", rank_boundary=0.025,
             loss_space="prediction")


@pytest.fixture(scope="module")
def latents(comfy):
    import safetensors.torch
    lat = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    safetensors.torch.save_file({"latent_tensor": lat, "latent_format_version_0": torch.tensor([])}, comfy.path("input", LATENTS))
    return lat


def test_node_contract_and_tooltips(comfy):
    cls = comfy.nodes.NODE_CLASS_MAPPINGS["PaRaTrainer"]
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["PaRaTrainer"] == "Train PaRa"
    spec = cls.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "latents", "positive", "batch_size", "grad_accumulation_steps", "steps",
                                      "learning_rate", "rank", "optimizer", "loss_function", "seed", "training_dtype",
                                      "gradient_checkpointing", "targets", "rank_boundary", "loss_space"]
    core = comfy.nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"].INPUT_TYPES()
    core_inputs = {**core["required"], **core.get("optional", {})}
    parity = [n for n in ("checkpoint_depth", "offloading", "bucket_mode", "bypass_mode", "quantized_backward") if n in core_inputs]
    assert list(spec["optional"]) == ["include", "exclude", "existing_para", "save_every", "preview_every", "vae",
                                      "filename_prefix", "init", "projection"] + parity + [
                                      "lr_schedule", "warmup_steps", "validation_latents", "validation_positive",
                                      "validation_split", "validation_every"]
    for section in ("required", "optional"):
        for name, s in spec[section].items():
            assert s[1].get("tooltip"), f"PaRaTrainer.{name} has no tooltip"
    assert spec["required"]["targets"][1]["default"] == "ExCA"
    assert spec["required"]["rank_boundary"][1]["default"] == 0.025
    assert list(cls.RETURN_TYPES) == ["MODEL", "PARA", "LOSS_MAP", "INT"]
    assert cls.INPUT_IS_LIST is True


def test_metadata_previews_weight_space_and_bf16(comfy, sd15, latents):
    g = comfy.graph("contract.")
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    te = g.node("CLIPTextEncode", clip=ck.out(1), text="a photo of sks toy")
    ll = g.node("LoadLatent", latent=LATENTS)
    a = g.node("PaRaTrainer", model=ck.out(0), latents=ll.out(0), positive=te.out(0),
               **dict(TRAIN, targets="all", projection="weight", gradient_checkpointing=False, steps=2, preview_every=1))
    b = g.node("PaRaTrainer", model=ck.out(0), latents=ll.out(0), positive=te.out(0),
               **dict(TRAIN, training_dtype="bf16", steps=1, preview_every=1, vae=ck.out(2), init="random"))
    g.node("PaRaSave", para=a.out(1), filename_prefix="para/contract_all")
    g.node("PreviewAny", source=a.out(0))
    g.node("PreviewAny", source=b.out(0))
    ui = comfy.run(g.finalize())
    para = comfy.output(a.id, 1)
    assert len(para.stages) == 51  # every ≥2-D comfy-op weight, attn2 included
    meta = para.metadata
    assert meta["format"] == "para" and meta["base_model"] == "sd15" and meta["targets"] == "all"
    t = json.loads(meta["training"])
    assert {k: t[k] for k in ("steps", "learning_rate", "rank", "gamma", "seed", "optimizer", "loss_space", "init")} == {
        "steps": 2, "learning_rate": 1e-3, "rank": 4, "gamma": 0.025, "seed": 0, "optimizer": "AdamW",
        "loss_space": "eps", "init": "small_sv"}
    assert all(x.dtype == torch.float16 for x in para.tensors.values())
    assert len(ui[a.id]["images"]) == 2 and len(ui[b.id]["images"]) == 1  # latent preview x2, VAE preview x1
    first, second = ui[a.id]["text"][0].splitlines()[:2]  # the key facts first: the node shows about two lines
    assert re.fullmatch(r"steps 2, loss \d+\.\d{4} \(eps space\); \d+\.\d KiB as fp16", first), first
    assert second.startswith("51 layers (all, unet)"), second
    for node in (a, b):
        loss = comfy.output(node.id, 2)["loss"]
        assert loss and all(torch.isfinite(torch.tensor(loss)))
    assert json.loads(comfy.output(b.id, 1).metadata["training"])["training_dtype"] == "bf16"


def test_resume_from_a_file_without_training_state(comfy, sd15, latents):
    """Save PaRa writes no optimizer state: training continues from the saved bases, and the step count too."""
    g = comfy.graph("resume_nostate.")
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    te = g.node("CLIPTextEncode", clip=ck.out(1), text="a photo of sks toy")
    ll = g.node("LoadLatent", latent=LATENTS)
    tr = g.node("PaRaTrainer", model=ck.out(0), latents=ll.out(0), positive=te.out(0),
                **dict(TRAIN, steps=1, existing_para="contract_all_00001_.safetensors"))
    g.node("PreviewAny", source=tr.out(0))
    comfy.run(g.finalize())
    assert comfy.output(tr.id, 3) == 3
    assert len(comfy.output(tr.id, 1).stages) == 51  # the file's layers, not the ExCA preset


def test_caption_count_must_match(comfy, sd15, latents):
    cls = comfy.nodes.NODE_CLASS_MAPPINGS["PaRaTrainer"]
    cond = [[torch.zeros(1, 77, 768), {}], [torch.zeros(1, 77, 768), {}]]
    with pytest.raises(ValueError, match="2 captions .* for 4 images"):
        cls.execute(model=[sd15["model"]], latents=[{"samples": latents}], positive=[cond],
                    **{k: [v] for k, v in TRAIN.items()}, steps=[1])

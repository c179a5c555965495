"""The study's experiments as real ComfyUI node graphs, run in-process by the test harness (tests/integration/harness.py).

Train PaRa is the pack's PaRaTrainer node, Train LoRA is core's TrainLoraNode (+ LoraModelLoader), sampling is core's
KSampler on EmptyLatentImage with CLIPTextEncode prompts. The world's objects (base MODEL, CLIP, the subject's
LATENTs) enter the graphs through three input nodes that hand out objects by key (`ParaStudyModel`, ...).
"""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
INTEGRATION = os.path.join(REPO_ROOT, "tests", "integration")
if INTEGRATION not in sys.path:
    sys.path.append(INTEGRATION)

OBJECTS: dict = {}   # key -> MODEL / CLIP / LATENT handed to graphs by the input nodes below


def clear_built() -> None:
    """Drop the objects held for the input nodes (the test suite does at the end of its session)."""
    OBJECTS.clear()


KEEP_OUTPUT_CONV = r"^diffusion_model\.out\."
SAMPLER = dict(steps=20, cfg=4.0, sampler_name="euler", scheduler="normal", denoise=1.0)


class _StudyInput:
    FUNCTION = "make"
    CATEGORY = "_for_testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": ""})}}

    def make(self, key):
        if key not in OBJECTS:
            raise KeyError(f"{type(self).__name__}: no study object '{key}' (known: {sorted(OBJECTS)})")
        obj = OBJECTS[key]
        return (obj.clone() if hasattr(obj, "clone") and hasattr(obj, "model") else obj,)


class ParaStudyModel(_StudyInput):
    RETURN_TYPES = ("MODEL",)


class ParaStudyCLIP(_StudyInput):
    RETURN_TYPES = ("CLIP",)


class ParaStudyLatents(_StudyInput):
    RETURN_TYPES = ("LATENT",)


def register(node_class_mappings: dict) -> None:
    for cls in (ParaStudyModel, ParaStudyCLIP, ParaStudyLatents):
        node_class_mappings.setdefault(cls.__name__, cls)
    seed_core_trainer(node_class_mappings["TrainLoraNode"])


def seed_core_trainer(cls) -> None:
    """Make core Train LoRA reproducible: seed torch's global RNG with the node's `seed` input just before its
    own `execute` runs (its code unchanged).

    Core Train LoRA draws each step's batch indices and noise levels from torch's global RNG (`torch.randperm`,
    `torch.rand` in its TrainSampler), which its seed input does not seed; in one study graph that state depends on
    everything that ran before it. Left as is, two identical runs of the study gave LoRA subject fidelity 0.00 and
    0.75 for the same tuning seed and learning rate. (Train PaRa draws from generators seeded by its input.)"""
    func = cls.__dict__["execute"].__func__
    if getattr(func, "para_study_seeded", False):
        return

    def execute(klass, *args, **kwargs):
        seed = kwargs.get("seed", 0)
        torch.manual_seed(int(seed[0] if isinstance(seed, list) else seed))
        return func(klass, *args, **kwargs)

    execute.para_study_seeded = True
    cls.execute = classmethod(execute)


def start_comfy(base_dir: str):
    """A ComfyHarness (ComfyUI in this process, temp folders under base_dir) with the study's input nodes."""
    from harness import ComfyHarness, check_importable, find_comfyui
    root, reason = find_comfyui()
    reason = reason or check_importable(root)
    if reason:
        raise SystemExit(f"the study needs ComfyUI: {reason}")
    comfy = ComfyHarness(root, base_dir)
    register(comfy.nodes.NODE_CLASS_MAPPINGS)
    return comfy


def _node_inputs(comfy, class_type: str, wanted: dict) -> dict:
    """The entries of `wanted` that this ComfyUI's node takes (core Train LoRA's inputs differ by version)."""
    spec = comfy.nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    names = set(spec.get("required", {})) | set(spec.get("optional", {}))
    return {k: v for k, v in wanted.items() if k in names}


def train_para(harness, g, model, latents, positive, steps: int, seed: int, rank: int = 2, targets: str = "ExCA",
               learning_rate: float = 2e-3, batch_size: int = 4, rank_boundary: float = 0.0, exclude: str = KEEP_OUTPUT_CONV,
               loss_space: str = "prediction"):
    """A PaRaTrainer node; returns the node (out 0 MODEL with the PaRa applied, out 1 PARA).

    rank_boundary 0: the rank asked for on every layer (γ = 1/40 would cap these 32/64-channel layers at 1).
    exclude: the UNet's 4-channel output conv stays whole (the pack's README tip): rank r there removes r of the 4
    latent channels from every prediction, and sampling diverges."""
    return g.node("PaRaTrainer", model=model, latents=latents, positive=positive, batch_size=batch_size,
                  grad_accumulation_steps=1, steps=steps, learning_rate=learning_rate, rank=rank, optimizer="AdamW",
                  loss_function="MSE", seed=seed, training_dtype="fp32", gradient_checkpointing=False, targets=targets,
                  rank_boundary=rank_boundary, loss_space=loss_space, projection="output", exclude=exclude)


def train_lora(harness, g, model, latents, positive, steps: int, seed: int, rank: int = 2, learning_rate: float = 2e-3,
               batch_size: int = 4):
    """Core TrainLoraNode, then LoraModelLoader; returns (model output, lora output) links."""
    spec = harness.nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"]
    wanted = dict(model=model, latents=latents, positive=positive, batch_size=batch_size, grad_accumulation_steps=1,
                  steps=steps, learning_rate=learning_rate, rank=rank, optimizer="AdamW", loss_function="MSE", seed=seed,
                  training_dtype="fp32", lora_dtype="fp32", quantized_backward=False, algorithm="LoRA",
                  gradient_checkpointing=False, checkpoint_depth=1, offloading=False, existing_lora="[None]",
                  bucket_mode=False, bypass_mode=False)
    node = g.node("TrainLoraNode", **_node_inputs(harness, "TrainLoraNode", wanted))
    lora_index = list(spec.RETURN_TYPES).index("LORA_MODEL") if hasattr(spec, "RETURN_TYPES") else 1
    lora = node.out(lora_index)
    return apply_lora(harness, g, model, lora), lora


def apply_lora(harness, g, model, lora):
    """Core LoraModelLoader at strength 1 (0.33 adds a required `bypass`: off)."""
    wanted = dict(model=model, lora=lora, strength_model=1.0, bypass=False)
    return g.node("LoraModelLoader", **_node_inputs(harness, "LoraModelLoader", wanted)).out(0)


def run(harness, g) -> None:
    """Run the graph; every node must validate (ComfyUI would otherwise run the valid outputs and drop the rest)."""
    import asyncio
    prompt = g.finalize()
    valid = asyncio.run(harness.execution.validate_prompt("study", prompt, None))
    bad = [f"{nid} ({e.get('class_type')}): {[x.get('details') or x.get('message') for x in e.get('errors', [])]}"
           for nid, e in (valid[3] or {}).items() if e.get("errors")]
    if not valid[0] or bad:
        raise AssertionError(f"study graph does not validate: {valid[1]} {bad}")
    harness.run(prompt)


def add_samplers(g, model, clip, prompts: list[str], n: int, seed: int, size: int) -> dict[str, str]:
    """One KSampler per prompt (batch n, the same noise seed for every prompt and model); {prompt: node id}."""
    neg = g.node("CLIPTextEncode", clip=clip, text="")
    ids = {}
    for text in prompts:
        pos = g.node("CLIPTextEncode", clip=clip, text=text)
        lat = g.node("EmptyLatentImage", width=size * 8, height=size * 8, batch_size=n)
        ks = g.node("KSampler", model=model, seed=seed, positive=pos.out(0), negative=neg.out(0), latent_image=lat.out(0), **SAMPLER)
        g.node("PreviewAny", source=ks.out(0))
        ids[text] = ks.id
    return ids


def read_samples(harness, ids: dict[str, str]) -> dict[str, torch.Tensor]:
    """{prompt: (n, 4, S, S) in model space} from the last run's KSampler outputs."""
    from comfy.latent_formats import SD15
    return {text: SD15().process_in(harness.output(nid, 0)["samples"].float()) for text, nid in ids.items()}


def to_latent(images: torch.Tensor) -> dict:
    """Model-space images -> a LATENT dict as a VAE Encode would give (÷ the SD1.5 scale)."""
    from comfy.latent_formats import SD15
    return {"samples": SD15().process_out(images.clone())}

"""`para demo`: the whole command-line job on a small SD1.5-layout checkpoint generated on the spot.

It writes a checkpoint and a PaRa file, bakes them, exports the same edit as a LoRA, checks both
against a float64 reference and prints what it did. Nothing is downloaded.
"""
from __future__ import annotations

import os

import torch

from . import safetensors_io
from .checkpoint import bake, export_lora, module_map
from .format import ParaModel
from .synthetic import random_para, sd15_checkpoint


def _reference(w0: torch.Tensor, para: ParaModel, module: str) -> torch.Tensor:
    w = w0.to(torch.float64).reshape(w0.shape[0], -1)
    for q in para.stages[module]:
        q = q.to(torch.float64)
        w = w - q @ (q.T @ w)
    return w.reshape(w0.shape)


def run_demo(folder: str, rank: int = 4) -> int:
    os.makedirs(folder, exist_ok=True)
    ckpt = os.path.join(folder, "tiny_sd15.safetensors")
    para_path = os.path.join(folder, "subject.para.safetensors")
    baked = os.path.join(folder, "tiny_sd15_para.safetensors")
    lora = os.path.join(folder, "subject_as_lora.safetensors")
    for p in (baked, lora, para_path, ckpt):
        if os.path.exists(p):
            os.unlink(p)
    safetensors_io.save_file(sd15_checkpoint(), ckpt)
    _, infos = safetensors_io.read_header(ckpt)
    shapes = {m: s.out_dim for m, s in module_map(infos).items()
              if (".attn1." in m or ".ff." in m or m.endswith("q_proj")) and m.startswith(("diffusion_model.", "text_encoders."))}
    para = random_para(shapes, rank, metadata={"base_model": "sd15", "targets": "demo", "name": "demo subject"})
    para.save(para_path)
    para = ParaModel.load(para_path)
    print(f"checkpoint: {ckpt} ({len(infos)} tensors)")
    print(f"PaRa file:  {para_path} ({len(para.stages)} layers, rank {rank}, {os.path.getsize(para_path)} bytes)")
    bake(ckpt, [para], baked)
    export_lora(ckpt, para, lora)
    base, _ = safetensors_io.load_file(ckpt)
    out, _ = safetensors_io.load_file(baked)
    lo, _ = safetensors_io.load_file(lora)
    worst_bake = worst_lora = 0.0
    mapping = module_map(infos)
    for module in para.stages:
        key = mapping[module].key
        w0 = base[key]
        ref = _reference(w0, para, module)
        worst_bake = max(worst_bake, float((out[key].to(torch.float64) - ref).abs().max() / ref.abs().max()))
        up, down = lo[f"{module}.lora_up.weight"].to(torch.float64), lo[f"{module}.lora_down.weight"].to(torch.float64)
        via_lora = w0.to(torch.float64) + (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
        worst_lora = max(worst_lora, float((via_lora - ref).abs().max() / ref.abs().max()))
    untouched = sum(1 for k in base if torch.equal(base[k], out[k]))
    print(f"baked:      {baked} ({len(para.stages)} tensors changed, {untouched} copied unchanged)")
    print(f"as LoRA:    {lora} ({len(lo)} tensors)")
    print(f"max relative error vs float64 reference: bake {worst_bake:.2e}, export-lora {worst_lora:.2e} (fp16 checkpoint)")
    ok = worst_bake < 2e-3 and worst_lora < 2e-3 and untouched == len(base) - len(para.stages)
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1

"""ComfyUI's weight-adapter contract, for every adapter the pack creates, driven through ComfyUI's own low-VRAM path.

ComfyUI's dynamic-VRAM path (`comfy.lora.prefetch_prepared_value`, ComfyUI >= 0.21) rebuilds each adapter as
`type(adapter)(adapter.loaded_keys, weights)` around tensors it moved into one VRAM buffer, and sizes that
buffer from the tensors in `weights`. So each adapter must be constructible that way, keep every tensor it uses
inside `weights`, and give the same weight through `LowVramPatch.memory_required()` + `prepare()` + call as the
full load. On a ComfyUI without `prepare` (0.8) the plain low-VRAM call is checked against the full load.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from harness import bits_equal

LIN = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"  # Linear 320 x 768
CONV = "diffusion_model.input_blocks.0.0"  # Conv 320 x 4 x 3 x 3
TEQ = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"  # 768 x 768, fp16
OUT = {LIN: 320, CONV: 320, TEQ: 768}


def _b(out, r, seed):
    return torch.randn(out, r, generator=torch.Generator().manual_seed(seed))


def _tensors_outside_weights(adapter) -> list[str]:
    def has_tensor(v):
        if isinstance(v, torch.Tensor):
            return True
        if isinstance(v, (list, tuple, set)):
            return any(has_tensor(x) for x in v)
        if isinstance(v, dict):
            return any(has_tensor(x) for x in v.values())
        return False
    return [k for k, v in vars(adapter).items() if k not in ("weights", "loaded_keys") and has_tensor(v)]


@pytest.fixture(scope="module")
def patched(comfy, sd15):
    """{what: (patcher, {key: patch list})} for every adapter kind the pack's nodes create, model and CLIP."""
    comfy.write_para("contract_a.safetensors", {LIN: [_b(320, 4, 1)], CONV: [_b(320, 3, 2)], TEQ: [_b(768, 2, 3)]})
    comfy.write_para("contract_b.safetensors", {LIN: [_b(320, 2, 4)], TEQ: [_b(768, 3, 5)]})
    lora = {}
    for i, (m, out, inp) in enumerate([(LIN, 320, 768), (TEQ, 768, 768)]):
        lora[f"{m}.lora_up.weight"] = torch.randn(out, 4, generator=torch.Generator().manual_seed(10 + i)) * 0.1
        lora[f"{m}.lora_down.weight"] = torch.randn(4, inp, generator=torch.Generator().manual_seed(20 + i)) * 0.1
        lora[f"{m}.alpha"] = torch.tensor(2.0)
    comfy.write_safetensors("loras", "contract_lora.safetensors", lora)
    g = comfy.graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=sd15["ckpt"])
    load = g.node("PaRaLoader", model=ck.out(0), clip=ck.out(1), para_name="contract_a.safetensors", strength_model=0.8,
                  strength_clip=1.0)
    fa, fb = g.node("PaRaLoadFile", para_name="contract_a.safetensors"), g.node("PaRaLoadFile", para_name="contract_b.safetensors")
    merged = g.node("PaRaMerge", para_a=fa.out(0), para_b=fb.out(0), mode="sequential")
    apply = g.node("PaRaApply", model=ck.out(0), clip=ck.out(1), para=merged.out(0), strength_model=1.0, strength_clip=0.5)
    combo = g.node("PaRaLoRACombine", model=ck.out(0), clip=ck.out(1), para=fa.out(0), lora_name="contract_lora.safetensors",
                   alpha_para=1.0, alpha_lora=0.7, mode="stacked")
    hook = g.node("PaRaHook", para=merged.out(0), strength_model=0.9, strength_clip=1.0)
    for n in (load, apply, combo):
        g.node("PreviewAny", source=n.out(0))
    g.node("PreviewAny", source=hook.out(0))
    comfy.run(g.finalize())
    out = {}
    for name, node in (("Load PaRa", load), ("Apply PaRa (sequential merge)", apply), ("PaRa + LoRA", combo)):
        m, c = comfy.output(node.id, 0), comfy.output(node.id, 1)
        out[f"{name} / model"] = (m, m.patches)
        out[f"{name} / clip"] = (c.patcher, c.patcher.patches)
    # Hook PaRa: its adapters are made when the hook registers on a patcher (as the sampler does)
    hooks = comfy.output(hook.id, 0)
    comfy_hooks = importlib.import_module("comfy.hooks")
    for side, patcher in (("model", sd15["model"].clone()), ("clip", sd15["clip"].clone().patcher)):
        target = {"target": comfy_hooks.EnumWeightTarget.Clip} if side == "clip" else {}
        for h in hooks.get_type(comfy_hooks.EnumHookType.Weight):
            h.add_hook_patches(patcher, {}, target, comfy_hooks.HookGroup())
        out[f"Hook PaRa / {side}"] = (patcher, {k: v for d in patcher.hook_patches.values() for k, v in d.items()})
    return out


KINDS = [f"{n} / {s}" for n in ("Load PaRa", "Apply PaRa (sequential merge)", "PaRa + LoRA", "Hook PaRa") for s in ("model", "clip")]


@pytest.mark.parametrize("what", KINDS)
def test_every_adapter_is_rebuilt_from_loaded_keys_and_weights(patched, what):
    import comfy.weight_adapter
    _patcher, patches = patched[what]
    adapters = [p[1] for plist in patches.values() for p in plist if isinstance(p[1], comfy.weight_adapter.WeightAdapterBase)]
    assert adapters, what
    for a in adapters:
        assert _tensors_outside_weights(a) == [], (what, type(a).__name__)
        assert all(isinstance(t, torch.Tensor) for t in a.weights), (what, type(a).__name__)
        rebuilt = type(a)(a.loaded_keys, tuple(t.clone() for t in a.weights))
        assert type(rebuilt) is type(a) and rebuilt.loaded_keys == a.loaded_keys
        assert all(torch.equal(x, y) for x, y in zip(rebuilt.weights, a.weights))


@pytest.mark.parametrize("what", KINDS)
def test_low_vram_patch_prepared_equals_full_load(patched, what):
    """Each patched key through LowVramPatch (memory_required + prepare into a gathered buffer + call, where this
    ComfyUI has them) gives bit-for-bit the weight the full load computes."""
    import comfy.lora
    import comfy.model_patcher
    patcher, patches = patched[what]
    lvp_cls = comfy.model_patcher.LowVramPatch
    prepared = hasattr(lvp_cls, "prepare") and hasattr(lvp_cls, "memory_required")
    sd = patcher.model.state_dict()
    checked = 0
    for key, plist in patches.items():
        w = sd[key].detach().to(torch.float32)  # the low-VRAM path's weight arrives in the compute dtype
        full = comfy.lora.calculate_weight(plist, w.clone(), key)
        lvp = lvp_cls(key, patches)
        if prepared:
            size = lvp.memory_required()
            expect = sum(t.numel() * t.element_size() for p in plist for t in getattr(p[1], "weights", ()))
            assert size >= expect > 0, (what, key, size, expect)
            buffer = torch.empty(size, dtype=torch.uint8)
            lvp.prepare(buffer, None)
        got = lvp(w.clone())
        assert bits_equal(got, full), (what, key)
        assert not bits_equal(full, w), (what, key)  # the patch did something
        checked += 1
    assert checked, what

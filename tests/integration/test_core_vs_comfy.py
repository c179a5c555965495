"""para_core against ComfyUI itself: the synthetic layouts are ComfyUI's real ones, and the command
line's `para bake` gives the same weights as the Load PaRa node patching the original checkpoint."""
import shutil

import torch

from para_core import ParaModel, safetensors_io
from para_core.checkpoint import bake, module_map
from para_core.synthetic import hf_clip, sd15_unet


def test_synthetic_sd15_layout_is_comfyuis(comfy):
    """para_core.synthetic.sd15_unet at full width has exactly the keys and shapes of ComfyUI's SD1.5 UNet."""
    import comfy.ops as comfy_ops
    import comfy.sd1_clip as sd1_clip
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device("meta"):
        real = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                         channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                         transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=768, num_heads=8,
                         num_head_channels=-1, use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False,
                         adm_in_channels=None, use_temporal_resblock=False, use_temporal_attention=False,
                         operations=comfy_ops.disable_weight_init)
        clip = sd1_clip.SD1ClipModel(device="meta", dtype=torch.float32)
    real_sd = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in sd15_unet(ch=320, ctx=768).items()}
    assert ours == real_sd
    assert sum(torch.Size(s).numel() for s in ours.values()) == 859_520_964
    real_clip = {k[len("clip_l.transformer."):]: tuple(v.shape) for k, v in clip.state_dict().items()
                 if k.startswith("clip_l.transformer.") and ".layers." in k}
    with torch.device("meta"):
        ours_clip = {k: tuple(v.shape) for k, v in hf_clip("", hidden=768, layers=12, vocab=49408).items() if ".layers." in k}
    assert ours_clip == real_clip


def test_cli_bake_equals_load_para_node(comfy, tmp_path):
    ckpt_name = comfy.sd15_checkpoint()
    ckpt = comfy.path("checkpoints", ckpt_name)
    _, infos = safetensors_io.read_header(ckpt)
    mapping = module_map(infos)
    wanted = [m for m in mapping if m.endswith(("attn1.to_q", "ff.net.0.proj", ".proj_in", "in_layers.2"))
              or m.endswith(("layers.0.self_attn.q_proj", "layers.11.mlp.fc1"))]
    assert any(m.startswith("text_encoders.clip_l.") for m in wanted) and len(wanted) >= 6
    g = torch.Generator().manual_seed(7)
    name = comfy.write_para("bake_vs_node.safetensors", {m: [torch.randn(mapping[m].out_dim, 3, generator=g)] for m in wanted},
                            dtype=torch.float16)
    baked_name = "tiny_sd15_baked.safetensors"
    out = tmp_path / baked_name
    bake(ckpt, [ParaModel.load(comfy.path("para", name))], str(out))
    shutil.copy(out, comfy.path("checkpoints", baked_name))

    gr = comfy.graph()
    loader = gr.node("CheckpointLoaderSimple", ckpt_name=ckpt_name)
    para = gr.node("PaRaLoader", model=loader.out(0), clip=loader.out(1), para_name=name, strength_model=1.0, strength_clip=1.0)
    gr.node("PreviewAny", source=para.out(0))
    gr.node("PreviewAny", source=para.out(1))
    baked = gr.node("CheckpointLoaderSimple", ckpt_name=baked_name)
    gr.node("PreviewAny", source=baked.out(0))
    gr.node("PreviewAny", source=baked.out(1))
    comfy.run(gr.finalize())
    unet_keys = [mapping[m].key.replace("model.", "", 1) for m in wanted if m.startswith("diffusion_model.")]
    clip_keys = ["clip_l." + mapping[m].key[len("cond_stage_model."):] for m in wanted if m.startswith("text_encoders.")]
    via_node = {**comfy.patched_state_dict(comfy.output(para.id, 0), unet_keys),
                **comfy.patched_state_dict(comfy.output(para.id, 1), clip_keys)}
    via_bake = {**comfy.base_state_dict(comfy.output(baked.id, 0), unet_keys),
                **comfy.base_state_dict(comfy.output(baked.id, 1), clip_keys)}
    for k in unet_keys + clip_keys:
        a, b = via_node[k].float(), via_bake[k].float()
        # the node patches in fp32; bake rounds the same fp32 result once to the checkpoint's fp16
        assert torch.allclose(a.half().float(), b, rtol=2 ** -10, atol=1e-7), k
        assert not torch.equal(b, comfy.base_state_dict(comfy.output(loader.id, 0 if k.startswith("diffusion") else 1), [k])[k].float()), k

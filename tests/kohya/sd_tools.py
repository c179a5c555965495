"""Helpers the kohya tests run in sd-scripts' environment (``python sd_tools.py CMD ...``, KOHYA_PATH = sd-scripts).

* ``tokenizer DIR``: the CLIP tokenizer folders sd-scripts' ``--tokenizer_cache_dir`` accepts
  (``DIR/openai_clip-vit-large-patch14`` and SDXL's second, ``DIR/laion_CLIP-ViT-bigG-14-laion2B-39B-b160k``), generated here: the 256 byte symbols (plain and word-final) and
  CLIP's two special tokens, no merges. Every id is < 49408, so it fits the full CLIP-L embedding; a test
  model with random weights needs no real vocabulary, and no download or ComfyUI file is needed.
* ``sd15 OUT``: a full-architecture SD1.5 checkpoint (sd-scripts' own UNet, CLIP-L and VAE configs, random
  weights, fp16, LDM key names) written with sd-scripts' `save_stable_diffusion_checkpoint`.
* ``sdxl OUT``: the same for SDXL (sd-scripts' SDXL UNet, CLIP-L + OpenCLIP bigG, VAE), initialised in fp16.
* ``images DIR N``: N random 64x64 images with captions in DIR/1_sks (sd-scripts' <repeats>_<name> layout).
* ``merge CKPT PARA OUT``: load CKPT as sd-scripts does, `create_network_from_weights` + `merge_to` (the
  network's merge), and write the merged weights of the layers the file touches under the checkpoint's keys, fp32.
* ``merge_sdxl CKPT PARA OUT``: the same for SDXL, keyed by sd-scripts module name, in shards in the folder OUT.
"""
from __future__ import annotations

import json
import os
import sys

import torch

KOHYA = os.environ["KOHYA_PATH"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [KOHYA, REPO]


def tokenizer(folder: str) -> None:
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    os.makedirs(folder, exist_ok=True)
    src = os.path.join(folder, "src")
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(src, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer(os.path.join(src, "vocab.json"), os.path.join(src, "merges.txt"), model_max_length=77,
                        pad_token="<|endoftext|>")
    for name in ("openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"):  # SD1.x/SDXL, SDXL
        tok.save_pretrained(os.path.join(folder, name))


def sd15(out: str, seed: int = 0) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from library import model_util
    from library.original_unet import UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**model_util.create_unet_diffusers_config(False))
    vae = AutoencoderKL(**model_util.create_vae_diffusers_config())
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                      projection_dim=768))
    model_util.save_stable_diffusion_checkpoint(False, out, te, unet, None, 0, 0, None, torch.float16, vae)


def sdxl(out: str, seed: int = 0) -> None:
    """Full-architecture SDXL (sd-scripts' SdxlUNet2DConditionModel, CLIP-L, OpenCLIP bigG as sd-scripts builds
    them, SD's VAE), random weights initialised directly in fp16 (the default init of each layer; no fp32 copy of
    the 2.6B UNet is ever made), SDXL key names as sd-scripts' `save_stable_diffusion_checkpoint` writes them."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library import model_util, sdxl_model_util, sdxl_original_unet
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.float16)
    clip = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                eos_token_id=2)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768, **clip))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                     num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                                     **clip))
    vae = AutoencoderKL(**model_util.create_vae_diffusers_config())
    sd = {"model.diffusion_model." + k: v for k, v in sdxl_original_unet.SdxlUNet2DConditionModel().state_dict().items()}
    sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in te1.state_dict().items()})
    te2_sd = sdxl_model_util.convert_text_encoder_2_state_dict_to_sdxl(te2.state_dict(), torch.tensor(4.6052))
    sd.update({"conditioner.embedders.1.model." + k: v for k, v in te2_sd.items()})
    sd.update({"first_stage_model." + k: v for k, v in model_util.convert_vae_state_dict(vae.state_dict()).items()})
    sd = {k: v.to(torch.float16).contiguous() for k, v in sd.items() if not k.endswith("position_ids")}
    tmp = out + ".tmp"
    save_file(sd, tmp)
    os.replace(tmp, out)


def images(folder: str, n: int) -> None:
    from PIL import Image
    d = os.path.join(folder, "1_sks")
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        px = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8)
        Image.fromarray(px.numpy()).save(
            os.path.join(d, f"{i}.png"))
        with open(os.path.join(d, f"{i}.txt"), "w") as f:
            f.write(f"a photo of sks {i}")


def merge(ckpt: str, para_file: str, out: str) -> None:
    from safetensors.torch import save_file

    from library import model_util
    from para_core import kohya
    te, vae, unet = model_util.load_models_from_stable_diffusion_checkpoint(False, ckpt, "cpu", torch.float32)
    network, weights_sd = kohya.create_network_from_weights(1.0, para_file, vae, te, unet, for_inference=True)
    network.merge_to(te, unet, weights_sd, torch.float32, "cpu")
    modules = kohya.module_map(te, unet)
    merged = {modules[n].weight.data_ptr() for n in weights_sd.stages}
    sd = {("model.diffusion_model." + k): v for k, v in model_util.convert_unet_state_dict_to_sd(False, unet.state_dict()).items()}
    sd.update({("cond_stage_model.transformer." + k): v for k, v in te.state_dict().items()})
    picked = {k: v.contiguous() for k, v in sd.items() if v.data_ptr() in merged}
    assert len(picked) == len(merged), f"{len(picked)} checkpoint keys for {len(merged)} merged modules"
    save_file(picked, out)


def merge_sdxl(ckpt: str, para_file: str, out: str) -> None:
    """As `merge` for an SDXL checkpoint, keyed by sd-scripts module name, fp32, in shards OUT/NNN.safetensors of
    about 512 MB: the model is dropped before writing, and each shard's weights after it, so the peak stays the
    model's (safetensors serialises a whole file in memory)."""
    import gc

    from safetensors.torch import save_file

    from library import sdxl_model_util
    from para_core import kohya
    te1, te2, vae, unet, _scale, _info = sdxl_model_util.load_models_from_sdxl_checkpoint(
        sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0, ckpt, "cpu", torch.float32)
    network, weights_sd = kohya.create_network_from_weights(1.0, para_file, vae, [te1, te2], unet, for_inference=True)
    network.merge_to([te1, te2], unet, weights_sd, torch.float32, "cpu")
    modules = kohya.module_map([te1, te2], unet)
    merged = {n: modules[n].weight.detach() for n in sorted(weights_sd.stages)}
    del te1, te2, vae, unet, network, modules
    gc.collect()
    os.makedirs(out, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    names = list(merged)
    for i, n in enumerate(names):
        shard[n] = merged.pop(n).contiguous()
        if i == len(names) - 1 or sum(t.numel() for t in shard.values()) * 4 >= 512 << 20:
            save_file(shard, os.path.join(out, f"{i:04d}.safetensors"))
            shard = {}
            gc.collect()


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"tokenizer": tokenizer, "sd15": sd15, "sdxl": sdxl, "merge": merge, "merge_sdxl": merge_sdxl,
     "images": lambda d, n: images(d, int(n))}[cmd](*args)

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
* ``t5tok DIR``: a T5 tokenizer (DIR/google_t5-v1_1-xxl, as ``--tokenizer_cache_dir`` wants it): a unigram vocabulary
  of the 256 byte symbols plus T5's pad / eos / unk, every id < 32128 (T5-XXL's embedding).
* ``flux DIR``: a Flux.1-dev at full width with 1 double and 1 single block (sd-scripts reads the depth from the
  checkpoint: `flux_utils.analyze_checkpoint_state`), random, bf16 (DIR/flux.safetensors), Flux's AE and CLIP-L
  (random, bf16) and T5-XXL as a sparse file of zeros (`t5_zeros`).
* ``sd3 DIR``: an SD3.5-large-layout MMDiT of depth 2 (width 64·depth: sd-scripts reads both from the checkpoint,
  `sd3_utils.analyze_state_dict_state`) with SD3's VAE in the checkpoint, random, bf16; CLIP-L and CLIP-G random
  (bf16; CLIP-G at its full 32 layers, 1.4 GB: `sd3_utils.load_clip_g` builds a fixed config, and a layer sd-scripts
  trains on a zero W0 would never move, W0 - QQᵀW0 = 0), T5-XXL as a sparse file of zeros.
* ``merge_dit FAMILY CKPT PARA OUT [CLIP_L [CLIP_G]]``: load the Flux / SD3 diffusion model (and the CLIPs, when their
  layers were trained) as its trainer does, merge the file with the network's `merge_to`, write the merged weights
  keyed by sd-scripts module name, fp32.
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
    """As `merge` for an SDXL checkpoint, keyed by sd-scripts module name, fp32 (computed from the fp16 W0 as
    ComfyUI does), in shards OUT/NNN.safetensors of about 512 MB: the model is dropped before writing, and each
    shard's weights after it, so the peak stays the model's (safetensors serialises a whole file in memory)."""
    import gc

    from safetensors.torch import save_file

    from library import sdxl_model_util
    from para_core import kohya
    te1, te2, vae, unet, _scale, _info = sdxl_model_util.load_models_from_sdxl_checkpoint(
        sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0, ckpt, "cpu", torch.float16)
    network, weights_sd = kohya.create_network_from_weights(1.0, para_file, vae, [te1, te2], unet, for_inference=True)
    modules = kohya.module_map([te1, te2], unet)
    for n in weights_sd.stages:  # the model as stored (fp16, 7 GB, not 14 in fp32); the merged layers in fp32
        modules[n].weight.data = modules[n].weight.data.float()
    network.merge_to([te1, te2], unet, weights_sd, torch.float32, "cpu")
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


def t5tok(folder: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast
    from transformers.models.clip.tokenization_clip import bytes_to_unicode
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(s, -1.0) for s in bytes_to_unicode().values()]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t5 = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)
    t5.save_pretrained(os.path.join(folder, "google_t5-v1_1-xxl"))


def save_zeros(path: str, model: torch.nn.Module, dtype: str = "BF16") -> None:
    """A safetensors file of `model`'s state-dict keys and shapes, all zeros, written sparse (a header, then a hole):
    sd-scripts mmaps it, so a 9.5 GB T5-XXL costs no disk and only reclaimable page cache. Zero text encoders give
    zero / constant outputs (no NaN: layer norms of 0 are 0), which is all a test of the diffusion model's PaRa needs."""
    import struct
    size = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    header, offset = {}, 0
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        n = v.numel() * size
        header[k] = {"dtype": dtype, "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    os.replace(path + ".tmp", path)


def _save(path: str, sd: dict) -> None:
    from safetensors.torch import save_file
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items() if not k.endswith("position_ids")},
              path + ".tmp")
    os.replace(path + ".tmp", path)


def _clip_l() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                        projection_dim=768))


def _t5_zeros(path: str) -> None:
    """T5-XXL exactly as sd-scripts builds it (`flux_utils.load_t5xxl`'s fixed config, on the meta device), zeros."""
    from library import flux_utils
    if not os.path.isfile(path):
        save_zeros(path, flux_utils.load_t5xxl(None, None, "cpu", state_dict={}))


def flux(folder: str, seed: int = 0) -> None:
    from dataclasses import replace

    from library import flux_models
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    params = replace(flux_models.configs["dev"].params, depth=1, depth_single_blocks=1)
    _save(os.path.join(folder, "flux.safetensors"), flux_models.Flux(params).state_dict())
    _save(os.path.join(folder, "ae.safetensors"),
          flux_models.AutoEncoder(flux_models.configs["dev"].ae_params).state_dict())
    torch.set_default_dtype(torch.float32)
    _save(os.path.join(folder, "clip_l.safetensors"), _clip_l().state_dict())
    _t5_zeros(os.path.join(folder, "t5xxl.safetensors"))


def sd3_params():
    from library import sd3_models
    return sd3_models.SD3Params(patch_size=2, depth=2, num_patches=64 * 64, pos_embed_max_size=64, adm_in_channels=2048,
                                qk_norm="rms", x_block_self_attn_layers=[], context_embedder_in_features=4096,
                                context_embedder_out_features=128, model_type="5-large")


def sd3(folder: str, seed: int = 0) -> None:
    from library import sd3_models, sd3_utils
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    mmdit = sd3_models.create_sd3_mmdit(sd3_params())
    with torch.no_grad():  # what sd3_models leaves uninitialised (torch.empty): RMSNorm scales, the pos_embed buffer
        for name, t in mmdit.state_dict().items():
            if name.endswith((".ln_q.weight", ".ln_k.weight")):
                t.fill_(1.0)
            elif name == "pos_embed":
                t.normal_(0.0, 0.02)
    sd = {"model.diffusion_model." + k: v for k, v in mmdit.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in sd3_models.SDVAE().state_dict().items()})
    _save(os.path.join(folder, "sd3.safetensors"), sd)
    _save(os.path.join(folder, "clip_l.safetensors"), _clip_l().state_dict())
    load, sd3_utils.load_safetensors = sd3_utils.load_safetensors, lambda *a, **k: {}  # CLIP-G as built, on meta
    try:
        config = sd3_utils.load_clip_g("-", None, "cpu").config
    finally:
        sd3_utils.load_safetensors = load
    from transformers import CLIPTextModelWithProjection
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 (1.4 GB, not 2.8 in fp32), transformers' own init
    try:
        _save(os.path.join(folder, "clip_g.safetensors"), CLIPTextModelWithProjection(config).state_dict())
    finally:
        torch.set_default_dtype(torch.float32)
    _t5_zeros(os.path.join(folder, "t5xxl.safetensors"))


def merge_dit(family: str, ckpt: str, para_file: str, out: str, clip_l: str = "", clip_g: str = "") -> None:
    from safetensors.torch import save_file

    from para_core import kohya
    tes = []
    if clip_l and family == "flux":  # Flux's text encoders as its trainer passes them, [CLIP-L, T5]: lora_te1 (T5 untrained)
        from library import flux_utils
        tes = [flux_utils.load_clip_l(clip_l, torch.float32, "cpu"), None]
    elif clip_l:  # SD3's, [CLIP-L, CLIP-G, T5]: lora_te1, lora_te2 (T5 untrained)
        from library import sd3_utils
        tes = [sd3_utils.load_clip_l(clip_l, torch.float32, "cpu"), sd3_utils.load_clip_g(clip_g, torch.float32, "cpu"),
               None]
    if family == "flux":
        from library import flux_utils
        _, model = flux_utils.load_flow_model(ckpt, torch.float32, "cpu")
    else:
        from library import sd3_utils
        from library.safetensors_utils import load_safetensors
        model = sd3_utils.load_mmdit(load_safetensors(ckpt, "cpu", dtype=torch.float32), torch.float32, "cpu")
    network, weights_sd = kohya.create_network_from_weights(1.0, para_file, None, tes, model, for_inference=True)
    network.merge_to(tes, model, weights_sd, torch.float32, "cpu")
    modules = kohya.module_map(tes, model)
    save_file({n: modules[n].weight.detach().float().contiguous() for n in sorted(weights_sd.stages)}, out)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"tokenizer": tokenizer, "sd15": sd15, "sdxl": sdxl, "merge": merge, "merge_sdxl": merge_sdxl,
     "t5tok": t5tok, "flux": flux, "sd3": sd3, "merge_dit": merge_dit,
     "images": lambda d, n: images(d, int(n))}[cmd](*args)

"""Tiny instances of every generator family ComfyUI loads (0.8's, plus 0.33's newer ones), for the family matrix.

Each family is built the way ComfyUI builds a detected model - ``comfy.supported_models.<Class>(unet_config)``
then ``get_model()`` - but with a small hand-written config instead of one detected from a checkpoint (the
detectors hard-code full-size widths for most families, e.g. Flux hidden 3072). So the module names, the
model classes (``model.model_config``, ``model.diffusion_model``), the latent formats, the sampling and the
conditioning path (``extra_conds``) are ComfyUI's own; only widths and depths are small. Weights are
initialised explicitly (ComfyUI's ops skip init): N(0, 1/fan_in) matrices, unit norm scales, small biases.

``FAMILIES`` is the one table: family key -> Family(supported_models class, unet_config, latent shape of one
sample (C, H, W) or (C, T, H, W), conditioning tokens x dim, extra conditioning tensors (pooled output,
llama3 layers) and extra conditioning values). ``available()`` is the part the running ComfyUI has classes for.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

import torch

GEN_SEED = 1234


@dataclass(frozen=True)
class Family:
    config_class: str                    # comfy.supported_models.<name>
    unet_config: dict
    latent: tuple                        # one sample: (C, H, W) or (C, T, H, W)
    tokens: int                          # conditioning: (1, tokens, context_dim)
    context_dim: int
    extra_tensors: dict = field(default_factory=dict)   # name -> shape, e.g. pooled_output
    extra_values: dict = field(default_factory=dict)    # name -> python value, e.g. guidance
    video: bool = False
    over_class_defaults: bool = False   # unet_config wins over the class's unet_extra_config (full-size defaults)


_UNET = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, num_res_blocks=[1, 1],
             channel_mult=[1, 2], transformer_depth_middle=-2, use_temporal_resblock=False, use_temporal_attention=False,
             num_head_channels=-1, num_heads=2)

WAN_TINY = dict(
        image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=64, ffn_dim=128,
        freq_dim=32, text_dim=64, out_dim=16, num_heads=2, num_layers=1, window_size=(-1, -1), qk_norm=True,
        cross_attn_norm=True, eps=1e-6)

FAMILIES: dict[str, Family] = {
    "sd15": Family("SD15", dict(_UNET, in_channels=4, out_channels=4, model_channels=32, context_dim=768,
                                transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], use_linear_in_transformer=False,
                                adm_in_channels=None), (4, 8, 8), 4, 768),
    # SDXL and Flux dev take CLIP-L sized conditioning (context 768, pooled 768; SDXL's adm = pooled + 6 x 256 size
    # embeddings), so the example workflows can run them with the tiny SD1.5 checkpoint's real CLIP-L.
    "sdxl": Family("SDXL", dict(_UNET, in_channels=4, out_channels=4, model_channels=32, context_dim=768,
                                transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1], use_linear_in_transformer=True,
                                num_classes="sequential", adm_in_channels=768 + 6 * 256), (4, 8, 8), 4, 768,
                   {"pooled_output": (1, 768)}, {"width": 64, "height": 64}),
    "sd35": Family("SD3", dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=64,
                               context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
                               pos_embed_max_size=8, num_patches=64, pos_embed_scaling_factor=None, qk_norm="rms",
                               x_block_self_attn_layers=[0]), (16, 8, 8), 4, 64, {"pooled_output": (1, 64)}),
    "auraflow": Family("AuraFlow", dict(in_channels=4, out_channels=4, patch_size=2, dim=64, n_layers=2, n_double_layers=1,
                                        n_heads=2, global_conddim=64, cond_seq_dim=64, max_seq=64), (4, 8, 8), 4, 64),
    "cosmos_predict2": Family("CosmosT2IPredict2", dict(
        image_model="cosmos_predict2", max_img_h=64, max_img_w=64, max_frames=8, in_channels=16, out_channels=16,
        patch_spatial=2, patch_temporal=1, concat_padding_mask=True, model_channels=64, num_blocks=2, num_heads=2,
        crossattn_emb_channels=64, pos_emb_cls="rope3d", pos_emb_learnable=True, pos_emb_interpolation="crop",
        min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=16, extra_per_block_abs_pos_emb=False,
        rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0, rope_t_extrapolation_ratio=1.0,
        extra_h_extrapolation_ratio=1.0, extra_w_extrapolation_ratio=1.0, extra_t_extrapolation_ratio=1.0,
        rope_enable_fps_modulation=False), (16, 1, 8, 8), 4, 64, video=True),
    "cascade_c": Family("Stable_Cascade_C", dict(
        stable_cascade_stage="c", c_in=16, c_out=16, c_r=32, c_cond=64, c_hidden=[64, 64], nhead=[2, 2],
        blocks=[[1, 1], [1, 1]], block_repeat=[[1, 1], [1, 1]], level_config=["CTA", "CTA"], c_clip_text=64,
        c_clip_text_pooled=64, c_clip_img=768, c_clip_seq=4), (16, 8, 8), 4, 64, {"pooled_output": (1, 1, 64)}),
    "pixart_sigma": Family("PixArtSigma", dict(
        image_model="pixart_sigma", input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
        caption_channels=64, model_max_length=8, micro_condition=False, pe_interpolation=1, learn_sigma=True,
        pred_sigma=True), (4, 40, 40), 4, 64),  # PixArt sizes its position table from (H+W)/2: at least 40
    "flux_dev": Family("Flux", dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=768, hidden_size=64,
        mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=True, txt_ids_dims=[]), (16, 8, 8), 4, 768, {"pooled_output": (1, 768)},
        {"guidance": 3.5}),
    "flux_schnell": Family("FluxSchnell", dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=64,
        mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=False, txt_ids_dims=[]), (16, 8, 8), 4, 64, {"pooled_output": (1, 32)}),
    "chroma": Family("Chroma", dict(
        image_model="chroma", in_channels=64, out_channels=64, context_in_dim=64, hidden_size=64, mlp_ratio=4.0,
        num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
        in_dim=64, out_dim=64, hidden_dim=64, n_layers=2, txt_ids_dims=[], vec_in_dim=None), (16, 8, 8), 4, 64,
        extra_values={"pooled_output": None}),
    "lumina2": Family("Lumina2", dict(
        image_model="lumina2", patch_size=2, in_channels=16, dim=64, cap_feat_dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=1, qk_norm=True, axes_dims=[8, 12, 12], axes_lens=[300, 64, 64], rope_theta=10000.0,
        ffn_dim_multiplier=4.0, multiple_of=16), (16, 8, 8), 4, 64),
    "z_image": Family("ZImage", dict(
        image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, qk_norm=True, axes_dims=[32, 48, 48], axes_lens=[64, 64, 64], rope_theta=256.0,
        ffn_dim_multiplier=8.0 / 3.0, multiple_of=16, z_image_modulation=True, time_scale=1000.0,
        pad_tokens_multiple=8), (16, 8, 8), 4, 64),
    "qwen_image": Family("QwenImage", dict(
        image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(8, 12, 12)), (16, 1, 8, 8), 4, 64),
    "hidream": Family("HiDream", dict(
        image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=32, num_attention_heads=2, caption_channels=[64, 64], text_emb_dim=32,
        num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(16, 8, 8), max_resolution=(16, 16),
        llama_layers=[0, 1]), (16, 8, 8), 4, 64,
        {"pooled_output": (1, 32), "conditioning_llama3": (1, 2, 4, 64)}),
    "hunyuan_video": Family("HunyuanVideo", dict(
        image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
        hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=256,
        patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False,
        use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False), (16, 3, 8, 8), 4, 64,
        {"pooled_output": (1, 32)}, {"guidance": 6.0}, video=True),
    "hunyuan_image21": Family("HunyuanImage21", dict(
        image_model="hunyuan_video", in_channels=64, out_channels=64, vec_in_dim=None, context_in_dim=64,
        hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 16], theta=256,
        patch_size=[1, 1], qkv_bias=True, guidance_embed=False, byt5=False, meanflow=False,
        use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False), (64, 4, 4), 4, 64),
    "wan21": Family("WAN21_T2V", dict(
        image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=64, ffn_dim=128,
        freq_dim=32, text_dim=64, out_dim=16, num_heads=2, num_layers=2, window_size=(-1, -1), qk_norm=True,
        cross_attn_norm=True, eps=1e-6), (16, 3, 8, 8), 4, 64, video=True),
    "wan22_5b": Family("WAN22_T2V", dict(
        image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=48, dim=64, ffn_dim=128,
        freq_dim=32, text_dim=64, out_dim=48, num_heads=2, num_layers=2, window_size=(-1, -1), qk_norm=True,
        cross_attn_norm=True, eps=1e-6), (48, 3, 8, 8), 4, 64, video=True),
    "ltxv": Family("LTXV", dict(
        image_model="ltxv", in_channels=128, cross_attention_dim=64, attention_head_dim=32, num_attention_heads=2,
        caption_channels=64, num_layers=2), (128, 2, 4, 4), 4, 64,
        extra_values={"attention_mask": torch.ones(1, 4, dtype=torch.long)}, video=True),
}

# Added with ComfyUI 0.33's generators (OmniGen2, Kandinsky 5, HunyuanDiT and Cosmos 1 are in 0.8 too); `available()` leaves out the
# families the running ComfyUI has no class for.
FAMILIES.update({
    "longcat_image": Family("LongCatImage", dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=None, context_in_dim=64, hidden_size=64,
        mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=False, txt_ids_dims=[1, 2]), (16, 8, 8), 4, 64),
    "z_image_pixel": Family("ZImagePixelSpace", dict(
        image_model="zimage_pixel", patch_size=2, in_channels=3, dim=256, cap_feat_dim=64, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, qk_norm=True, axes_dims=[32, 48, 48], axes_lens=[64, 64, 64], rope_theta=256.0,
        ffn_dim_multiplier=8.0 / 3.0, multiple_of=16, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=8,
        decoder_hidden_size=32, decoder_num_res_blocks=1), (3, 8, 8), 4, 64),
    "lens": Family("Lens", dict(
        image_model="lens", patch_size=2, in_channels=128, out_channels=32, num_layers=1, attention_head_dim=32,
        num_attention_heads=2, enc_hidden_dim=32, axes_dims_rope=(8, 12, 12), selected_layer_index=(0, 1)),
        (128, 4, 4), 4, 64),
    "mage_flow": Family("MageFlow", dict(
        image_model="mage_flow", in_channels=128, out_channels=128, num_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(8, 12, 12)), (128, 4, 4), 4, 64),
    "ernie_image": Family("ErnieImage", dict(
        image_model="ernie", hidden_size=64, num_attention_heads=2, num_layers=1, ffn_hidden_size=128, in_channels=128,
        out_channels=128, text_in_dim=32, rope_axes_dim=(8, 12, 12)), (128, 4, 4), 4, 32),
    "joyimage": Family("JoyImage", dict(
        image_model="joyimage", patch_size=[1, 2, 2], in_channels=16, hidden_size=64, num_attention_heads=2, text_dim=64,
        num_layers=1, rope_dim_list=[8, 12, 12], theta=10000), (16, 1, 8, 8), 4, 64, over_class_defaults=True),
    "krea2": Family("Krea2", dict(
        image_model="krea2", features=64, tdim=32, txtdim=64, heads=2, kvheads=2, multiplier=2, layers=1, patch=2,
        channels=16, txtlayers=1, txtheads=2, txtkvheads=2), (16, 1, 8, 8), 4, 64),
    "ideogram4": Family("Ideogram4", dict(
        image_model="ideogram4", in_channels=128, num_layers=1, num_attention_heads=2, attention_head_dim=32,
        intermediate_size=128, adaln_dim=32, llm_features_dim=64, rope_theta=10000, mrope_section=[4, 6, 6],
        norm_eps=1e-5), (128, 4, 4), 4, 64, over_class_defaults=True),
    "boogu": Family("Boogu", dict(
        image_model="boogu", patch_size=2, in_channels=16, hidden_size=64, num_layers=2, num_double_stream_layers=1,
        num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 12, 12),
        axes_lens=(64, 64, 64), instruction_feat_dim=64), (16, 8, 8), 4, 64,
        extra_values={"attention_mask": torch.ones(1, 4, dtype=torch.long)}),
    "cogvideox": Family("CogVideoX_T2V", dict(
        image_model="cogvideox", num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
        time_embed_dim=32, text_embed_dim=64, num_layers=1, sample_width=8, sample_height=8, sample_frames=5,
        max_text_seq_length=4, use_rotary_positional_embeddings=True), (16, 2, 8, 8), 4, 64, video=True),
    "pixeldit": Family("PixelDiTT2I", dict(
        image_model="pixeldit_t2i", in_channels=3, num_groups=2, hidden_size=64, pixel_hidden_size=8,
        pixel_attn_hidden_size=32, pixel_num_groups=2, patch_depth=1, pixel_depth=1, patch_size=4, txt_embed_dim=64,
        txt_max_length=8), (3, 16, 16), 4, 64),
    "hidream_o1": Family("HiDreamO1", dict(
        image_model="hidream_o1", text_config_overrides=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, rope_dims=[4, 6, 6]),
        vision_config_overrides=dict(hidden_size=32, num_heads=2, intermediate_size=64, depth=1, num_position_embeddings=64,
                                     deepstack_visual_indexes=())), (3, 64, 64), 4, 64,
        extra_values={"text_input_ids": torch.tensor([[11, 12, 13, 14]])}),
    "anima": Family("Anima", dict(
        image_model="anima", max_img_h=64, max_img_w=64, max_frames=8, in_channels=16, out_channels=16, patch_spatial=2,
        patch_temporal=1, concat_padding_mask=True, model_channels=64, num_blocks=1, num_heads=2, crossattn_emb_channels=1024,
        pos_emb_cls="rope3d", pos_emb_learnable=True, pos_emb_interpolation="crop", min_fps=1, max_fps=30,
        use_adaln_lora=True, adaln_lora_dim=16, extra_per_block_abs_pos_emb=False, rope_h_extrapolation_ratio=4.0,
        rope_w_extrapolation_ratio=4.0, rope_t_extrapolation_ratio=1.0, extra_h_extrapolation_ratio=1.0,
        extra_w_extrapolation_ratio=1.0, extra_t_extrapolation_ratio=1.0, rope_enable_fps_modulation=False),
        (16, 1, 8, 8), 4, 1024, video=True),
    "omnigen2": Family("Omnigen2", dict(
        image_model="omnigen2", patch_size=2, in_channels=16, hidden_size=64, num_layers=1, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 12, 12), axes_lens=(64, 64, 64),
        text_feat_dim=64), (16, 8, 8), 4, 64, extra_values={"attention_mask": torch.ones(1, 4, dtype=torch.long)}),
    "kandinsky5": Family("Kandinsky5", dict(
        image_model="kandinsky5", in_visual_dim=16, out_visual_dim=16, in_text_dim=64, in_text_dim2=32, time_dim=32,
        model_dim=64, ff_dim=128, visual_embed_dim=132, patch_size=(1, 2, 2), num_text_blocks=1, num_visual_blocks=1,
        axes_dims=(8, 12, 12)), (16, 3, 8, 8), 4, 64, {"pooled_output": (1, 32)}, video=True),
    "hunyuan_dit": Family("HunyuanDiT", dict(
        image_model="hydit", input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
        text_states_dim=64, text_states_dim_t5=64, text_len=4, text_len_t5=4, learn_sigma=True), (4, 8, 8), 4, 64,
        {"conditioning_mt5xl": (1, 4, 64)}, {"attention_mask": torch.ones(1, 4, dtype=torch.long),
                                              "attention_mask_mt5xl": torch.ones(1, 4, dtype=torch.long)}),
    "cosmos1": Family("CosmosT2V", dict(
        image_model="cosmos", max_img_h=64, max_img_w=64, max_frames=8, in_channels=16, out_channels=16, patch_spatial=2,
        patch_temporal=1, model_channels=64, block_config="FA-CA-MLP", concat_padding_mask=True, pos_emb_cls="rope3d",
        pos_emb_learnable=False, pos_emb_interpolation="crop", block_x_format="THWBD", affline_emb_norm=True,
        use_adaln_lora=True, adaln_lora_dim=16, num_blocks=1, num_heads=2, extra_per_block_abs_pos_emb=True,
        rope_h_extrapolation_ratio=1.0, rope_w_extrapolation_ratio=1.0, rope_t_extrapolation_ratio=2.0,
        extra_per_block_abs_pos_emb_type="learnable", crossattn_emb_channels=64), (16, 2, 8, 8), 4, 64, video=True),
    "wan21_causal": Family("WAN21_CausalAR_T2V", WAN_TINY, (16, 3, 8, 8), 4, 64, video=True),
    "wan_animate2": Family("WAN_Animate2", dict(WAN_TINY, model_type="animate2"), (16, 3, 8, 8), 4, 64, video=True),
    "flux2": Family("Flux2", dict(
        image_model="flux2", in_channels=16, out_channels=16, vec_in_dim=None, context_in_dim=64, hidden_size=64,
        mlp_ratio=3.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 8, 8, 8], theta=2000, patch_size=1,
        qkv_bias=False, guidance_embed=True, global_modulation=True, mlp_silu_act=True, ops_bias=False,
        default_ref_method="index", ref_index_scale=10.0, txt_ids_dims=[3]), (16, 8, 8), 4, 64, {},
        {"guidance": 4.0, "pooled_output": None}),
    "chroma_radiance": Family("ChromaRadiance", dict(
        image_model="chroma_radiance", in_channels=3, out_channels=3, context_in_dim=64, hidden_size=64, mlp_ratio=4.0,
        num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=4, qkv_bias=True,
        in_dim=64, out_dim=64, hidden_dim=64, n_layers=2, txt_ids_dims=[], vec_in_dim=None, nerf_hidden_size=16,
        nerf_mlp_ratio=2, nerf_depth=1, nerf_max_freqs=4, nerf_tile_size=0, nerf_final_head_type="conv",
        nerf_embedder_dtype=torch.float32, use_x0=False, use_sequential_txt_ids=False), (3, 16, 16), 4, 64,
        extra_values={"pooled_output": None}),
    # HunyuanVideo 1.5: 32 latent channels + 32 image-condition channels + 1 mask (zeros for text-to-video)
    "hunyuan_video15": Family("HunyuanVideo15", dict(
        image_model="hunyuan_video", in_channels=65, out_channels=32, vec_in_dim=None, context_in_dim=64,
        hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=256,
        patch_size=[1, 1, 1], qkv_bias=True, guidance_embed=False, byt5=False, meanflow=False,
        use_cond_type_embedding=True, vision_in_dim=32, meanflow_sum=True), (32, 2, 4, 4), 4, 64,
        extra_values={"pooled_output": None}, video=True),
    # Mochi asserts its full-size MLP width (1536 x 8): hidden 64 x ratio 192
    "mochi": Family("GenmoMochi", dict(
        image_model="mochi_preview", depth=1, patch_size=2, num_heads=2, hidden_size_x=64, hidden_size_y=32,
        mlp_ratio_x=192.0, mlp_ratio_y=4.0, learn_sigma=False, in_channels=12, qk_norm=True, qkv_bias=False,
        out_bias=True, attn_drop=0.0, patch_embed_bias=True, posenc_preserve_area=True, timestep_mlp_bias=True,
        attend_to_padding=False, timestep_scale=1000.0, use_t5=True, t5_feat_dim=64, t5_token_length=4,
        rope_theta=10000.0), (12, 2, 8, 8), 4, 64, extra_values={"attention_mask": torch.ones(1, 4, dtype=torch.long)},
        video=True),
    # Joint audio + video generators: their latent is a packed [video, audio] pair, so the matrix patches them
    # (Load / Merge / PaRa + LoRA / presets) but does not train them (AUDIO_VIDEO in test_families.py).
    "ltxav": Family("LTXAV", dict(
        image_model="ltxav", in_channels=128, audio_in_channels=128, cross_attention_dim=64, audio_cross_attention_dim=32,
        attention_head_dim=32, audio_attention_head_dim=16, num_attention_heads=2, audio_num_attention_heads=2,
        caption_channels=64, num_layers=1, connector_attention_head_dim=32, connector_num_attention_heads=2,
        connector_num_layers=1), (128, 2, 4, 4), 4, 64, video=True),
    "minimax_h3": Family("MiniMaxH3", dict(
        image_model="minimax_h3", hidden_size=64, num_layers=1, token_refiner_num_layers=1, num_attention_heads=2,
        attention_head_dim=32, ffn_hidden_size=128, latents_dim=24, audio_latents_dim=32, text_dim=64,
        timestep_input_dim=32, time_embed_hidden_size=64, time_embed_dim=32, rope_inv_freq_len=8), (24, 2, 8, 8), 4, 64,
        video=True),
})


def available() -> list[str]:
    """The family keys whose supported_models class the running ComfyUI has (feature detection: conftest's
    check_importable has imported comfy.supported_models by collection time; none without ComfyUI)."""
    sm = sys.modules.get("comfy.supported_models")
    return [k for k, f in FAMILIES.items() if sm is not None and hasattr(sm, f.config_class)]



def init_weights(module: torch.nn.Module, seed: int = GEN_SEED) -> None:
    """Explicit init (ComfyUI's ops leave parameters uninitialised): N(0, 1/fan_in) for ≥2-D weights and
    tables, 1 for norm scales, N(0, 0.02²) for biases and other vectors and for ≥2-D buffers that are part of
    the state dict (uninitialised memory otherwise: runs would differ); other non-finite buffers zeroed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
            is_norm = any(s in owner.lower() for s in ("norm", "ln")) or leaf in ("scale", "gamma")
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) / fan_in ** 0.5)
            elif is_norm and leaf in ("weight", "scale", "gamma"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.02)
        persistent = set(module.state_dict())
        for name, b in module.named_buffers():
            if not b.is_floating_point():
                continue
            if name in persistent and b.ndim >= 2:  # checkpoint-loaded tables left torch.empty (SD3 pos_embed, PixArt y_embedding)
                b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float32).to(b.dtype) * 0.02)
            elif not torch.isfinite(b).all():
                b.zero_()


_BUILT: dict[str, object] = {}


def build(key: str):
    """A ModelPatcher of the tiny `key` family (CPU, fp32 weights), built once per process; returns a clone."""
    if key not in _BUILT:
        import comfy.model_patcher
        import comfy.supported_models
        fam = FAMILIES[key]
        config = dict(fam.unet_config)
        while True:
            mc = getattr(comfy.supported_models, fam.config_class)(dict(config))
            if fam.over_class_defaults:
                mc.unet_config.update(config)
            mc.set_inference_dtype(torch.float32, None)
            try:
                model = mc.get_model({}, "", device="cpu")
                break
            except TypeError as e:  # a config key a later ComfyUI added (e.g. Chroma Radiance's use_sequential_txt_ids)
                unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
                if unknown is None or unknown.group(1) not in config:
                    raise
                del config[unknown.group(1)]
        init_weights(model.diffusion_model)
        model.eval()
        _BUILT[key] = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    return _BUILT[key].clone()


def clear_built() -> None:
    """Drop the built models (at the end of the session: conftest.py)."""
    _BUILT.clear()


def conditioning(key: str, seed: int = 1, n: int = 1) -> list:
    """A CONDITIONING value for `key`: n entries [(1, tokens, dim), {extras}] with fixed random tensors."""
    fam = FAMILIES[key]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        extras = {k: torch.randn(s, generator=gen) for k, s in fam.extra_tensors.items()}
        extras.update(fam.extra_values)
        out.append([torch.randn(1, fam.tokens, fam.context_dim, generator=gen), extras])
    return out


def latents(key: str, n: int = 2, seed: int = 0) -> torch.Tensor:
    """n smooth structured latents (low-frequency sinusoids per channel, also along time) of `key`'s shape."""
    shape = FAMILIES[key].latent
    gen = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.linspace(0, 1, s) for s in shape[1:]], indexing="ij")
    out = torch.zeros((n,) + tuple(shape))
    for i in range(n):
        for c in range(shape[0]):
            f = torch.rand(len(grids) + 1, generator=gen)
            phase = sum(3.0 * f[j] * g for j, g in enumerate(grids)) + 6.28 * f[-1]
            out[i, c] = torch.sin(6.28 * phase) * (1.0 + 0.1 * (c % 4))
    return out


def model_conds(patcher, key: str, x: torch.Tensor, seed: int = 1) -> dict:
    """The model kwargs ComfyUI's sampler would pass for `key`'s conditioning on latent x (process_conds)."""
    import comfy.sampler_helpers
    import comfy.samplers
    base = patcher.model
    c = comfy.samplers.process_conds(base, x, {"positive": comfy.sampler_helpers.convert_cond(conditioning(key, seed))},
                                     torch.device("cpu"), seed=0)
    entry = c["positive"][0]
    return {k: v.process_cond(batch_size=x.shape[0], area=None).cond for k, v in entry["model_conds"].items()}


def forward(patcher, key: str, x: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """One denoiser evaluation (apply_model) of the model as it is now, at σ, on x (already process_latent_in).
    Evaluated cold: a model that caches across calls (HiDream-O1's text K/V, `clear_kv_cache`) drops its cache
    first, so the result is a function of the weights, not of which calls came before."""
    base = patcher.model
    clear = getattr(base.diffusion_model, "clear_kv_cache", None)
    if callable(clear):
        clear()
    kw = model_conds(patcher, key, x)
    s = torch.full((x.shape[0],), float(base.model_sampling.percent_to_sigma(sigma)))
    with torch.no_grad():
        return base.apply_model(x, s, transformer_options={"sigmas": s, "cond_or_uncond": [0] * x.shape[0]}, **kw)

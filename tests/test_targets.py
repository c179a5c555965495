"""Layer presets, include/exclude patterns and the rank boundary, on real module-name layouts."""
import pytest

from para_core.targets import (PRESETS, detect_layout, effective_rank, family_for_model, plan, select)

P = "diffusion_model."
TB = "input_blocks.1.1.transformer_blocks.0."

# SD1.5 / SDXL UNet: one resblock, one transformer, time and label embeddings (ComfyUI-native names).
UNET_SELF = [P + TB + f"attn1.{x}" for x in ("to_q", "to_k", "to_v", "to_out.0")]
UNET_CROSS = [P + TB + f"attn2.{x}" for x in ("to_q", "to_k", "to_v", "to_out.0")]
UNET_EMBED = [P + "time_embed.0", P + "time_embed.2", P + "label_emb.0.0", P + "label_emb.0.2",
              P + "input_blocks.1.0.emb_layers.1", P + "output_blocks.0.0.emb_layers.1"]
UNET_REST = [P + "input_blocks.0.0", P + "input_blocks.1.0.in_layers.2", P + "input_blocks.1.0.out_layers.3",
             P + "input_blocks.1.1.proj_in", P + TB + "ff.net.0.proj", P + TB + "ff.net.2", P + "input_blocks.1.1.proj_out",
             P + "input_blocks.2.0.op", P + "output_blocks.0.0.skip_connection", P + "output_blocks.2.1.conv", P + "out.2"]
UNET = UNET_EMBED[:2] + UNET_REST[:4] + UNET_SELF + UNET_CROSS + UNET_REST[4:] + UNET_EMBED[2:]

# SD3 MMDiT (depth 2, SD3.5-style attn2 in block 0; last context block is pre-only), from the tiny model.
SD3_X_ATTN = [P + "joint_blocks.0.x_block.attn.qkv", P + "joint_blocks.0.x_block.attn.proj",
              P + "joint_blocks.0.x_block.attn2.qkv", P + "joint_blocks.0.x_block.attn2.proj",
              P + "joint_blocks.1.x_block.attn.qkv", P + "joint_blocks.1.x_block.attn.proj"]
SD3_X_MLP = [P + f"joint_blocks.{i}.x_block.mlp.fc{j}" for i in (0, 1) for j in (1, 2)]
SD3_CTX_ATTN = [P + "joint_blocks.0.context_block.attn.qkv", P + "joint_blocks.0.context_block.attn.proj",
                P + "joint_blocks.1.context_block.attn.qkv"]
SD3_CTX_MLP = [P + "joint_blocks.0.context_block.mlp.fc1", P + "joint_blocks.0.context_block.mlp.fc2"]
SD3_EMBED = [P + "t_embedder.mlp.0", P + "t_embedder.mlp.2", P + "y_embedder.mlp.0", P + "y_embedder.mlp.2",
             P + "context_embedder", P + "joint_blocks.0.context_block.adaLN_modulation.1",
             P + "joint_blocks.0.x_block.adaLN_modulation.1", P + "joint_blocks.1.context_block.adaLN_modulation.1",
             P + "joint_blocks.1.x_block.adaLN_modulation.1", P + "final_layer.adaLN_modulation.1"]
SD3_IO = [P + "x_embedder.proj", P + "final_layer.linear"]
SD3 = SD3_IO[:1] + SD3_EMBED + SD3_CTX_ATTN + SD3_CTX_MLP + SD3_X_ATTN + SD3_X_MLP + SD3_IO[1:]

# Flux (1 double block, 1 single block), from the tiny model.
FLUX_IMG_ATTN = [P + "double_blocks.0.img_attn.qkv", P + "double_blocks.0.img_attn.proj"]
FLUX_SINGLE = [P + "single_blocks.0.linear1", P + "single_blocks.0.linear2"]
FLUX_IMG_MLP = [P + "double_blocks.0.img_mlp.0", P + "double_blocks.0.img_mlp.2"]
FLUX_TXT_ATTN = [P + "double_blocks.0.txt_attn.qkv", P + "double_blocks.0.txt_attn.proj"]
FLUX_TXT_OTHER = [P + "double_blocks.0.txt_mlp.0", P + "double_blocks.0.txt_mlp.2", P + "txt_in"]
FLUX_EMBED = [P + "time_in.in_layer", P + "time_in.out_layer", P + "vector_in.in_layer", P + "vector_in.out_layer",
              P + "guidance_in.in_layer", P + "guidance_in.out_layer", P + "double_blocks.0.img_mod.lin",
              P + "double_blocks.0.txt_mod.lin", P + "single_blocks.0.modulation.lin", P + "final_layer.adaLN_modulation.1"]
FLUX_IO = [P + "img_in", P + "final_layer.linear"]
FLUX = FLUX_IO + FLUX_EMBED + FLUX_IMG_ATTN + FLUX_IMG_MLP + FLUX_TXT_ATTN + FLUX_TXT_OTHER + FLUX_SINGLE


def test_layout_detection():
    assert detect_layout(UNET) == "unet"
    assert detect_layout(SD3) == "mmdit"
    assert detect_layout(FLUX) == "flux"
    assert detect_layout(["blocks.0.attn.qkv"]) == "generic"


@pytest.mark.parametrize("preset,expected", [
    ("ExCA", set(UNET_SELF + UNET_REST)),
    ("self_attention", set(UNET_SELF)),
    ("attention", set(UNET_SELF + UNET_CROSS)),
    ("all", set(UNET)),
])
def test_unet_presets(preset, expected):
    got = select(UNET, preset)
    assert set(got) == expected
    assert got == [n for n in UNET if n in expected]  # model order kept


@pytest.mark.parametrize("preset,expected", [
    ("ExCA", set(SD3_IO + SD3_X_ATTN + SD3_X_MLP)),
    ("self_attention", set(SD3_X_ATTN)),
    ("attention", set(SD3_X_ATTN + SD3_CTX_ATTN)),
    ("all", set(SD3)),
])
def test_mmdit_presets(preset, expected):
    assert set(select(SD3, preset)) == expected


@pytest.mark.parametrize("preset,expected", [
    ("ExCA", set(FLUX_IO + FLUX_IMG_ATTN + FLUX_IMG_MLP + FLUX_SINGLE)),
    ("self_attention", set(FLUX_IMG_ATTN + FLUX_SINGLE)),
    ("attention", set(FLUX_IMG_ATTN + FLUX_SINGLE + FLUX_TXT_ATTN)),
    ("all", set(FLUX)),
])
def test_flux_presets(preset, expected):
    assert set(select(FLUX, preset)) == expected


def test_prefix_is_optional():
    bare = [n[len(P):] for n in UNET]
    assert select(bare, "ExCA") == [n[len(P):] for n in select(UNET, "ExCA")]


def test_include_and_exclude_patterns():
    # include adds to the preset, exclude removes from the result (exclude wins)
    got = select(UNET, "self_attention", include=r"attn2\.to_k", exclude=r"to_out")
    assert got == [P + TB + "attn1.to_q", P + TB + "attn1.to_k", P + TB + "attn1.to_v", P + TB + "attn2.to_k"]
    # comma / newline separated lists, blanks ignored
    got = select(UNET, "ExCA", exclude="ff\\.net , \n proj_(in|out)")
    assert set(got) == set(UNET_SELF + UNET_REST) - {P + TB + "ff.net.0.proj", P + TB + "ff.net.2",
                                                     P + "input_blocks.1.1.proj_in", P + "input_blocks.1.1.proj_out"}
    with pytest.raises(ValueError, match="not a valid regular expression"):
        select(UNET, "ExCA", include="attn(")
    with pytest.raises(ValueError, match="unknown target preset"):
        select(UNET, "exca")


def test_rank_boundary():
    assert effective_rank(8, 320, 0.025) == 8            # floor(8.0)
    assert effective_rank(8, 319, 0.025) == 7            # floor(7.975)
    assert effective_rank(16, 1280, 0.025) == 16
    assert effective_rank(64, 1280, 0.025) == 32
    assert effective_rank(4, 16, 0.025) == 1             # max(1, floor(0.4))
    assert effective_rank(8, 320, 0.0) == 8              # γ = 0: off
    assert effective_rank(8, 4, 0.0) == 3                # never above out - 1 (rank = out leaves only the bias)
    assert effective_rank(8, 1, 0.0) == 1
    assert effective_rank(3, 4, 1.0) == 3
    with pytest.raises(ValueError):
        effective_rank(0, 320)


def test_plan_reports_effective_ranks():
    dims = {P + TB + "attn1.to_q": 320, P + TB + "ff.net.0.proj": 2560, P + "out.2": 4, P + "time_embed.0": 1280}
    p = plan(dims, "ExCA", rank=16, gamma=0.025)
    assert p.ranks == {P + TB + "attn1.to_q": 8, P + TB + "ff.net.0.proj": 16, P + "out.2": 1}
    assert p.capped() == 2
    assert p.describe() == "3 layers (ExCA, unet); r=16: 1, r=8: 1, r=1: 1; 2 capped by rank boundary γ=0.025"
    assert plan(dims, "ExCA", 16, 0.0).ranks[P + TB + "attn1.to_q"] == 16
    assert plan(dims, "all", 4, 0.0, exclude="time").targets_string() == "all -exclude(time)"


def test_every_preset_is_tested():
    assert set(PRESETS) == {"ExCA", "self_attention", "attention", "all"}
# Module names of the tiny ComfyUI models built in tests/integration/families.py (block indices > 2 dropped),
# dumped from ComfyUI 0.8.0: (config class, diffusion model class, names without 'diffusion_model.').
REAL = {
    "auraflow": ("AuraFlow", "MMDiT", """
        t_embedder.mlp.0 t_embedder.mlp.2 cond_seq_linear init_x_linear double_layers.0.mlpC.c_fc1
        double_layers.0.mlpC.c_fc2 double_layers.0.mlpC.c_proj double_layers.0.modC.1 double_layers.0.mlpX.c_fc1
        double_layers.0.mlpX.c_fc2 double_layers.0.mlpX.c_proj double_layers.0.modX.1 double_layers.0.attn.w1q
        double_layers.0.attn.w1k double_layers.0.attn.w1v double_layers.0.attn.w1o double_layers.0.attn.w2q
        double_layers.0.attn.w2k double_layers.0.attn.w2v double_layers.0.attn.w2o single_layers.0.modCX.1
        single_layers.0.attn.w1q single_layers.0.attn.w1k single_layers.0.attn.w1v single_layers.0.attn.w1o
        single_layers.0.mlp.c_fc1 single_layers.0.mlp.c_fc2 single_layers.0.mlp.c_proj final_linear modF.1""".split()),
    "cosmos_predict2": ("CosmosT2IPredict2", "MiniTrainDIT", """
        t_embedder.1.linear_1 t_embedder.1.linear_2 x_embedder.proj.1 blocks.0.self_attn.q_proj
        blocks.0.self_attn.k_proj blocks.0.self_attn.v_proj blocks.0.self_attn.output_proj
        blocks.0.cross_attn.q_proj blocks.0.cross_attn.k_proj blocks.0.cross_attn.v_proj
        blocks.0.cross_attn.output_proj blocks.0.mlp.layer1 blocks.0.mlp.layer2
        blocks.0.adaln_modulation_self_attn.1 blocks.0.adaln_modulation_self_attn.2
        blocks.0.adaln_modulation_cross_attn.1 blocks.0.adaln_modulation_cross_attn.2
        blocks.0.adaln_modulation_mlp.1 blocks.0.adaln_modulation_mlp.2 blocks.1.self_attn.q_proj
        blocks.1.self_attn.k_proj blocks.1.self_attn.v_proj blocks.1.self_attn.output_proj
        blocks.1.cross_attn.q_proj blocks.1.cross_attn.k_proj blocks.1.cross_attn.v_proj
        blocks.1.cross_attn.output_proj blocks.1.mlp.layer1 blocks.1.mlp.layer2
        blocks.1.adaln_modulation_self_attn.1 blocks.1.adaln_modulation_self_attn.2
        blocks.1.adaln_modulation_cross_attn.1 blocks.1.adaln_modulation_cross_attn.2
        blocks.1.adaln_modulation_mlp.1 blocks.1.adaln_modulation_mlp.2 final_layer.linear
        final_layer.adaln_modulation.1 final_layer.adaln_modulation.2""".split()),
    "cascade_c": ("Stable_Cascade_C", "StageC", """
        clip_txt_mapper clip_txt_pooled_mapper clip_img_mapper embedding.1 down_blocks.0.0.depthwise
        down_blocks.0.0.channelwise.0 down_blocks.0.1.mapper down_blocks.0.1.mapper_sca down_blocks.0.1.mapper_crp
        down_blocks.0.2.attention.attn.to_q down_blocks.0.2.attention.attn.to_k down_blocks.0.2.attention.attn.to_v
        down_blocks.0.2.attention.attn.out_proj down_blocks.0.2.kv_mapper.1 down_blocks.1.0.depthwise
        down_blocks.1.0.channelwise.0 down_blocks.1.1.mapper down_blocks.1.1.mapper_sca down_blocks.1.1.mapper_crp
        down_blocks.1.2.attention.attn.to_q down_blocks.1.2.attention.attn.to_k down_blocks.1.2.attention.attn.to_v
        down_blocks.1.2.attention.attn.out_proj down_blocks.1.2.kv_mapper.1 down_downscalers.1.1.blocks.0
        up_blocks.0.0.depthwise up_blocks.0.0.channelwise.0 up_blocks.0.1.mapper up_blocks.0.1.mapper_sca
        up_blocks.0.1.mapper_crp up_blocks.0.2.attention.attn.to_q up_blocks.0.2.attention.attn.to_k
        up_blocks.0.2.attention.attn.to_v up_blocks.0.2.attention.attn.out_proj up_blocks.0.2.kv_mapper.1
        up_blocks.1.0.depthwise up_blocks.1.0.channelwise.0 up_blocks.1.1.mapper up_blocks.1.1.mapper_sca
        up_blocks.1.1.mapper_crp up_blocks.1.2.attention.attn.to_q up_blocks.1.2.attention.attn.to_k
        up_blocks.1.2.attention.attn.to_v up_blocks.1.2.attention.attn.out_proj up_blocks.1.2.kv_mapper.1
        up_upscalers.0.1.blocks.1 clf.1""".split()),
    "pixart_sigma": ("PixArtSigma", "PixArtMS", """
        t_block.1 x_embedder.proj t_embedder.mlp.0 t_embedder.mlp.2 y_embedder.y_proj.fc1 y_embedder.y_proj.fc2
        blocks.0.attn.qkv blocks.0.attn.proj blocks.0.cross_attn.q_linear blocks.0.cross_attn.kv_linear
        blocks.0.cross_attn.proj blocks.0.mlp.fc1 blocks.0.mlp.fc2 blocks.1.attn.qkv blocks.1.attn.proj
        blocks.1.cross_attn.q_linear blocks.1.cross_attn.kv_linear blocks.1.cross_attn.proj blocks.1.mlp.fc1
        blocks.1.mlp.fc2 final_layer.linear""".split()),
    "flux_dev": ("Flux", "Flux", """
        img_in time_in.in_layer time_in.out_layer vector_in.in_layer vector_in.out_layer guidance_in.in_layer
        guidance_in.out_layer txt_in double_blocks.0.img_mod.lin double_blocks.0.img_attn.qkv
        double_blocks.0.img_attn.proj double_blocks.0.img_mlp.0 double_blocks.0.img_mlp.2
        double_blocks.0.txt_mod.lin double_blocks.0.txt_attn.qkv double_blocks.0.txt_attn.proj
        double_blocks.0.txt_mlp.0 double_blocks.0.txt_mlp.2 single_blocks.0.linear1 single_blocks.0.linear2
        single_blocks.0.modulation.lin final_layer.linear final_layer.adaLN_modulation.1""".split()),
    "chroma": ("Chroma", "Chroma", """
        img_in txt_in distilled_guidance_layer.in_proj distilled_guidance_layer.layers.0.in_layer
        distilled_guidance_layer.layers.0.out_layer distilled_guidance_layer.layers.1.in_layer
        distilled_guidance_layer.layers.1.out_layer distilled_guidance_layer.out_proj double_blocks.0.img_attn.qkv
        double_blocks.0.img_attn.proj double_blocks.0.img_mlp.0 double_blocks.0.img_mlp.2
        double_blocks.0.txt_attn.qkv double_blocks.0.txt_attn.proj double_blocks.0.txt_mlp.0
        double_blocks.0.txt_mlp.2 single_blocks.0.linear1 single_blocks.0.linear2 final_layer.linear""".split()),
    "lumina2": ("Lumina2", "NextDiT", """
        x_embedder noise_refiner.0.attention.qkv noise_refiner.0.attention.out noise_refiner.0.feed_forward.w1
        noise_refiner.0.feed_forward.w2 noise_refiner.0.feed_forward.w3 noise_refiner.0.adaLN_modulation.1
        context_refiner.0.attention.qkv context_refiner.0.attention.out context_refiner.0.feed_forward.w1
        context_refiner.0.feed_forward.w2 context_refiner.0.feed_forward.w3 t_embedder.mlp.0 t_embedder.mlp.2
        cap_embedder.1 layers.0.attention.qkv layers.0.attention.out layers.0.feed_forward.w1
        layers.0.feed_forward.w2 layers.0.feed_forward.w3 layers.0.adaLN_modulation.1 layers.1.attention.qkv
        layers.1.attention.out layers.1.feed_forward.w1 layers.1.feed_forward.w2 layers.1.feed_forward.w3
        layers.1.adaLN_modulation.1 final_layer.linear final_layer.adaLN_modulation.1""".split()),
    "qwen_image": ("QwenImage", "QwenImageTransformer2DModel", """
        time_text_embed.timestep_embedder.linear_1 time_text_embed.timestep_embedder.linear_2 img_in txt_in
        transformer_blocks.0.img_mod.1 transformer_blocks.0.img_mlp.net.0.proj transformer_blocks.0.img_mlp.net.2
        transformer_blocks.0.txt_mod.1 transformer_blocks.0.txt_mlp.net.0.proj transformer_blocks.0.txt_mlp.net.2
        transformer_blocks.0.attn.to_q transformer_blocks.0.attn.to_k transformer_blocks.0.attn.to_v
        transformer_blocks.0.attn.add_q_proj transformer_blocks.0.attn.add_k_proj
        transformer_blocks.0.attn.add_v_proj transformer_blocks.0.attn.to_out.0 transformer_blocks.0.attn.to_add_out
        transformer_blocks.1.img_mod.1 transformer_blocks.1.img_mlp.net.0.proj transformer_blocks.1.img_mlp.net.2
        transformer_blocks.1.txt_mod.1 transformer_blocks.1.txt_mlp.net.0.proj transformer_blocks.1.txt_mlp.net.2
        transformer_blocks.1.attn.to_q transformer_blocks.1.attn.to_k transformer_blocks.1.attn.to_v
        transformer_blocks.1.attn.add_q_proj transformer_blocks.1.attn.add_k_proj
        transformer_blocks.1.attn.add_v_proj transformer_blocks.1.attn.to_out.0 transformer_blocks.1.attn.to_add_out
        norm_out.linear proj_out""".split()),
    "hidream": ("HiDream", "HiDreamImageTransformer2DModel", """
        t_embedder.timestep_embedder.linear_1 t_embedder.timestep_embedder.linear_2
        p_embedder.pooled_embedder.linear_1 p_embedder.pooled_embedder.linear_2 x_embedder.proj
        double_stream_blocks.0.block.adaLN_modulation.1 double_stream_blocks.0.block.attn1.to_q
        double_stream_blocks.0.block.attn1.to_k double_stream_blocks.0.block.attn1.to_v
        double_stream_blocks.0.block.attn1.to_out double_stream_blocks.0.block.attn1.to_q_t
        double_stream_blocks.0.block.attn1.to_k_t double_stream_blocks.0.block.attn1.to_v_t
        double_stream_blocks.0.block.attn1.to_out_t double_stream_blocks.0.block.ff_i.shared_experts.w1
        double_stream_blocks.0.block.ff_i.shared_experts.w2 double_stream_blocks.0.block.ff_i.shared_experts.w3
        double_stream_blocks.0.block.ff_i.experts.0.w1 double_stream_blocks.0.block.ff_i.experts.0.w2
        double_stream_blocks.0.block.ff_i.experts.0.w3 double_stream_blocks.0.block.ff_i.experts.1.w1
        double_stream_blocks.0.block.ff_i.experts.1.w2 double_stream_blocks.0.block.ff_i.experts.1.w3
        double_stream_blocks.0.block.ff_t.w1 double_stream_blocks.0.block.ff_t.w2
        double_stream_blocks.0.block.ff_t.w3 single_stream_blocks.0.block.adaLN_modulation.1
        single_stream_blocks.0.block.attn1.to_q single_stream_blocks.0.block.attn1.to_k
        single_stream_blocks.0.block.attn1.to_v single_stream_blocks.0.block.attn1.to_out
        single_stream_blocks.0.block.ff_i.shared_experts.w1 single_stream_blocks.0.block.ff_i.shared_experts.w2
        single_stream_blocks.0.block.ff_i.shared_experts.w3 single_stream_blocks.0.block.ff_i.experts.0.w1
        single_stream_blocks.0.block.ff_i.experts.0.w2 single_stream_blocks.0.block.ff_i.experts.0.w3
        single_stream_blocks.0.block.ff_i.experts.1.w1 single_stream_blocks.0.block.ff_i.experts.1.w2
        single_stream_blocks.0.block.ff_i.experts.1.w3 final_layer.linear final_layer.adaLN_modulation.1
        caption_projection.0.linear caption_projection.1.linear caption_projection.2.linear""".split()),
    "hunyuan_video": ("HunyuanVideo", "HunyuanVideo", """
        img_in.proj time_in.in_layer time_in.out_layer vector_in.in_layer vector_in.out_layer guidance_in.in_layer
        guidance_in.out_layer txt_in.input_embedder txt_in.t_embedder.in_layer txt_in.t_embedder.out_layer
        txt_in.c_embedder.in_layer txt_in.c_embedder.out_layer
        txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1
        txt_in.individual_token_refiner.blocks.0.self_attn.qkv
        txt_in.individual_token_refiner.blocks.0.self_attn.proj txt_in.individual_token_refiner.blocks.0.mlp.0
        txt_in.individual_token_refiner.blocks.0.mlp.2 txt_in.individual_token_refiner.blocks.1.adaLN_modulation.1
        txt_in.individual_token_refiner.blocks.1.self_attn.qkv
        txt_in.individual_token_refiner.blocks.1.self_attn.proj txt_in.individual_token_refiner.blocks.1.mlp.0
        txt_in.individual_token_refiner.blocks.1.mlp.2 double_blocks.0.img_mod.lin double_blocks.0.img_attn.qkv
        double_blocks.0.img_attn.proj double_blocks.0.img_mlp.0 double_blocks.0.img_mlp.2
        double_blocks.0.txt_mod.lin double_blocks.0.txt_attn.qkv double_blocks.0.txt_attn.proj
        double_blocks.0.txt_mlp.0 double_blocks.0.txt_mlp.2 single_blocks.0.linear1 single_blocks.0.linear2
        single_blocks.0.modulation.lin final_layer.linear final_layer.adaLN_modulation.1""".split()),
    "wan21": ("WAN21_T2V", "WanModel", """
        patch_embedding text_embedding.0 text_embedding.2 time_embedding.0 time_embedding.2 time_projection.1
        blocks.0.self_attn.q blocks.0.self_attn.k blocks.0.self_attn.v blocks.0.self_attn.o blocks.0.cross_attn.q
        blocks.0.cross_attn.k blocks.0.cross_attn.v blocks.0.cross_attn.o blocks.0.ffn.0 blocks.0.ffn.2
        blocks.1.self_attn.q blocks.1.self_attn.k blocks.1.self_attn.v blocks.1.self_attn.o blocks.1.cross_attn.q
        blocks.1.cross_attn.k blocks.1.cross_attn.v blocks.1.cross_attn.o blocks.1.ffn.0 blocks.1.ffn.2 head.head""".split()),
    "ltxv": ("LTXV", "LTXVModel", """
        patchify_proj adaln_single.emb.timestep_embedder.linear_1 adaln_single.emb.timestep_embedder.linear_2
        adaln_single.linear caption_projection.linear_1 caption_projection.linear_2 transformer_blocks.0.attn1.to_q
        transformer_blocks.0.attn1.to_k transformer_blocks.0.attn1.to_v transformer_blocks.0.attn1.to_out.0
        transformer_blocks.0.ff.net.0.proj transformer_blocks.0.ff.net.2 transformer_blocks.0.attn2.to_q
        transformer_blocks.0.attn2.to_k transformer_blocks.0.attn2.to_v transformer_blocks.0.attn2.to_out.0
        transformer_blocks.1.attn1.to_q transformer_blocks.1.attn1.to_k transformer_blocks.1.attn1.to_v
        transformer_blocks.1.attn1.to_out.0 transformer_blocks.1.ff.net.0.proj transformer_blocks.1.ff.net.2
        transformer_blocks.1.attn2.to_q transformer_blocks.1.attn2.to_k transformer_blocks.1.attn2.to_v
        transformer_blocks.1.attn2.to_out.0 proj_out""".split()),
}

# Per family: its key, the groups ExCA must drop (the list: text stream, context refiners, caption
# projections, kv mappers; timestep/guidance embedders and every modulation), names ExCA must keep, and
# the exact self-attention and the cross-attention part that `attention` adds (substring tests on names).
EXPECT = {
    "auraflow": ("auraflow", ["cond_seq_linear", "modC.", "modX.", "modCX.", "modF.", "double_layers.0.attn.w1",
                              "double_layers.1.attn.w1", "mlpC.", "t_embedder."],
                 ["init_x_linear", "mlpX.c_fc1", "single_layers.0.mlp.c_proj", "final_linear"],
                 ["double_layers.0.attn.w2", "single_layers.0.attn.w1"], ["double_layers.0.attn.w1"]),
    "cosmos_predict2": ("cosmos_predict2", ["cross_attn.", "adaln_modulation", "t_embedder."],
                        ["x_embedder.proj.1", "mlp.layer1", ".self_attn.q_proj"], [".self_attn."], [".cross_attn."]),
    "cascade_c": ("cascade", ["clip_txt_mapper", "clip_txt_pooled_mapper", "clip_img_mapper", "kv_mapper", ".mapper",
                              "mapper_sca", "mapper_crp"],
                  ["embedding.1", "depthwise", "channelwise.0", "attention.attn.to_q", "clf.1"],
                  ["attention.attn."], ["kv_mapper"]),
    "pixart_sigma": ("pixart", ["t_block.", "t_embedder.", "y_embedder.", "cross_attn."],
                     ["x_embedder.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "final_layer.linear"],
                     ["blocks.0.attn.", "blocks.1.attn."], ["cross_attn."]),
    "flux_dev": ("flux", ["txt_in", "txt_attn", "txt_mlp", "txt_mod", "img_mod", "modulation", "time_in", "vector_in",
                          "guidance_in"],
                 ["img_in", "img_attn.qkv", "img_mlp.0", "single_blocks.0.linear1", "final_layer.linear"],
                 ["img_attn.", "single_blocks.0.linear"], ["txt_attn."]),
    "chroma": ("flux", ["distilled_guidance_layer", "txt_in", "txt_attn", "txt_mlp"],
               ["img_in", "img_attn.proj", "single_blocks.0.linear2", "final_layer.linear"],
               ["img_attn.", "single_blocks.0.linear"], ["txt_attn."]),
    "lumina2": ("lumina2", ["context_refiner.", "cap_embedder.", "t_embedder.", "adaLN_modulation"],
                ["x_embedder", "noise_refiner.0.feed_forward.w1", "layers.0.attention.qkv", "final_layer.linear"],
                ["noise_refiner.0.attention.", "layers.0.attention.", "layers.1.attention."],
                ["context_refiner.0.attention."]),
    "qwen_image": ("qwen_image", ["txt_in", "img_mod", "txt_mod", "txt_mlp", "add_q_proj", "add_k_proj", "add_v_proj",
                                  "to_add_out", "time_text_embed", "norm_out"],
                   ["img_in", "attn.to_q", "attn.to_out.0", "img_mlp.net.0.proj", "proj_out"],
                   ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out."], ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]),
    "hidream": ("hidream", ["caption_projection", "t_embedder", "p_embedder", "adaLN_modulation", "_t", "ff_t."],
                ["x_embedder.proj", "ff_i.shared_experts.w1", "ff_i.experts.0.w2", "final_layer.linear"],
                ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out"], ["attn1.to_q_t", "attn1.to_k_t", "attn1.to_v_t", "attn1.to_out_t"]),
    "hunyuan_video": ("flux", ["txt_in.", "txt_attn", "txt_mlp", "txt_mod", "img_mod", "modulation", "time_in",
                               "vector_in", "guidance_in"],
                      ["img_in.proj", "img_attn.qkv", "img_mlp.2", "single_blocks.0.linear1", "final_layer.linear"],
                      ["img_attn.", "single_blocks.0.linear"], ["txt_attn.", "txt_in.individual_token_refiner.blocks.0.self_attn.", "txt_in.individual_token_refiner.blocks.1.self_attn."]),
    "wan21": ("wan", ["text_embedding", "time_embedding", "time_projection", "cross_attn."],
              ["patch_embedding", "self_attn.q", "ffn.0", "head.head"], ["self_attn."], ["cross_attn."]),
    "ltxv": ("ltxv", ["adaln_single", "caption_projection", "attn2."],
             ["patchify_proj", "attn1.to_q", "ff.net.0.proj", "proj_out"], ["attn1."], ["attn2."]),
}


def _with(names, parts):
    return {n for n in names if any(p in n for p in parts)}


@pytest.mark.parametrize("fam", sorted(EXPECT))
def test_family_presets_on_real_names(fam):
    config_class, model_class, names = REAL[fam]
    key, excluded, kept, self_parts, cross_parts = EXPECT[fam]
    assert family_for_model(config_class, model_class) == key
    names = [P + n for n in names]
    exca = set(select(names, "ExCA", layout=key))
    dropped = _with(names, excluded)
    assert dropped and not (dropped & exca), sorted(dropped & exca)
    assert exca == set(names) - dropped  # everything else is kept
    assert all(_with(names, [k]) <= exca and _with(names, [k]) for k in kept)
    self_set = _with(names, self_parts) - _with(names, ["adaLN", "adaln", "_t"] if fam == "hidream" else ["adaln_modulation"])
    cross_set = _with(names, cross_parts)
    assert self_set and cross_set
    assert set(select(names, "self_attention", layout=key)) == self_set
    assert set(select(names, "attention", layout=key)) == self_set | cross_set
    assert self_set != self_set | cross_set  # self_attention differs from attention
    assert set(select(names, "all", layout=key)) == set(names)


def test_family_for_model_classes():
    for cfg in ("SD15", "SDXL", "SDXLRefiner", "SSD1B", "SVD_img2vid"):
        assert family_for_model(cfg, "UNetModel") == "unet"
    assert family_for_model("SD3", "OpenAISignatureMMDITWrapper") == "mmdit"
    for cfg in ("Flux", "FluxSchnell", "FluxInpaint", "Flux2", "Chroma", "HunyuanVideo", "HunyuanImage21"):
        assert family_for_model(cfg) == "flux"
    assert family_for_model("ZImage", "NextDiT") == family_for_model("Lumina2") == "lumina2"
    assert family_for_model("WAN22_T2V") == family_for_model("WAN21_Vace") == "wan"
    assert family_for_model("AuraFlow", "MMDiT") == "auraflow"  # AuraFlow's model class is also called MMDiT
    assert family_for_model("SomethingNew", "WanModel") == "wan"  # an unlisted config: the model class decides
    assert family_for_model("SomethingNew", "SomethingElse") is None
    assert family_for_model(None, None) is None


def test_unknown_family_uses_generic_rules_and_lists_the_selection():
    names = [P + n for n in ("blocks.0.attn.qkv", "blocks.0.cross_attn.q", "blocks.0.mlp.fc1", "blocks.1.attn.qkv",
                             "blocks.1.cross_attn.q", "blocks.1.mlp.fc1", "time_embed.0", "head")]
    p = plan({n: 64 for n in names}, "ExCA", rank=4, layout=family_for_model("SomethingNew", "Other"))
    assert p.layout == "generic"
    assert set(p.names) == {P + "blocks.0.attn.qkv", P + "blocks.1.attn.qkv", P + "blocks.0.mlp.fc1",
                            P + "blocks.1.mlp.fc1", P + "head"}
    text = p.describe()
    assert "model family not recognised" in text
    assert "blocks.N.attn.qkv ×2" in text and "blocks.N.mlp.fc1 ×2" in text and "head" in text
    assert "not recognised" not in plan({P + "single_blocks.0.linear1": 64}, "ExCA", layout="flux").describe()


def test_unknown_family_key_is_rejected():
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        plan({P + "x": 8}, "ExCA", layout="nope")


def test_family_record_is_complete_and_unambiguous():
    """Every family of the record says why for both analogues, its patterns compile, and no ComfyUI class
    names two families (BY_CONFIG_CLASS / BY_MODEL_CLASS would silently keep the last)."""
    import re

    from para_core.families import _ALL, BY_CONFIG_CLASS, BY_MODEL_CLASS
    for fam in _ALL:
        assert fam.cross_why and fam.embed_why and fam.models, fam.key
        for pattern in (fam.cross, fam.embed, fam.self_attention, fam.cross_attention or fam.cross):
            re.compile(pattern)
    assert len(BY_CONFIG_CLASS) == sum(len(f.config_classes) for f in _ALL)
    assert len(BY_MODEL_CLASS) == sum(len(f.model_classes) for f in _ALL)


def test_new_families_are_recognised_by_class():
    assert family_for_model("LongCatImage", "Flux") == "flux"
    assert family_for_model("ZImagePixelSpace") == family_for_model(None, "NextDiTPixelSpace") == "lumina2"
    assert family_for_model("MageFlow") == family_for_model("Lens") == "qwen_image"
    assert family_for_model("Anima") == "cosmos_predict2"
    for cfg in ("WAN21_CausalAR_T2V", "WAN_Animate2", "WAN21_SCAIL", "WAN21_SCAIL2", "WAN21_FlowRVS", "WAN22_WanDancer"):
        assert family_for_model(cfg) == "wan"
    assert family_for_model("JoyImage", "JoyImageTransformer3DModel") == "joyimage"
    assert family_for_model("Boogu") == family_for_model("Omnigen2") == "omnigen2"


def test_pixel_decoder_modulation_is_kept_and_transformer_modulation_dropped():
    """Z-Image pixel space: dec_net's adaLN is driven by the image tokens (kept), the layers' by t (dropped)."""
    names = [P + n for n in ("layers.0.adaLN_modulation.0", "noise_refiner.0.adaLN_modulation.0", "layers.0.attention.qkv",
                             "dec_net.res_blocks.0.adaLN_modulation.1", "dec_net.cond_embed", "cap_embedder.1")]
    assert set(select(names, "ExCA", layout="lumina2")) == {P + "layers.0.attention.qkv",
                                                            P + "dec_net.res_blocks.0.adaLN_modulation.1",
                                                            P + "dec_net.cond_embed"}


def test_mochi_preset_on_its_real_names():
    """Genmo Mochi (no tiny instance: its blocks assert the full 3072-wide MLP); names as ComfyUI builds them."""
    names = [P + n for n in ("blocks.0.attn.proj_x", "blocks.0.attn.proj_y", "blocks.0.attn.qkv_x", "blocks.0.attn.qkv_y",
                             "blocks.0.mlp_x.w1", "blocks.0.mlp_x.w2", "blocks.0.mlp_y.w1", "blocks.0.mlp_y.w2",
                             "blocks.0.mod_x", "blocks.0.mod_y", "final_layer.linear", "final_layer.mod",
                             "t5_y_embedder.to_kv", "t5_y_embedder.to_out", "t5_y_embedder.to_q", "t5_yproj",
                             "t_embedder.mlp.0", "x_embedder.proj")]
    key = family_for_model("GenmoMochi", "AsymmDiTJoint")
    assert key == "mochi"
    assert set(select(names, "ExCA", layout=key)) == {P + n for n in ("blocks.0.attn.proj_x", "blocks.0.attn.qkv_x",
                                                                      "blocks.0.mlp_x.w1", "blocks.0.mlp_x.w2",
                                                                      "final_layer.linear", "x_embedder.proj")}
    assert set(select(names, "self_attention", layout=key)) == {P + "blocks.0.attn.proj_x", P + "blocks.0.attn.qkv_x"}
    assert set(select(names, "attention", layout=key)) == {P + f"blocks.0.attn.{n}" for n in ("proj_x", "qkv_x", "proj_y", "qkv_y")}

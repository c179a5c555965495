"""Layer presets, include/exclude patterns and the rank boundary, on real module-name layouts."""
import pytest

from para_core.targets import (PRESETS, detect_layout, effective_rank, plan, select)

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

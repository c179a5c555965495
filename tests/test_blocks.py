"""para_core.blocks: block-strength specs resolved against module names (pure, no ComfyUI)."""
import pytest

from para_core.blocks import block_of, describe, parse, resolve
from para_core.errors import ParaError

UNET = ["diffusion_model.time_embed.0", "diffusion_model.input_blocks.0.0", "diffusion_model.input_blocks.1.1.proj_in",
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q", "diffusion_model.middle_block.1.proj_out",
        "diffusion_model.output_blocks.0.0.in_layers.2", "diffusion_model.output_blocks.2.1.transformer_blocks.0.attn2.to_k",
        "diffusion_model.out.2"]
FLUX = ["img_in", "double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.0", "single_blocks.0.linear1",
        "single_blocks.12.linear2", "final_layer.linear"]
MMDIT = ["x_embedder.proj", "joint_blocks.0.x_block.attn.qkv", "joint_blocks.3.context_block.mlp.fc1", "final_layer.linear"]


def test_parse_accepts_commas_newlines_spaces_and_colons_in_regexes():
    assert parse("input:1, middle:0.5,\n output:0") == [("input", 1.0), ("middle", 0.5), ("output", 0.0)]
    assert parse("  ") == [] and parse("") == []
    assert parse("a(?:b):-2.5e-1") == [("a(?:b)", -0.25)]


@pytest.mark.parametrize("bad", ["input", "input:", ":1", "input:x", "input:nan", "input:inf", "input:1, middle"])
def test_parse_rejects_an_entry_that_is_not_block_number(bad):
    with pytest.raises(ParaError, match="is not 'block:number'"):
        parse(bad)


def test_unet_blocks_other_and_last_entry_wins():
    got = resolve("input:1, middle:0.5, output:0", UNET)
    assert got == {UNET[0]: 1.0, UNET[1]: 1.0, UNET[2]: 1.0, UNET[3]: 1.0, UNET[4]: 0.5, UNET[5]: 0.0, UNET[6]: 0.0, UNET[7]: 1.0}
    got = resolve("*:0, output:1, output.2:0.25, other:3", UNET)
    assert [got[n] for n in UNET] == [3.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.25, 3.0]
    assert [block_of(n, "unet") for n in UNET] == ["other", "input", "input", "input", "middle", "output", "output", "other"]


def test_indexed_block_is_the_whole_block_not_a_prefix_of_a_longer_index():
    names = ["single_blocks.1.linear1", "single_blocks.12.linear1", "double_blocks.1.img_mlp.0"]
    assert resolve("single.1:0", names) == {names[0]: 0.0, names[1]: 1.0, names[2]: 1.0}


def test_flux_and_mmdit_vocabularies():
    got = resolve("double:1, single:0.5", FLUX)
    assert [got[n] for n in FLUX] == [1.0, 1.0, 1.0, 0.5, 0.5, 1.0]
    got = resolve("joint:0, joint.3:2", MMDIT)
    assert [got[n] for n in MMDIT] == [1.0, 0.0, 2.0, 1.0]


def test_regex_keys_search_the_name_without_prefix():
    got = resolve(r"attn[12]\.:0.5, ^out\.:0", UNET)
    assert got[UNET[3]] == 0.5 and got[UNET[6]] == 0.5 and got[UNET[7]] == 0.0 and got[UNET[1]] == 1.0


def test_unknown_blocks_are_named_in_one_error_with_the_vocabulary():
    with pytest.raises(ParaError) as e:
        resolve("input:1, midle:0.5, double:0", UNET)
    msg = str(e.value)
    assert "'midle', 'double' match no layer of this unet model" in msg
    assert "blocks input, middle, output, other, *" in msg and "\n" not in msg
    with pytest.raises(ParaError, match="'input.9' matches no layer"):
        resolve("input.9:0", UNET)
    with pytest.raises(ParaError, match="neither a block of this flux model .* nor a valid regular expression"):
        resolve("single(:0", FLUX)
    with pytest.raises(ParaError, match="no named blocks"):
        resolve("input:0", ["encoder.layers.0.fc1", "encoder.layers.1.fc1"])


def test_describe_lists_only_changed_blocks():
    assert describe(resolve("middle:0.5, output:0", UNET)) == "middle ×0.5, output ×0"
    assert describe(resolve("output.2:0.25", UNET)) == "output ×0.25/1"
    assert describe(resolve("", UNET)) == ""


def test_families_from_the_record_have_named_blocks():
    """Wan and Qwen-Image get named blocks from the family record when the caller knows the family."""
    wan = ["blocks.0.self_attn.q", "blocks.1.cross_attn.k", "text_embedding.0", "head.head"]
    assert resolve("blocks.1:0, other:0.5", wan, layout="wan") == {"blocks.0.self_attn.q": 1.0, "blocks.1.cross_attn.k": 0.0,
                                                                  "text_embedding.0": 0.5, "head.head": 0.5}
    qwen = ["transformer_blocks.0.attn.to_q", "img_in"]
    assert resolve("blocks:0", qwen, layout="qwen_image") == {"transformer_blocks.0.attn.to_q": 0.0, "img_in": 1.0}
    assert describe({"diffusion_model.transformer_blocks.0.attn.to_q.weight": 0.0}, "qwen_image") == "blocks ×0"

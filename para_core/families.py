"""The model-family record: everything the pack knows about a model family, one ``Family`` per key in
``FAMILIES``. Everything else reads from here - ``targets`` (which ComfyUI classes are which family, what
ExCA / self_attention / attention select), ``blocks`` (named blocks for per-block strength), the trainer's
``training_compat`` in nodes/train_host.py (which families update saved tensors in place) and ``checkpoint`` (top-level names of a
bare diffusion-model file). Pure: class names and regexes, no ComfyUI import.

Regexes are searched in module names without the ``diffusion_model.`` prefix (N = block index):

* ``cross`` - the *cross-attention analogue*, where the text conditioning enters (cross-attention layers,
  the text stream of joint blocks, caption / text embedders); ExCA drops it. ``cross_attention`` is its
  attention part, added by the ``attention`` preset (None: all of ``cross``).
* ``embed`` - the *time-embedding analogue*: timestep / guidance / pooled-vector embedders and every
  modulation they drive; ExCA drops it and no preset selects it.
* ``self_attention`` - the image-token attention projections (in joint attention, the shared ones).

Why (the paper): PaRa keeps the layers that generate the image and drops the two places through which the
prompt and the noise level enter. Where there is no separate cross-attention, the text enters through its
own stream (separate projections / MLPs for the text tokens), which is the analogue; projections that text
and image tokens both pass through generate image tokens too and are kept, as ``attn1`` is in a UNet.
Every modulation is a function of the timestep (and of pooled text or guidance): the analogue of the
UNet's ``emb_layers``.

Adding a family: one ``Family`` below (classes from ``comfy/supported_models.py`` and ``comfy/model_base.py``,
patterns read from the model's code in ``comfy/ldm``), and a tiny instance in ``tests/integration/families.py``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    key: str
    models: str                          # human-readable: which models these are
    config_classes: tuple[str, ...]      # comfy.supported_models.<name> (decides first)
    model_classes: tuple[str, ...]       # the diffusion model's class (for configs not listed anywhere)
    cross: str                           # regex: cross-attention analogue (ExCA drops)
    cross_why: str
    embed: str                           # regex: time-embedding analogue (ExCA drops; never selected)
    embed_why: str
    self_attention: str                  # regex: image self-attention projections
    cross_attention: str | None = None   # regex: attention part of `cross` (None: all of it)
    blocks: dict[str, str] = field(default_factory=dict)  # per-block strength: block name -> module prefix
    layout_prefixes: tuple[str, ...] = ()  # module-name prefixes that identify the family from names alone
    layout_pattern: str | None = None    # or a regex on module names, where a prefix would be ambiguous
    in_place_safe: bool = False          # measured: forward never updates a tensor autograd saved (no copies)
    bare_prefixes: tuple[str, ...] = ()  # top-level keys of a bare diffusion-model checkpoint of this family


_FLUX_CROSS = r"\.txt_(attn|mlp)\.|^(txt_in|byt5_in|vision_in|cond_type_embedding)(\.|$)"
_FLUX_EMBED = (r"^(time_in|vector_in|guidance_in|time_text_embed|distilled_guidance_layer)(\.|$)"
               r"|\.(img_mod|txt_mod|modulation)\.|(^|\.)\w*modulation\w*(\.|$)|^txt_in\.(t_embedder|c_embedder)\.")

_ALL = (
    Family(
        "unet", "SD1.x, SD2.x, SDXL (+refiner, SSD-1B, Vega, KOALA, SVD, ...)",
        ("SD15", "SD20", "SD21UnclipL", "SD21UnclipH", "SDXLRefiner", "SDXL", "SSD1B", "Segmind_Vega", "KOALA_700M",
         "KOALA_1B", "SVD_img2vid", "SV3D_u", "SV3D_p", "Stable_Zero123", "SD_X4Upscaler", "SD15_instructpix2pix",
         "SDXL_instructpix2pix", "LotusD"), ("UNetModel",),
        cross=r"\.attn2\.", cross_why="attn2 is the true cross-attention",
        embed=r"^(time_embed|label_emb)(\.|$)|\.emb_layers\.",
        embed_why="time_embed, label_emb (SDXL pooled + size vector), the resblocks' emb_layers",
        self_attention=r"\.attn1\.",
        blocks={"input": "input_blocks.", "middle": "middle_block.", "output": "output_blocks."},
        layout_prefixes=("input_blocks.", "middle_block.", "output_blocks."),
        bare_prefixes=("input_blocks", "middle_block", "output_blocks", "out.", "time_embed", "label_emb"), in_place_safe=True),
    Family(
        "unet_diffusers", "the SD UNet under diffusers module names (kohya sd-scripts' SD1.x / SDXL UNet)", (), (),
        cross=r"\.attn2\.", cross_why="attn2 is the true cross-attention",
        embed=r"^(time_embedding|add_embedding)(\.|$)|\.time_emb_proj$",
        embed_why="time_embedding, add_embedding (SDXL pooled + size vector), the resnets' time_emb_proj",
        self_attention=r"\.attn1\.",
        blocks={"input": "down_blocks.", "middle": "mid_block.", "output": "up_blocks."},
        # diffusers' down_blocks.N.attentions / resnets: Stable Cascade's down_blocks.N.M are not this
        layout_pattern=r"^(down_blocks|up_blocks)\.\d+\.(attentions|resnets)\.|^mid_block\.(attentions|resnets)\.",
        in_place_safe=True),
    Family(
        "mmdit", "SD3 / SD3.5", ("SD3",), ("OpenAISignatureMMDITWrapper",),
        cross=r"\.context_block\.|^context_embedder(\.|$)",
        cross_why="context_block is the text stream (attn qkv/proj, mlp); context_embedder projects the text",
        cross_attention=r"\.context_block\.attn2?\.",
        embed=r"^(t_embedder|y_embedder)(\.|$)|(^|\.)adaLN_modulation\.",
        embed_why="t_embedder, y_embedder (pooled text), every adaLN_modulation",
        self_attention=r"\.x_block\.attn2?\.",
        blocks={"joint": "joint_blocks."}, layout_prefixes=("joint_blocks.",),
        bare_prefixes=("joint_blocks", "x_embedder", "final_layer"), in_place_safe=True),
    Family(
        "flux", "Flux.1 dev/schnell/fill, Flux.2, Chroma, HunyuanVideo (1, 1.5), HunyuanImage 2.1, LongCat-Image",
        ("Flux", "FluxInpaint", "FluxSchnell", "Flux2", "Chroma", "ChromaRadiance", "HunyuanVideo", "HunyuanVideoI2V",
         "HunyuanVideoSkyreelsI2V", "HunyuanImage21", "HunyuanImage21Refiner", "HunyuanVideo15",
         "HunyuanVideo15_SR_Distilled", "LongCatImage"),
        ("Flux", "Chroma", "ChromaRadiance", "HunyuanVideo"),
        cross=_FLUX_CROSS,
        cross_why="txt_attn / txt_mlp are the double blocks' text stream, txt_in the text projection "
                  "(Hunyuan: the whole token refiner); HunyuanVideo 1.5's byt5_in (glyph text), vision_in (SigLIP "
                  "image tokens) and cond_type_embedding (the token-type table) all feed that text stream",
        cross_attention=r"\.txt_attn\.|^txt_in\..*\.self_attn\.",
        embed=_FLUX_EMBED,
        embed_why="time_in, vector_in, guidance_in, img_mod / txt_mod / single modulation, Flux.2's shared "
                  "modulations, Chroma's distilled_guidance_layer",
        self_attention=r"\.img_attn\.|^single_blocks\.\d+\.linear[12]$",
        blocks={"double": "double_blocks.", "single": "single_blocks."},
        layout_prefixes=("double_blocks.", "single_blocks."),  # not in_place_safe: residual `+=` on block inputs
        bare_prefixes=("double_blocks", "single_blocks", "img_in", "txt_in", "final_layer")),
    Family(
        "auraflow", "AuraFlow", ("AuraFlow",), (),
        cross=r"^cond_seq_linear(\.|$)|^double_layers\.\d+\.(mlpC|attn\.w1[qkvo])(\.|$)",
        cross_why="cond_seq_linear projects the text; double layers' context stream attn.w1q/k/v/o and mlpC",
        cross_attention=r"^double_layers\.\d+\.attn\.w1[qkvo]$",
        embed=r"^t_embedder\.|(^|\.)mod(C|X|CX|F)(\.|$)", embed_why="t_embedder and the modC/modX/modCX/modF modulations",
        self_attention=r"^double_layers\.\d+\.attn\.w2[qkvo]$|^single_layers\.\d+\.attn\.w1[qkvo]$",
        blocks={"double": "double_layers.", "single": "single_layers."}, in_place_safe=True),
    Family(
        "cosmos_predict2", "Cosmos Predict2, Anima (Predict2 + LLM adapter)",
        ("CosmosT2IPredict2", "CosmosI2VPredict2", "Anima"), ("MiniTrainDIT", "Anima"),
        cross=r"\.cross_attn\.|^llm_adapter(\.|$)",
        cross_why="cross_attn is true cross-attention; Anima's llm_adapter maps the Qwen3 text features into it",
        embed=r"^t_embedder\.|(^|\.)adaln_modulation", embed_why="t_embedder and every adaln_modulation_*",
        self_attention=r"^blocks\.\d+\.self_attn\.", blocks={"blocks": "blocks."}, in_place_safe=True),
    Family(
        "cascade", "Stable Cascade C / B", ("Stable_Cascade_C", "Stable_Cascade_B"), ("StageC", "StageB"),
        cross=r"^clip_(txt|txt_pooled|img)_mapper(\.|$)|\.kv_mapper\.",
        cross_why="clip_txt/_pooled/_img mappers embed the prompt; AttnBlocks' kv_mapper maps text to keys",
        cross_attention=r"\.kv_mapper\.",
        embed=r"\.mapper(_sca|_crp)?$", embed_why="TimestepBlocks' mapper / mapper_sca / mapper_crp (r, sca, crp)",
        self_attention=r"\.attention\.attn\.",
        blocks={"down": "down_blocks.", "up": "up_blocks."}, in_place_safe=True),
    Family(
        "pixart", "PixArt-α / Σ", ("PixArtAlpha", "PixArtSigma"), ("PixArtMS", "PixArt"),
        cross=r"\.cross_attn\.|^y_embedder\.", cross_why="cross_attn, y_embedder (caption projection)",
        cross_attention=r"\.cross_attn\.",
        embed=r"^(t_block|t_embedder|ar_embedder|csize_embedder)(\.|$)",
        embed_why="t_embedder, t_block (adaLN from t), ar_embedder / csize_embedder",
        self_attention=r"^blocks\.\d+\.attn\.", blocks={"blocks": "blocks."}, in_place_safe=True),
    Family(
        "lumina2", "Lumina 2, Z-Image (latent and pixel space)", ("Lumina2", "ZImage", "ZImagePixelSpace"),
        ("NextDiT", "NextDiTPixelSpace"),
        cross=r"^(context_refiner|cap_embedder)(\.|$)",
        cross_why="context_refiner (text-only refiner blocks), cap_embedder (caption projection)",
        cross_attention=r"^context_refiner\.\d+\.attention\.",
        embed=r"^(t_embedder|clip_text_pooled_proj|time_text_embed)(\.|$)|^(?!dec_net\.)(.*\.)?adaLN_modulation(\.|$)",
        embed_why="t_embedder, every adaLN_modulation, clip_text_pooled_proj / time_text_embed; not the pixel "
                  "decoder's dec_net modulation, which is driven by the image tokens, not by t",
        self_attention=r"^(layers|noise_refiner)\.\d+\.attention\.",
        blocks={"layers": "layers.", "noise_refiner": "noise_refiner.", "context_refiner": "context_refiner.",
                "decoder": "dec_net."}, in_place_safe=True),
    Family(
        "qwen_image", "Qwen-Image, Mage-Flow (Qwen-Image blocks), Lens (same dual stream, fused txt/img qkv)",
        ("QwenImage", "MageFlow", "Lens"),
        ("QwenImageTransformer2DModel", "MageFlowTransformer2DModel", "LensTransformer2DModel"),
        cross=r"^(txt_in|txt_norm)(\.|$)|\.txt_mlp\.|\.attn\.(add_[qkv]_proj|to_add_out|txt_qkv)$",
        cross_why="txt_in, txt_mlp, attn.add_q/k/v_proj (Lens: attn.txt_qkv) and attn.to_add_out are the text stream",
        cross_attention=r"\.attn\.(add_[qkv]_proj|to_add_out|txt_qkv)$",
        embed=r"^(time_text_embed|norm_out)\.|\.(img_mod|txt_mod)\.",
        embed_why="time_text_embed, img_mod / txt_mod, norm_out (AdaLN-continuous)",
        self_attention=r"\.attn\.(to_[qkv]|to_out\.\d+|img_qkv)$",
        blocks={"blocks": "transformer_blocks."}, bare_prefixes=("transformer_blocks",), in_place_safe=True),
    Family(
        "hidream", "HiDream-I1", ("HiDream",), ("HiDreamImageTransformer2DModel",),
        cross=r"^caption_projection\.|\.attn1\.to_(q|k|v|out)_t$|\.ff_t\.",
        cross_why="caption_projection, the text stream attn1.to_q/k/v/out_t and ff_t",
        cross_attention=r"\.attn1\.to_(q|k|v|out)_t$",
        embed=r"^(t_embedder|p_embedder)\.|(^|\.)adaLN_modulation(\.|$)",
        embed_why="t_embedder, p_embedder (pooled text), every adaLN_modulation",
        self_attention=r"\.attn1\.to_(q|k|v|out)$",
        blocks={"double": "double_stream_blocks.", "single": "single_stream_blocks."}, in_place_safe=True),
    Family(
        "wan", "Wan 2.1 / 2.2 (all variants)",
        ("WAN21_T2V", "WAN21_I2V", "WAN21_FunControl2V", "WAN21_Camera", "WAN22_Camera", "WAN21_Vace", "WAN21_HuMo",
         "WAN22_S2V", "WAN22_Animate", "WAN22_T2V", "WAN21_CausalAR_T2V", "WAN_Animate2", "WAN21_FlowRVS", "WAN21_SCAIL",
         "WAN21_SCAIL2", "WAN22_WanDancer"),
        ("WanModel", "VaceWanModel", "CameraWanModel", "HumoWanModel", "WanModel_S2V", "AnimateWanModel", "CausalWanModel",
         "WanAnimate2Model", "SCAILWanModel", "SCAIL2WanModel", "WanDancerModel"),
        cross=r"^(text_embedding|img_emb|img_emb_refimage|music_encoder|music_projection|music_injector)(\.|$)|\.cross_attn\.",
        cross_why="cross_attn, text_embedding, img_emb / img_emb_refimage (CLIP image into cross_attn); WanDancer's "
                  "music encoder, projection and injector (cross-attention to the music)",
        cross_attention=r"\.cross_attn\.",
        embed=r"^(time_embedding|time_projection)(\.|$)", embed_why="time_embedding, time_projection",
        self_attention=r"\.self_attn\.", blocks={"blocks": "blocks."}, in_place_safe=True),
    Family(
        "ltxv", "LTX-Video (LTXV, LTXAV)", ("LTXV", "LTXAV"), ("LTXVModel", "LTXAVModel"),
        cross=r"^(audio_)?caption_projection(\.|$)|\.(audio_)?attn2\.|^(audio|video)_embeddings_connector\.",
        cross_why="attn2, caption_projection; LTX-2's video / audio embeddings connectors (transformers over the "
                  "text tokens only); audio_to_video / video_to_audio attention joins the two generated streams: kept",
        cross_attention=r"\.(audio_)?attn2\.",
        embed=r"(^|_)adaln_single(\.|$)", embed_why="adaln_single (timestep embedding and the 6-way modulation it drives)",
        self_attention=r"\.(audio_)?attn1\.", blocks={"blocks": "transformer_blocks."},
        # not in_place_safe: `addcmul_`, `+=` on saved tensors
        bare_prefixes=("transformer_blocks",)),
    Family(
        "joyimage", "JoyImage", ("JoyImage",), ("JoyImageTransformer3DModel",),
        cross=r"^condition_embedder\.text_embedder\.|\.txt_mlp\.|\.attn\.txt_attn_(qkv|proj)$",
        cross_why="condition_embedder.text_embedder projects the text; txt_attn_qkv/proj and txt_mlp are the "
                  "double blocks' text stream",
        cross_attention=r"\.attn\.txt_attn_(qkv|proj)$",
        embed=r"^condition_embedder\.(time_embedder|time_proj)(\.|$)",
        embed_why="condition_embedder.time_embedder and time_proj (the blocks' modulation vector)",
        self_attention=r"\.attn\.img_attn_(qkv|proj)$", blocks={"double": "double_blocks."}),
    Family(
        "ernie", "ERNIE-Image", ("ErnieImage",), ("ErnieImageModel",),
        cross=r"^text_proj(\.|$)", cross_why="text_proj projects the text; the layers attend over [image; text] jointly",
        embed=r"^(time_embedding|adaLN_modulation|final_norm)(\.|$)",
        embed_why="time_embedding, the shared adaLN_modulation, final_norm (AdaLN-continuous from t)",
        self_attention=r"^layers\.\d+\.self_attention\.", blocks={"layers": "layers."}),
    Family(
        "krea2", "Krea 2", ("Krea2",), ("SingleStreamDiT",),
        cross=r"^(txtfusion|txtmlp)(\.|$)",
        cross_why="txtfusion (text-only fusion / refiner transformer) and txtmlp project the text; blocks are single stream",
        cross_attention=r"^txtfusion\..*\.attn\.",
        embed=r"^(tmlp|tproj)(\.|$)", embed_why="tmlp (timestep MLP), tproj (the 6-way modulation it drives)",
        self_attention=r"^blocks\.\d+\.attn\.",
        blocks={"blocks": "blocks.", "txtfusion": "txtfusion."}),
    Family(
        "ideogram4", "Ideogram 4", ("Ideogram4",), ("Ideogram4Transformer2DModel",),
        cross=r"^llm_cond_proj(\.|$)", cross_why="llm_cond_proj projects the LLM features; layers are single stream",
        embed=r"^(t_embedding|adaln_proj)(\.|$)|(^|\.)adaln_modulation(\.|$)",
        embed_why="t_embedding, adaln_proj and every adaln_modulation (layers, final layer)",
        self_attention=r"^layers\.\d+\.attention\.", blocks={"layers": "layers."}),
    Family(
        "omnigen2", "OmniGen2, Boogu (OmniGen2 + double-stream layers)", ("Omnigen2", "Boogu"),
        ("OmniGen2Transformer2DModel", "BooguTransformer2DModel"),
        cross=r"^time_caption_embed\.caption_embedder\.|^context_refiner\.|\.instruct_(to_[qkv]|out)$|\.instruct_feed_forward\.",
        cross_why="caption_embedder, context_refiner (text-only), the double layers' instruction stream "
                  "(instruct_to_q/k/v, instruct_out, instruct_feed_forward)",
        cross_attention=r"^context_refiner\.\d+\.attn\.|\.instruct_(to_[qkv]|out)$",
        embed=r"^time_caption_embed\.timestep_embedder\.|^norm_out\.|(^|\.)\w*norm\d*\.linear$",
        embed_why="timestep_embedder, every RMSNormZero's linear (modulation from t), norm_out",
        self_attention=r"^(noise_refiner|ref_image_refiner|single_stream_layers|layers)\.\d+\.attn\.|\.img_self_attn\."
                       r"|\.processor\.img_(to_[qkv]|out)$",
        blocks={"double": "double_stream_layers.", "single": "single_stream_layers.", "noise_refiner": "noise_refiner.",
                "context_refiner": "context_refiner.", "ref_image_refiner": "ref_image_refiner.", "layers": "layers."}),
    Family(
        "hunyuan_dit", "HunyuanDiT 1.0 / 1.1", ("HunyuanDiT", "HunyuanDiT1"), ("HunYuanDiT",),
        cross=r"\.attn2\.|^mlp_t5(\.|$)", cross_why="attn2 is true cross-attention (CLIP + projected T5); mlp_t5 projects T5",
        cross_attention=r"\.attn2\.",
        embed=r"^(t_embedder|pooler|extra_embedder)(\.|$)|(^|\.)(default_modulation|adaLN_modulation)(\.|$)",
        embed_why="t_embedder, pooler and extra_embedder (pooled text + size/style into the time vector), "
                  "every default_modulation / adaLN_modulation",
        self_attention=r"\.attn1\.", blocks={"blocks": "blocks."}),
    Family(
        "cosmos1", "Cosmos 1 (T2V, I2V)", ("CosmosT2V", "CosmosI2V"), ("GeneralDIT",),
        cross=r"^blocks\.block\d+\.blocks\.1\.block\.",
        cross_why="sub-block 1 of each \"FA-CA-MLP\" block (the block_config ComfyUI's detection always sets) is the "
                  "cross-attention",
        embed=r"^t_embedder\.|(^|\.)adaLN_modulation(\.|$)", embed_why="t_embedder and every adaLN_modulation",
        self_attention=r"^blocks\.block\d+\.blocks\.0\.block\.attn\.", blocks={"blocks": "blocks."}),
    Family(
        "mochi", "Genmo Mochi preview", ("GenmoMochi",), ("AsymmDiTJoint",),
        cross=r"^t5_yproj$|\.attn\.(qkv|proj)_y$|\.mlp_y\.",
        cross_why="t5_yproj projects the T5 tokens; qkv_y / proj_y / mlp_y are the asymmetric blocks' text stream",
        cross_attention=r"\.attn\.(qkv|proj)_y$",
        embed=r"^(t_embedder|t5_y_embedder)\.|\.mod(_[xy])?$",
        embed_why="t_embedder, t5_y_embedder (attention-pooled T5 added to the time vector), mod_x / mod_y / final mod",
        self_attention=r"\.attn\.(qkv|proj)_x$", blocks={"blocks": "blocks."}),
    Family(
        "kandinsky5", "Kandinsky 5 (video, image)", ("Kandinsky5", "Kandinsky5Image"), ("Kandinsky5",),
        cross=r"^(text_embeddings|text_transformer_blocks)\.|\.cross_attention\.",
        cross_why="text_embeddings and text_transformer_blocks (text-only) embed the prompt; cross_attention reads it",
        cross_attention=r"^text_transformer_blocks\.\d+\.self_attention\.|\.cross_attention\.",
        embed=r"^(time_embeddings|pooled_text_embeddings)\.|(^|\.)\w*modulation(\.|$)",
        embed_why="time_embeddings, pooled_text_embeddings (added to the time vector), every *_modulation",
        self_attention=r"^visual_transformer_blocks\.\d+\.self_attention\.",
        blocks={"visual": "visual_transformer_blocks.", "text": "text_transformer_blocks."}),
    Family(
        "cogvideox", "CogVideoX (T2V, I2V, Fun inpaint)", ("CogVideoX_T2V", "CogVideoX_I2V", "CogVideoX_Inpaint"),
        ("CogVideoXTransformer3DModel",),
        cross=r"^patch_embed\.text_proj$", cross_why="patch_embed.text_proj projects the text; blocks attend over [text; video]",
        embed=r"^(time_embedding_linear_\d|ofs_embedding\w*)$|\.norm[12]\.linear$|^norm_out\.linear$",
        embed_why="time_embedding_linear_1/2, ofs_embedding, norm1/norm2/norm_out linear (LayerNormZero / AdaLN from t)",
        self_attention=r"^blocks\.\d+\.(q|k|v|attn_out)$", blocks={"blocks": "blocks."}),
    Family(
        "pixeldit", "PixelDiT T2I, PiD", ("PixelDiTT2I", "PiD"), ("PixDiT_T2I", "PidNet"),
        cross=r"^y_embedder\.|\.attn\.(qkv|proj)_y$|\.mlp_y\.",
        cross_why="y_embedder projects the text; qkv_y / proj_y / mlp_y are the patch blocks' text stream",
        cross_attention=r"\.attn\.(qkv|proj)_y$",
        embed=r"^t_embedder\.|(^|\.)adaLN_modulation\w*(\.|$)", embed_why="t_embedder and every adaLN_modulation_*",
        self_attention=r"\.attn\.(qkv|proj)_x$|^pixel_blocks\.\d+\.attn\.",
        blocks={"patch": "patch_blocks.", "pixel": "pixel_blocks."}),
    Family(
        "hidream_o1", "HiDream-O1 (unified Qwen3-VL)", ("HiDreamO1",), ("HiDreamO1Transformer",),
        cross=r"^language_model\.embed_tokens$|^visual\.",
        cross_why="text and image tokens share the LM layers (kept); the prompt enters through embed_tokens, "
                  "reference images through the visual encoder",
        cross_attention=r"^visual\.blocks\.\d+\.attn\.",
        embed=r"^t_embedder1\.", embed_why="t_embedder1 (the timestep token)",
        self_attention=r"^language_model\.layers\.\d+\.self_attn\.",
        blocks={"layers": "language_model.layers.", "visual": "visual."}),
    Family(
        "minimax_h3", "MiniMax H3 (joint video + audio)", ("MiniMaxH3",), ("MiniMaxH3Model",),
        cross=r"^(condition_proj|token_refiner)(\.|$)",
        cross_why="condition_proj and token_refiner turn the Qwen states into text tokens; the DiT blocks attend "
                  "over [text; video; audio] jointly (kept)",
        cross_attention=r"^token_refiner\.blocks\.\d+\.attn\.",
        embed=r"^time_embedder\.|(^|\.)adaln_proj\.", embed_why="time_embedder and every adaln_proj (per-block modulation)",
        self_attention=r"^blocks\.\d+\.attn\.", blocks={"blocks": "blocks."}),
    Family(
        "generic", "anything else (rules on names)", (), (),
        cross=r"(^|\.)(attn2|cross_attn|crossattn|cross_attention)(\.|$)", cross_why="attn2 / cross_attn",
        embed=r"(^|[._])(time|t|y|label|timestep|guidance|vector|context|pooled)_?(embed|embedder|emb|embedding|in|proj)(\.|$)"
              r"|(^|\.)emb_layers\.|modulation",
        embed_why="*_embed / *_embedder / time_* / *modulation*",
        self_attention=r"(^|\.)(attn1|self_attn|attn|attention)(\.|$)",
        ),
)

FAMILIES: dict[str, Family] = {f.key: f for f in _ALL}
BY_CONFIG_CLASS: dict[str, str] = {c: f.key for f in _ALL for c in f.config_classes}
BY_MODEL_CLASS: dict[str, str] = {c: f.key for f in _ALL for c in f.model_classes}
BARE_CHECKPOINT = re.compile("^(" + "|".join(dict.fromkeys(re.escape(p) for f in _ALL for p in f.bare_prefixes)) + ")")


def family_of(model) -> str | None:
    """The family key of a ComfyUI model (ModelPatcher, BaseModel or diffusion model), from its config class
    and diffusion model class (duck-typed: no ComfyUI import); None when neither is known."""
    base = getattr(model, "model", model)
    config = type(getattr(base, "model_config", None)).__name__
    return (BY_CONFIG_CLASS.get(config)
            or BY_MODEL_CLASS.get(type(getattr(base, "diffusion_model", base)).__name__))

"""Do the module names para_core.kohya gives sd-scripts' SDXL, Flux and SD3 models resolve in ComfyUI's LoRA key map?

Run as a subprocess by test_names.py (ComfyUI's modules are imported here with --cpu, apart from the test session's
ComfyUI): each model is built by sd-scripts' own classes on the meta device (no memory, no weights), ComfyUI
detects the same architecture from the state dict's shapes and builds its own model on the meta device, and
every PaRa layer name (init=random: nothing is read from the weights) must be a key of
`comfy.lora.model_lora_keys_unet`. Prints one JSON line {family: [layers, unresolved names...]}.
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path[:0] = [os.environ["KOHYA_PATH"], os.environ["COMFYUI_PATH"],
                os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]


def sd_models():
    from library import flux_models, sd3_models, sdxl_original_unet
    yield "sdxl", lambda: sdxl_original_unet.SdxlUNet2DConditionModel()
    yield "flux", lambda: flux_models.Flux(flux_models.configs["dev"].params)
    params = sd3_models.SD3Params(patch_size=2, depth=24, num_patches=36864, pos_embed_max_size=192,
                                  adm_in_channels=2048, qk_norm="rms", x_block_self_attn_layers=list(range(13)),
                                  context_embedder_in_features=4096, context_embedder_out_features=1536,
                                  model_type="5-medium")
    yield "sd3", lambda: sd3_models.create_sd3_mmdit(params)


def main() -> None:
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.model_detection

    from para_core import kohya
    out = {}
    for family, build in sd_models():
        with torch.device("meta"):
            model = build()
            sd = model.state_dict()
            config = comfy.model_detection.model_config_from_unet(sd, "")
            comfy_model = config.get_model({})
        keys = comfy.lora.model_lora_keys_unet(comfy_model, {})
        net = kohya.create_network(1.0, 4, None, None, [], model, init="random")
        out[family] = [len(net.para.names), type(config).__name__, net.para.names[:2],
                       [n for n in net.para.names if n not in keys]]
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""comfyui-para: the ComfyUI node pack entry point.

ComfyUI imports this folder as a package (after its own `nodes` module is loaded) and calls
`comfy_entrypoint`. Anywhere else (pytest, the `para` command line, a plain import) ComfyUI is not the
host and this file does nothing, so the pure `para_core` package stays usable on its own.
"""
import sys

WEB_DIRECTORY = "./web"  # front-end code: web/para_nodes.js (Train PaRa's text beside its preview)

if __package__ and hasattr(sys.modules.get("nodes"), "NODE_CLASS_MAPPINGS"):
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint"]

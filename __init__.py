"""comfyui-para: the ComfyUI node pack entry point.

ComfyUI imports this folder as a package and calls `comfy_entrypoint`. Anywhere else (pytest, the
`para` command line, plain `import`), ComfyUI is absent and this file does nothing, so the pure
`para_core` package stays usable on its own.
"""
import importlib.util

if __package__ and importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint"]

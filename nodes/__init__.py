"""ComfyUI V3 nodes of comfyui-para. Each node is a thin call into para_core."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .nodes_hook import NODES as HOOK_NODES
from .nodes_para import NODES as PARA_NODES
from .nodes_train import NODES as TRAIN_NODES


class PaRaExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*PARA_NODES, *HOOK_NODES, *TRAIN_NODES]


async def comfy_entrypoint() -> PaRaExtension:
    return PaRaExtension()

"""A-STAR for ComfyUI: test-time attention segregation and retention guidance (Agarwal et al., ICCV 2023).

The folder is a ComfyUI custom-node pack: clone it into ComfyUI/custom_nodes/ under any name.
"""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .nodes.encode import AStarTextEncode
from .nodes.overlay import AttentionOverlay
from .nodes.sampler import AStarAttentionRecorder, AStarGuider, AStarKSampler


class AStarExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [AStarTextEncode, AStarKSampler, AStarGuider, AStarAttentionRecorder, AttentionOverlay]


async def comfy_entrypoint() -> AStarExtension:
    return AStarExtension()

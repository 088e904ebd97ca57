"""The pack's node list, as ComfyUI's V3 extension."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .encode import AStarTextEncode
from .overlay import AttentionOverlay
from .apply import AStarApply, AStarAttentionRecorder
from .sampler import AStarKSampler


class AStarExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [AStarTextEncode, AStarApply, AStarKSampler, AStarAttentionRecorder, AttentionOverlay]

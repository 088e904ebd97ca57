"""A-STAR for ComfyUI: test-time attention segregation and retention guidance (Agarwal et al., ICCV 2023).

The folder is a ComfyUI custom-node pack: clone it into ComfyUI/custom_nodes/ under any name.
ComfyUI is imported only when ComfyUI asks for the nodes, so tools (pytest) can walk this folder.
"""

# Served by ComfyUI under /extensions/<this folder's name>/: the help panel reads docs/<NodeId>.md there
# (docs/<NodeId>/<lang>.md for a translation); overlay_report.js shows the overlay's report in its node.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import AStarExtension
    return AStarExtension()

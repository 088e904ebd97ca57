"""A-STAR for ComfyUI: test-time attention segregation and retention guidance (Agarwal et al., ICCV 2023).

The folder is a ComfyUI custom-node pack: clone it into ComfyUI/custom_nodes/ under any name.
ComfyUI is imported only when ComfyUI asks for the nodes, so tools (pytest) can walk this folder.
"""

WEB_DIRECTORY = "./web"  # the overlay's report shown in its node (web/overlay_report.js)


async def comfy_entrypoint():
    from .nodes.extension import AStarExtension
    return AStarExtension()

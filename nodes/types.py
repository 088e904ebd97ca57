"""The pack's own ComfyUI socket types."""
from comfy_api.latest import io

# An AttentionRecording (attention/recording.py): concept maps and losses of one sampling run.
AttentionType = io.Custom("ASTAR_ATTENTION")

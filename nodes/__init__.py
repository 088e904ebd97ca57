"""ComfyUI node classes: thin translators between ComfyUI types and the attention/ core."""

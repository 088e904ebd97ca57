"""Pure-torch core of A-STAR: attention maps, losses, guidance steps. No ComfyUI import."""

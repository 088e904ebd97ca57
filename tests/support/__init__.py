"""Test support: random-weight ComfyUI models (see models.py) and their self-checks."""

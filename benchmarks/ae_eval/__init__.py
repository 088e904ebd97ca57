"""Evaluation at scale of the pack's methods on Attend-and-Excite's prompt set.

Modules, one concern each: prompts (the prompt set), graphs (API-format graphs from the example
workflows and methods.json), client (ComfyUI over HTTP), worker (one per server, a Ray actor),
store (the result folder), sweep (the job grid spread over servers), metrics (the papers'
similarities on embeddings), scoring (CLIP and BLIP from local weights), stats (means and
intervals), report (tables, plots, grids, HTML). Run: python -m benchmarks.ae_eval --help.
"""

"""Memory and time of the text-key probabilities of one joint-attention block, chunked vs explicit.

Each configuration runs in its own subprocess (peak RSS on CPU via resource.getrusage; on CUDA
torch.cuda.max_memory_allocated over the computation): random q, k of Flux's shapes (24 heads of 128,
512 text tokens, (side/16)^2 image tokens, batch 1), forward and backward of
  chunked   attention.joint.text_key_probs (no [B, heads, n_img, L] tensor)
  explicit  softmax(q k^T / sqrt(d)) over all keys, image rows x text columns, mean over heads

  python benchmarks/bench_joint_memory.py                  # CPU, 1024 px sizes
  python benchmarks/bench_joint_memory.py --side 512 --device cuda
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_one(mode: str, side: int, device: str) -> dict:
    import resource

    import torch
    sys.path.insert(0, str(REPO))
    from attention.joint import text_key_probs

    gen = torch.Generator(device=device).manual_seed(0)
    n_img, n_txt, heads, dim = (side // 16) ** 2, 512, 24, 128
    shape = (1, heads, n_txt + n_img, dim)
    q = torch.randn(shape, generator=gen, device=device).requires_grad_()
    k = torch.randn(shape, generator=gen, device=device).requires_grad_()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    if mode == "chunked":
        out = text_key_probs(q, k, (0, n_txt), (n_txt, n_txt + n_img))
    else:
        out = (q @ k.transpose(-1, -2) / dim ** 0.5).softmax(-1)[:, :, n_txt:, :n_txt].mean(1)
    out.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # KiB -> MiB, whole process
    return {"mode": mode, "side": side, "n_img": n_img, "n_txt": n_txt, "device": device,
            "seconds": round(time.perf_counter() - start, 2),
            "peak_mib": round(peak, 1), "peak_is": "process RSS" if device == "cpu" else "CUDA allocated over inputs"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=1024, help="image side in pixels (Flux: 16 px per token)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", choices=("chunked", "explicit"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.side, args.device)))
        return
    for mode in ("chunked", "explicit"):
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--side", str(args.side),
                              "--device", args.device], capture_output=True, text=True, check=True)
        print(out.stdout.strip())


if __name__ == "__main__":
    main()

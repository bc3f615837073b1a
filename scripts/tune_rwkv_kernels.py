#!/usr/bin/env python3
"""Autotune fla's RWKV-7 kernels at every size's training shapes and pin the choices (needs a GPU).

    python scripts/tune_rwkv_kernels.py [--output rwkv/kernel_configs/fla_sm90.json] [--micro_batch_size 1]

Run it once per GPU architecture; training then starts without autotuning (rwkv/kernel_configs.py).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv.kernel_configs import config_file, dump  # noqa: E402
from rwkv.model import HEAD_SIZE, SHAPES  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--micro_batch_size", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=8192)
    parser.add_argument("--sizes", default="0.5B",
                        help="shapes to tune at; one is enough, since the table pins configurations per kernel")
    args = parser.parse_args()
    import fla.ops.rwkv7  # noqa: F401  - a plain import: full autotuning, no pinned table

    from rwkv.wkv7 import wkv7_fla
    for size in args.sizes.split(","):
        shape = SHAPES["paper"][size]
        heads = shape["d_model"] // HEAD_SIZE
        dims = (args.micro_batch_size, args.seq_len, heads, HEAD_SIZE)
        r, k, v = (torch.randn(dims, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        w = (-math.exp(-0.5) * torch.rand(dims, device="cuda")).to(torch.bfloat16)
        kk = F.normalize(torch.randn(dims, device="cuda"), dim=-1).to(torch.bfloat16)
        inputs = [t.requires_grad_() for t in (r, w, k, v, -kk.detach(), (kk * 0.5).detach())]
        started = time.perf_counter()
        wkv7_fla(*inputs).float().sum().backward()
        torch.cuda.synchronize()
        print(f"{size}: {heads} heads, tuned forward+backward in {time.perf_counter() - started:.1f} s", flush=True)
    path = args.output or config_file(torch.cuda.get_device_capability())
    print(f"pinned {dump(path)} kernels -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Autotune fla's RWKV-7 kernels at the training shapes and pin the choices (needs a GPU).

    python scripts/tune_rwkv_kernels.py [--output rwkv/kernel_configs/fla_sm90.json] [--micro_batch_size 1]
    python scripts/tune_rwkv_kernels.py --stock_model

The first form tunes the chunked recurrence the harness calls; the second adds the kernels of fla's own
RWKV7ForCausalLM (token shift, norms, gates: the stock reference of scripts/benchmark_stock_reference.py),
running it with the recurrence already pinned. Run both once per GPU architecture; training then starts
without autotuning (rwkv/kernel_configs.py).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rwkv.kernel_configs import config_file, dump, import_fla_with_pinned_configs
from rwkv.model import FAMILY, HEAD_SIZE, SHAPES


def tune_recurrence(sizes: list[str], micro_batch_size: int, seq_len: int) -> None:
    import fla.ops.rwkv7  # noqa: F401  - a plain import: full autotuning, no pinned table

    from rwkv.wkv7 import wkv7_fla
    for size in sizes:
        shape = SHAPES["paper"][size]
        heads = shape["d_model"] // HEAD_SIZE
        dims = (micro_batch_size, seq_len, heads, HEAD_SIZE)
        r, k, v = (torch.randn(dims, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        w = (-math.exp(-0.5) * torch.rand(dims, device="cuda")).to(torch.bfloat16)
        kk = F.normalize(torch.randn(dims, device="cuda"), dim=-1).to(torch.bfloat16)
        inputs = [t.requires_grad_() for t in (r, w, k, v, -kk.detach(), (kk * 0.5).detach())]
        started = time.perf_counter()
        wkv7_fla(*inputs).float().sum().backward()
        torch.cuda.synchronize()
        print(f"{size}: {heads} heads, tuned forward+backward in {time.perf_counter() - started:.1f} s", flush=True)


def tune_stock_model(micro_batch_size: int, seq_len: int) -> None:
    print(f"fla kernels: {import_fla_with_pinned_configs('fla.models')}", flush=True)
    stock = FAMILY.stock
    with torch.device("cuda"):
        model = stock.build(SHAPES["paper"]["0.5B"], FAMILY.default_vocab_rows("paper")).to(torch.bfloat16)
    tokens = torch.randint(0, FAMILY.tokenizer_vocab, (micro_batch_size, seq_len), device="cuda")
    started = time.perf_counter()
    stock.loss(model, tokens).backward()
    torch.cuda.synchronize()
    print(f"fla RWKV7ForCausalLM: tuned forward+backward in {time.perf_counter() - started:.1f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the timings (None: print only)")
    parser.add_argument("--micro_batch_size", type=int, default=1, help="sequences per forward pass")
    parser.add_argument("--seq_len", type=int, default=8192, help="tokens per sequence")
    parser.add_argument("--sizes", default="0.5B",
                        help="shapes to tune at; one is enough, since the table pins configurations per kernel")
    parser.add_argument("--stock_model", action="store_true",
                        help="tune fla's RWKV7ForCausalLM (0.5B) and add its kernels to the table")
    args = parser.parse_args()
    pinned = config_file(torch.cuda.get_device_capability())
    path = args.output or pinned
    if args.stock_model:
        tune_stock_model(args.micro_batch_size, args.seq_len)
    else:
        tune_recurrence(args.sizes.split(","), args.micro_batch_size, args.seq_len)
    extend = pinned if args.stock_model and pinned.exists() else None
    print(f"pinned {dump(path, extend)} kernels -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Autotune a family's Triton library kernels at the training shapes and pin the choices (needs a GPU).

    python scripts/tune_kernels.py --family rwkv [--output FILE] [--micro_batch_size 1]
    python scripts/tune_kernels.py --family rwkv --stock_model

The families with kernels to pin are those naming ``pinned_kernels`` (RWKV-7 and Gated DeltaNet on
flash-linear-attention, Mamba-2 on mamba-ssm's SSD). The first form runs one forward and backward of the
harness's model (paper shapes, bf16 autocast, as in training) with the library imported unpinned, so every
kernel it calls autotunes, and writes the choices to the family's table
(<family>/kernel_configs/<library>_sm<NN>.json). The second adds the kernels of the library's own model (the
stock reference of scripts/benchmark_stock_reference.py), running it with the harness's kernels already
pinned. Run both once per GPU architecture; training then starts without autotuning
(training_harness/kernel_pins.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from training_harness.kernel_pins import config_file, dump, library_of
from training_harness.registry import build_model, family_names, get_family


def tune_harness(family: str, size: str, micro_batch_size: int, seq_len: int) -> None:
    spec = get_family(family)
    importlib.import_module(spec.pinned_kernels)  # a plain import: full autotuning, no pinned table
    model = build_model(spec, size, "paper", spec.default_vocab_rows("paper"), "cuda")
    tokens = torch.randint(0, spec.tokenizer_vocab, (micro_batch_size, seq_len + 1), device="cuda")
    started = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    torch.cuda.synchronize()
    print(f"{family} {size}: tuned forward+backward in {time.perf_counter() - started:.1f} s", flush=True)


def tune_stock_model(family: str, size: str, micro_batch_size: int, seq_len: int) -> None:
    spec = get_family(family)
    with torch.device("cuda"):  # the stock builder imports the library with the harness's kernels pinned
        model = spec.stock.build(spec.shape(size, "paper"), spec.default_vocab_rows("paper")).to(torch.bfloat16)
    tokens = torch.randint(0, spec.tokenizer_vocab, (micro_batch_size, seq_len), device="cuda")
    started = time.perf_counter()
    spec.stock.loss(model, tokens).backward()
    torch.cuda.synchronize()
    print(f"{spec.stock.name}: tuned forward+backward in {time.perf_counter() - started:.1f} s", flush=True)


def main() -> int:
    pinning = sorted(name for name in family_names() if get_family(name).pinned_kernels)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--family", required=True, choices=pinning, help="whose kernels to tune")
    parser.add_argument("--output", type=Path, default=None,
                        help="the table to write (None: the family's table for this GPU architecture)")
    parser.add_argument("--micro_batch_size", type=int, default=1, help="sequences per forward pass")
    parser.add_argument("--seq_len", type=int, default=8192, help="tokens per sequence")
    parser.add_argument("--size", default="0.5B",
                        help="shapes to tune at; one is enough, since the table pins configurations per kernel")
    parser.add_argument("--stock_model", action="store_true",
                        help="tune the library's own model of the family and add its kernels to the table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("tuning runs the kernels: it needs a CUDA GPU")
    module = get_family(args.family).pinned_kernels
    pinned = config_file(args.family, module, torch.cuda.get_device_capability())
    path = args.output or pinned
    if args.stock_model:
        tune_stock_model(args.family, args.size, args.micro_batch_size, args.seq_len)
    else:
        tune_harness(args.family, args.size, args.micro_batch_size, args.seq_len)
    extend = pinned if args.stock_model and pinned.exists() else None
    print(f"pinned {dump(path, library_of(module), extend)} kernels -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

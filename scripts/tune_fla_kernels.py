#!/usr/bin/env python3
"""Autotune a family's flash-linear-attention kernels at the training shapes and pin the choices (needs a GPU).

    python scripts/tune_fla_kernels.py --family rwkv [--output FILE] [--micro_batch_size 1]
    python scripts/tune_fla_kernels.py --family rwkv --stock_model

The first form runs one forward and backward of the harness's model (paper shapes, bf16 autocast, as in
training) with fla imported unpinned, so every kernel it calls autotunes, and writes the choices to the
family's table (<family>/kernel_configs/fla_sm<NN>.json). The second adds the kernels of fla's own model (the
stock reference of scripts/benchmark_stock_reference.py), running it with the harness's kernels already
pinned. Run both once per GPU architecture; training then starts without autotuning
(training_harness/fla_kernels.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from training_harness.fla_kernels import config_file, dump, import_fla_with_pinned_configs
from training_harness.registry import build_model, get_family

#: The families whose recurrence runs on fla, and the fla module each imports.
FLA_FAMILIES = {"rwkv": "fla.ops.rwkv7", "gated_deltanet": "fla.ops.gated_delta_rule"}


def tune_harness(family: str, size: str, micro_batch_size: int, seq_len: int) -> None:
    importlib.import_module(FLA_FAMILIES[family])  # a plain import: full autotuning, no pinned table
    spec = get_family(family)
    model = build_model(spec, size, "paper", spec.default_vocab_rows("paper"), "cuda")
    tokens = torch.randint(0, spec.tokenizer_vocab, (micro_batch_size, seq_len + 1), device="cuda")
    started = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    torch.cuda.synchronize()
    print(f"{family} {size}: tuned forward+backward in {time.perf_counter() - started:.1f} s", flush=True)


def tune_stock_model(family: str, size: str, micro_batch_size: int, seq_len: int) -> None:
    print(f"fla kernels: {import_fla_with_pinned_configs(family, 'fla.models')}", flush=True)
    spec = get_family(family)
    with torch.device("cuda"):
        model = spec.stock.build(spec.shape(size, "paper"), spec.default_vocab_rows("paper")).to(torch.bfloat16)
    tokens = torch.randint(0, spec.tokenizer_vocab, (micro_batch_size, seq_len), device="cuda")
    started = time.perf_counter()
    spec.stock.loss(model, tokens).backward()
    torch.cuda.synchronize()
    print(f"{spec.stock.name}: tuned forward+backward in {time.perf_counter() - started:.1f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(FLA_FAMILIES), help="whose kernels to tune")
    parser.add_argument("--output", type=Path, default=None,
                        help="the table to write (None: the family's table for this GPU architecture)")
    parser.add_argument("--micro_batch_size", type=int, default=1, help="sequences per forward pass")
    parser.add_argument("--seq_len", type=int, default=8192, help="tokens per sequence")
    parser.add_argument("--size", default="0.5B",
                        help="shapes to tune at; one is enough, since the table pins configurations per kernel")
    parser.add_argument("--stock_model", action="store_true",
                        help="tune fla's own model of the family and add its kernels to the table")
    args = parser.parse_args()
    pinned = config_file(args.family, torch.cuda.get_device_capability())
    path = args.output or pinned
    if args.stock_model:
        tune_stock_model(args.family, args.size, args.micro_batch_size, args.seq_len)
    else:
        tune_harness(args.family, args.size, args.micro_batch_size, args.seq_len)
    extend = pinned if args.stock_model and pinned.exists() else None
    print(f"pinned {dump(path, extend)} kernels -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Where one training micro-step spends GPU time: the top kernels by their own GPU time (needs a GPU).

    python scripts/profile_training_step.py --family rwkv [--size 0.5B] [--micro_batch_size 2] [--compile]
        [--seq_len 8192] [--top 25] [--trace trace.json]

Builds the family's model as the harness does (paper shapes, bf16 autocast over fp32 weights, the
harness's loss), runs warm-up steps (compilation, autotuning), then profiles one forward + backward
and prints torch.profiler's table; --trace also writes a Chrome trace.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training_harness.registry import get_family  # noqa: E402

VOCAB_ROWS = {"qwen": 151_936}  # the others use the GPT-NeoX-20B vocabulary padded to 50,304


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True)
    parser.add_argument("--size", default="0.5B")
    parser.add_argument("--micro_batch_size", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=8192)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", type=Path, default=None)
    args = parser.parse_args()
    family = get_family(args.family)
    vocab = VOCAB_ROWS.get(args.family, 50_304)
    with torch.device("cuda"):
        model = family.build(family.shape(args.size, "paper"), vocab, "cuda", False)
    if args.compile:
        model.compile_regions()
    tokens = torch.randint(0, vocab, (args.micro_batch_size, args.seq_len + 1), device="cuda")

    def micro_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()

    for _ in range(args.warmup):
        micro_step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        micro_step()
        torch.cuda.synchronize()
    print(profiler.key_averages().table(sort_by="self_device_time_total", row_limit=args.top, max_name_column_width=70))
    if args.trace:
        profiler.export_chrome_trace(str(args.trace))
    return 0


if __name__ == "__main__":
    sys.exit(main())

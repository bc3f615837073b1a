#!/usr/bin/env python3
"""Time a family's stock implementation, the yardstick of the harness's speed (needs a GPU).

    python scripts/benchmark_stock_reference.py --family mamba [--size 0.5B] [--micro_batch_size 8]
        [--steps 10] [--seq_len 8192] [--profile_steps 2] [--trace PATH]

The library's model as it ships (each family's ``stock`` in its model.py: transformers' Qwen2ForCausalLM and
GPTNeoXForCausalLM with SDPA attention, mamba-ssm's MambaLMHeadModel, flash-linear-attention's
RWKV7ForCausalLM) at the family's shape, bf16 weights, eager, the library's own loss, under the harness's
allocator settings (training_harness.distributed.ALLOCATOR_SETTINGS). One optimizer step does
the same work as the harness's: the spec's global batch as micro-batches of ``--micro_batch_size`` (default:
the sweep's GPU plan) with gradient accumulation, clipping at 1.0, fused AdamW. Prints one JSON line, with
the energy per token, mean power and mean SM clock over the steps after the first, measured as the harness
measures its runs (efficientllm_metrics). ``--profile_steps`` adds the GPU's kernel time per step, the top
kernels, and each profiled step's longest wait (training_harness.profiling.step_idle); ``--trace`` writes them
as a Chrome trace.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from training_harness.config import SPEC_GLOBAL_BATCH
from training_harness.distributed import allocator_settings, configure_allocator
from training_harness.profiling import measured_steps, profile_steps, speed
from training_harness.registry import SIZES, family_names, get_family
from training_harness.sweep import gpu_plan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(family_names()),
                        help="family whose stock model is timed")
    parser.add_argument("--size", default="0.5B", choices=SIZES, help="nominal size (paper shapes)")
    parser.add_argument("--micro_batch_size", type=int, default=None, help="default: the sweep's GPU plan")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps; the first is not timed")
    parser.add_argument("--seq_len", type=int, default=8192, help="tokens per sequence")
    parser.add_argument("--profile_steps", type=int, default=0, help="steps to profile after the timed ones")
    parser.add_argument("--top", type=int, default=15, help="kernels listed by the profile")
    parser.add_argument("--trace", metavar="PATH", help="also write the profiled steps as a Chrome trace "
                        "(.json, or .json.gz gzipped) for Perfetto or chrome://tracing")
    args = parser.parse_args()
    family = get_family(args.family)
    if family.stock is None:
        parser.error(f"{args.family} names no stock implementation")
    global_batch = SPEC_GLOBAL_BATCH[args.size]
    micro = args.micro_batch_size or gpu_plan(args.family, args.size).get("micro_batch_size", 1)
    if global_batch % micro:
        parser.error(f"--micro_batch_size {micro} does not divide the global batch {global_batch}")
    configure_allocator()  # the harness's, so that both sides' memory compares
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = family.stock.build(family.shape(args.size, "paper"), family.default_vocab_rows("paper"))
    model = model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    batches = [torch.randint(0, family.tokenizer_vocab, (micro, args.seq_len), device="cuda")
               for _ in range(global_batch // micro)]

    def step() -> None:
        for tokens in batches:
            (family.stock.loss(model, tokens) / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        times, energy = measured_steps(step, args.steps, global_batch * args.seq_len,
                                       [torch.cuda.current_device()])
    except torch.cuda.OutOfMemoryError:
        print(json.dumps({"family": args.family, "size": args.size, "micro_batch_size": micro,
                          "error": f"out of memory at micro-batch {micro}"}))
        return 0
    row = {"family": args.family, "size": args.size, "implementation": family.stock.name, "micro_batch_size": micro,
           "global_batch": global_batch, "cuda_allocator": allocator_settings(),
           "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           **speed(times[1:] or times, global_batch * args.seq_len), "first_step_s": times[0],
           "step_s": [round(t, 4) for t in times], **energy}
    if args.profile_steps:
        row.update(profile_steps(step, args.profile_steps, args.top, row["s_per_step"], args.trace))
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())

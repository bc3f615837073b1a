#!/usr/bin/env python3
"""Where the harness's training step spends GPU time: the real trainer's optimizer step under torch.profiler.

    python scripts/profile_training_step.py --family mamba --data_path DIR [--size 0.5B] [--warmup_steps 3]
        [--profile_steps 2] [--top 20] [--trace PATH]
        [--plan | training flags such as --micro_batch_size 2 --compile]

Sets up ``training_harness.trainer.Trainer`` exactly as a run does (the same flags; ``--plan`` adds the
sweep's GPU plan for the family and size), runs warm-up steps (compilation, autotuning), times a few steps,
then profiles ``--profile_steps`` and prints one JSON line: wall and kernel seconds per step, GPU busy
share, kernel launches and the top kernels, and for each profiled step its wall and GPU-busy seconds and its
longest wait, named by the kernel that ended it (profile a dozen steps to catch a run's slow ones).
``--trace`` writes the profiled steps as a Chrome trace as well: what the host did during each wait. A step
whose GPU-busy seconds fall well short of its wall seconds while its longest wait is short waits on the host's
kernel launches, a little between every kernel; ``--cuda_graphs`` is for such steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from training_harness import distributed
from training_harness.config import parse_config
from training_harness.profiling import profile_steps, speed, time_steps
from training_harness.sweep import plan_flags
from training_harness.trainer import Trainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--family", required=True, help="family to profile")
    parser.add_argument("--size", default="0.5B", help="nominal size")
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--timed_steps", type=int, default=5, help="steps timed")
    parser.add_argument("--profile_steps", type=int, default=2, help="steps under the profiler")
    parser.add_argument("--top", type=int, default=20, help="kernels listed")
    parser.add_argument("--trace", metavar="PATH", help="also write the profiled steps as a Chrome trace "
                        "(.json, or .json.gz gzipped) for Perfetto or chrome://tracing")
    parser.add_argument("--plan", action="store_true", help="train with the sweep's GPU plan for family and size")
    args, training_flags = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as output:
        flags = ["--model_size", args.size, "--output_dir", output, "--device", "cuda", *training_flags]
        if args.plan:
            flags += plan_flags(args.family, args.size)
        config = parse_config(flags, args.family, "profile")
        trainer = Trainer(config, distributed.setup(config.device))
        trainer.setup()

        def step() -> None:
            trainer.train_step()
            trainer.step += 1

        time_steps(step, args.warmup_steps)  # compilation, autotuning
        times = time_steps(step, args.timed_steps)
        tokens = trainer.micro_batch * trainer.accumulation * config.seq_len
        row = {"family": args.family, "size": args.size, "flags": " ".join(flags[4:]),
               "micro_batch_size": trainer.micro_batch, **speed(times, tokens)}
        row.update(profile_steps(step, args.profile_steps, args.top, row["s_per_step"], args.trace))
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())

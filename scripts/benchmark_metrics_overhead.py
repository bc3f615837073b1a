#!/usr/bin/env python3
"""Cost of the NVML sampler on a real training step, and counter energy against integrated power (needs a GPU).

    python scripts/benchmark_metrics_overhead.py [--family pythia] [--rounds 5] [--steps 30] [--output FILE]

The same workload runs with the sampler off, at 100 ms and at 10 ms, interleaved round by round so
that clock and temperature drift fall on every mode alike. Step times come from synchronized
iteration boundaries; energy from the NVML counter and from the trapezoid of sampled power over
the same windows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from efficientllm_metrics import Monitor
from training_harness.registry import build_model, get_family

MODES = {"off": None, "100ms": 0.1, "10ms": 0.01}


def make_step(family_name: str, seq_len: int):
    family = get_family(family_name)
    torch.manual_seed(0)
    model = build_model(family, "0.5B", "paper", family.default_vocab_rows("paper"), "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, family.tokenizer_vocab, (1, seq_len + 1), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_mode(step, interval: float | None, steps: int) -> dict:
    if interval is None:
        times = []
        torch.cuda.synchronize()
        last = time.perf_counter()
        for _ in range(steps):
            step()
            torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - last)
            last = now
        return {"step_s": times}
    monitor = Monitor([torch.cuda.current_device()], warmup_iterations=0, sample_interval_s=interval)
    monitor.start()
    for _ in range(steps):
        step()
        monitor.iteration_done(1)
    measurement = monitor.stop()
    gpu = measurement.gpus[0]
    return {"step_s": measurement.iteration_s, "counter_j": gpu.energy_counter_j,
            "integral_j": gpu.energy_integral_j, "window_s": measurement.window_s,
            "samples": measurement.sample_count, "power_method": measurement.backend.get("power_method")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--family", default="pythia", help="family trained with and without the meters")
    parser.add_argument("--seq_len", type=int, default=8192, help="tokens per training window")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds with and without, for the spread")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per round")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the figures (None: print only)")
    args = parser.parse_args()
    step = make_step(args.family, args.seq_len)
    run_mode(step, None, 10)  # warm-up: allocator, cuBLAS handles, kernel selection
    rounds: dict[str, list[dict]] = {mode: [] for mode in MODES}
    order = list(MODES)
    for round_index in range(args.rounds):
        for mode in order[round_index % 3:] + order[:round_index % 3]:  # rotate which mode goes first
            rounds[mode].append(run_mode(step, MODES[mode], args.steps))

    base = statistics.median(t for r in rounds["off"] for t in r["step_s"])
    summary = {"device": torch.cuda.get_device_name(), "family": args.family, "seq_len": args.seq_len,
               "rounds": args.rounds, "steps_per_round": args.steps, "modes": {}}
    print(f"{'mode':>6} {'median s/step':>14} {'overhead':>9} {'paired':>8} {'counter J':>10} {'integral J':>11} "
          f"{'ratio':>7}")
    for mode, results in rounds.items():
        times = [t for r in results for t in r["step_s"]]
        median = statistics.median(times)
        # Paired: each round's median against the same round's sampler-off median, so drift between
        # rounds cancels; the spread of these ratios is the benchmark's noise.
        paired = [statistics.median(r["step_s"]) / statistics.median(off["step_s"]) - 1
                  for r, off in zip(results, rounds["off"])]
        row = {"median_step_s": median, "mean_step_s": statistics.mean(times), "overhead": median / base - 1,
               "paired_overhead_median": statistics.median(paired), "paired_overhead_per_round": paired}
        if mode != "off":
            counter = sum(r["counter_j"] for r in results)
            integral = sum(r["integral_j"] for r in results)
            row.update(counter_j=counter, integral_j=integral, integral_over_counter=integral / counter,
                       samples=sum(r["samples"] for r in results), power_method=results[0]["power_method"],
                       window_s=sum(r["window_s"] for r in results))
        summary["modes"][mode] = row
        energy = (f"{row['counter_j']:>10.1f} {row['integral_j']:>11.1f} {row['integral_over_counter']:>7.4f}"
                  if mode != "off" else f"{'':>10} {'':>11} {'':>7}")
        print(f"{mode:>6} {median:>14.5f} {row['overhead']:>+9.2%} {row['paired_overhead_median']:>+8.2%} {energy}")
    if args.output:
        args.output.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

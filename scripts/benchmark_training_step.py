#!/usr/bin/env python3
"""Time the harness's own training iteration for each family and size (needs a GPU).

    python scripts/benchmark_training_step.py --qwen_data DIR --neox_data DIR [--families qwen,rwkv]
        [--sizes 0.5B] [--preset paper] [--steps 12] [--variant NAME="FLAGS" ...] [--stock] [--rounds 2]

Each family x size x variant runs the real training script in a fresh process (so the first step is cold:
compilation and autotuning included) at the spec's global batch; a variant is a name and the training flags it
adds (default: one variant, "plan", the sweep's plan for that family and size: each family's ``gpu_plan``,
compiled). --stock also times the family's stock implementation (scripts/benchmark_stock_reference.py, paper
shapes) at the first variant's micro-batch and at micro-batch 1, each in a fresh process, and the speed-up
compares equal micro-batches and equal tokens per optimizer step; where the stock model allocates more than an
80 GB card holds at that micro-batch, it is also timed at the largest (halving) that fits, for
``speedup_vs_stock_fitting``. --rounds repeats the whole sequence, so every figure has a spread.
first_step_compile_s is the part of the first step the training process spent compiling Triton kernels (the
libraries'; inductor compiles in its workers), first_step_compiled_kernels those seconds by kernel name (in the
JSON rows); kernel_warmup_wait_s, how long it waited for the helper that
compiles them beside the first step (training_harness/kernel_warmup.py; a variant with ``--no-kernel_warmup``
times a run without it). Every row keeps its steps' losses and seconds, the UTC time its process started, and
its energy per token, mean power and mean SM clock over the timed steps: at a GPU's power cap the clock, and
tokens/s with it, depend on how densely a step draws power, so two rows compare only at similar clocks. Prints
one table and writes the rows as JSON (default docs/benchmarks/training_step_<gpu>.json).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from efficientllm_metrics import ResultsError, read_results, write_json_atomic
from training_harness.profiling import ENERGY_METRICS
from training_harness.registry import SIZES, family_names, get_family
from training_harness.run_log import LOG_FILE, read_log
from training_harness.sweep import plan_flags
from training_harness.tokenization import tokenizer_name

ROOT = Path(__file__).resolve().parents[1]

COLUMNS = ("round", "family", "size", "variant", "micro", "status", "params_m", "tokens_per_s", "mfu", "s_per_iter",
           "peak_alloc_gb", "peak_device_gb", "first_step_s", "first_step_compile_s", "kernel_warmup_wait_s",
           "process_s", "energy_j_per_token", "sm_clock_mean_mhz", "stock_tokens_per_s", "speedup_vs_stock",
           "stock_fitting_micro", "speedup_vs_stock_fitting", "stock_mb1_tokens_per_s")

#: The card the GPU plans are for: a stock model whose allocator peak passes this at the harness's micro-batch
#: does not fit it (an H100 80GB has 85.5 GB, the rest for the CUDA context and the allocator's cache).
PLAN_MEMORY_GB = 80


def run_one(family: str, size: str, variant: str, flags: str, args, work: Path) -> dict:
    data = args.qwen_data if family == "qwen" else args.neox_data
    output = work / f"{family}_{size}_{variant}"
    command = [sys.executable, str(ROOT / family / f"train_{family}_fineweb.py"), "--model_size", size,
               "--preset", args.preset, "--data_path", str(data), "--output_dir", str(output),
               "--max_steps", str(args.steps), "--eval_windows", "1", "--no-final_checkpoint", "--device", "cuda",
               *shlex.split(flags)]
    started_utc, started = utc_now(), time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    process_s = time.perf_counter() - started
    # Recorded relative to the checkout, the temporary output folder as <output>: no machine's paths.
    recorded = [str(Path(part).relative_to(ROOT)) if part.startswith(str(ROOT)) else part for part in command[1:]]
    row = {"family": family, "size": size, "variant": variant, "started_utc": started_utc,
           "process_s": round(process_s, 1),
           "command": " ".join(recorded).replace(str(output), "<output>")}
    try:
        metrics = read_results(output)
    except (OSError, ResultsError):
        # A crash's cause (a fault handler's stacks) sits above its last lines: keep the whole tail.
        return {**row, "status": f"failed (exit {result.returncode})", "stderr": result.stderr[-20_000:]}
    if metrics.get("params") is None:
        return {**row, "status": f"{metrics['status']}: {metrics.get('error')} {result.stderr.strip()[-500:]}"}
    log = read_log(output / LOG_FILE)
    first = next((r for r in log if r.get("step") == 1 and "step_s" in r), {})
    row.update(status=metrics["status"], micro=metrics.get("micro_batch_size"),
               params_m=round(metrics["params"] / 1e6, 1),
               tokens_per_s=metrics.get("tokens_per_s"), mfu=metrics.get("mfu"),
               s_per_iter=metrics.get("al_s_per_iter"), peak_alloc_gb=metrics.get("allocator_peak_allocated_gb"),
               peak_device_gb=metrics.get("peak_memory_gb"),
               first_step_s=first.get("step_s"), first_step_compile_s=first.get("triton_compile_s"),
               first_step_compiled_kernels=first.get("triton_compiled_kernels"),
               kernel_warmup_wait_s=first.get("kernel_warmup_wait_s"),
               kernel_warmup_error=first.get("kernel_warmup_error"),
               kernel_path=metrics.get("kernel_path"), device=metrics.get("device_name"),
               error=metrics.get("error"), losses=[r["loss"] for r in log if "loss" in r],
               step_s=[round(r["step_s"], 4) for r in log if "step_s" in r],
               **{name: metrics.get(name) for name in ENERGY_METRICS})
    return row


def utc_now() -> str:
    """When a process started, to line rows up with a clock or power log kept beside the benchmark."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def stock_reference(family: str, size: str, micro_batch_size: int, steps: int) -> dict:
    """The stock implementation's row (scripts/benchmark_stock_reference.py), timed in a fresh process."""
    started_utc = utc_now()
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_stock_reference.py"), "--family",
                             family, "--size", size, "--micro_batch_size", str(micro_batch_size), "--steps",
                             str(steps)], capture_output=True, text=True)
    if result.returncode:
        return {"error": result.stderr.strip()[-500:], "started_utc": started_utc}
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "started_utc": started_utc}


def stock_rows(family: str, size: str, harness: dict, steps: int, round_index: int) -> list[dict]:
    """The stock model at the harness row's micro-batch (its speed-up goes into that row), at the largest
    micro-batch that fits PLAN_MEMORY_GB where that one does not (``speedup_vs_stock_fitting``), and at 1."""
    micro = harness.get("micro") or 1
    timed = {micro: stock_reference(family, size, micro, steps)}
    harness.update(stock_tokens_per_s=timed[micro].get("tokens_per_s"), speedup_vs_stock=speedup(harness, timed[micro]))
    fitting = micro
    while fitting > 1 and not fits(timed[fitting]):
        fitting //= 2
        timed[fitting] = stock_reference(family, size, fitting, steps)
    if fitting != micro:
        harness.update(stock_fitting_micro=fitting, speedup_vs_stock_fitting=speedup(harness, timed[fitting]))
    if 1 not in timed:
        timed[1] = stock_reference(family, size, 1, steps)
    harness["stock_mb1_tokens_per_s"] = timed[1].get("tokens_per_s")
    return [{"round": round_index, "family": family, "size": size, "variant": "stock",
             "micro": stock.get("micro_batch_size"), "status": stock.get("error", "completed"),
             "params_m": stock.get("params_m"), "tokens_per_s": stock.get("tokens_per_s"),
             "s_per_iter": stock.get("s_per_step"), "peak_alloc_gb": stock.get("peak_alloc_gb"),
             "first_step_s": stock.get("first_step_s"), "started_utc": stock.get("started_utc"),
             **{name: stock.get(name) for name in ENERGY_METRICS}, "stock": stock}
            for stock in timed.values()]


def fits(stock: dict) -> bool:
    return "error" not in stock and (stock.get("peak_alloc_gb") or 0) <= PLAN_MEMORY_GB


def speedup(harness: dict, stock: dict) -> float | None:
    """The harness row's tokens/s over the stock row's, where both were measured."""
    both = harness.get("tokens_per_s") and stock.get("tokens_per_s")
    return harness["tokens_per_s"] / stock["tokens_per_s"] if both else None


def cell(value) -> str:
    """A table cell: four significant digits below 100 (energy per token is a few thousandths of a joule)."""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 100 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    default_data = {name: f"experiments/data/{tokenizer_name(get_family(name).default_tokenizer)}"
                    for name in ("qwen", "pythia")}
    parser.add_argument("--qwen_data", default=default_data["qwen"], help="prepared with the Qwen2.5 tokenizer")
    parser.add_argument("--neox_data", default=default_data["pythia"],
                        help="prepared with the GPT-NeoX-20B tokenizer (Pythia, Mamba, RWKV)")
    parser.add_argument("--families", default=",".join(family_names()), help="comma-separated families")
    parser.add_argument("--sizes", default="0.5B", help="comma-separated nominal sizes")
    parser.add_argument("--preset", default="paper", help="shapes (docs/models.md)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per timing")
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                        help="a named set of training flags, e.g. mb2=\"--micro_batch_size 2 --compile\"")
    parser.add_argument("--stock", action="store_true",
                        help="also time each family's stock implementation at the same micro-batch and at 1")
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything, for the spread")
    parser.add_argument("--output", type=Path, default=None, help="JSON file, saved after every row (None: print only)")
    args = parser.parse_args()
    variants = [v.split("=", 1) if "=" in v else (v, "") for v in args.variant] or [("plan", None)]
    device = torch.cuda.get_device_name()
    output = args.output or ROOT / "docs" / "benchmarks" / f"training_step_{device.replace(' ', '_')}.json"
    header = {"device": device, "date": time.strftime("%Y-%m-%d"), "args": {
        key: str(value) for key, value in vars(args).items() if key != "output"}}
    rows = []

    def record(new_rows: list[dict]) -> None:
        """Print and save after every row: a run stopped part-way keeps what it measured."""
        rows.extend(new_rows)
        for row in new_rows:
            print(" ".join(f"{k}={cell(row.get(k))}" for k in COLUMNS), flush=True)
        write_json_atomic(output, {**header, "rows": rows})

    with tempfile.TemporaryDirectory() as work:
        for round_index in range(1, args.rounds + 1):
            for size in [s for s in args.sizes.split(",") if s in SIZES]:
                for family in args.families.split(","):
                    for name, flags in variants:
                        flags = " ".join(plan_flags(family, size)) if flags is None else flags
                        row = run_one(family, size, name, flags, args, Path(work) / f"round{round_index}")
                        record([{"round": round_index, **row}])
                    if args.stock and args.preset == "paper":
                        harness = rows[-len(variants)]
                        stock = stock_rows(family, size, harness, args.steps, round_index)
                        record(stock)
    print("| " + " | ".join(COLUMNS) + " |")
    for row in rows:
        print("| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

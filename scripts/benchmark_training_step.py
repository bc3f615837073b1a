#!/usr/bin/env python3
"""Time the harness's own training iteration for each family and size (needs a GPU).

    python scripts/benchmark_training_step.py --qwen_data DIR --neox_data DIR [--families qwen,rwkv]
        [--sizes 0.5B] [--preset paper] [--steps 12] [--variant NAME="FLAGS" ...] [--naive]

Each family x size x variant runs the real training script in a fresh process (so the first step is
cold: compilation and autotuning included) at the spec's global batch; a variant is a name and the
training flags it adds (default: one variant, "plan", the sweep's plan for that family and size:
training_harness/sweep.py's GPU_PLAN, compiled). --naive times each family's stock
implementation once, after its first variant. Prints one table and writes the rows as JSON (default
docs/benchmarks/training_step_<gpu>.json).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training_harness.registry import FAMILY_MODULES, SIZES, get_family  # noqa: E402
from training_harness.sweep import plan_flags  # noqa: E402
from training_harness.tokenization import tokenizer_name  # noqa: E402

COLUMNS = ("family", "size", "variant", "micro", "status", "params_m", "tokens_per_s", "mfu", "s_per_iter",
           "peak_alloc_gb", "first_step_s", "process_s", "naive_tokens_per_s", "speedup_vs_naive")


def run_one(family: str, size: str, variant: str, flags: str, args, work: Path) -> dict:
    data = args.qwen_data if family == "qwen" else args.neox_data
    output = work / f"{family}_{size}_{variant}"
    command = [sys.executable, str(ROOT / family / f"train_{family}_fineweb.py"), "--model_size", size,
               "--preset", args.preset, "--data_path", str(data), "--output_dir", str(output),
               "--max_steps", str(args.steps), "--eval_windows", "1", "--no-final_checkpoint", "--device", "cuda",
               *shlex.split(flags)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    process_s = time.perf_counter() - started
    row = {"family": family, "size": size, "variant": variant, "process_s": round(process_s, 1),
           "command": " ".join(command[1:])}
    try:
        metrics = json.loads((output / "efficientllm_metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        # A crash's cause (a fault handler's stacks) sits above its last lines: keep the whole tail.
        return {**row, "status": f"failed (exit {result.returncode})", "stderr": result.stderr[-20_000:]}
    if metrics.get("params") is None:
        return {**row, "status": f"{metrics['status']}: {metrics.get('error')} {result.stderr.strip()[-500:]}"}
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()] \
        if (output / "log.jsonl").exists() else []
    first = next((r["step_s"] for r in log if r.get("step") == 1 and "step_s" in r), None)
    row.update(status=metrics["status"], micro=metrics.get("micro_batch_size"),
               params_m=round(metrics["params"] / 1e6, 1),
               tokens_per_s=metrics.get("tokens_per_s"), mfu=metrics.get("mfu"),
               s_per_iter=metrics.get("al_s_per_iter"), peak_alloc_gb=metrics.get("allocator_peak_allocated_gb"),
               first_step_s=first, kernel_path=metrics.get("kernel_path"), device=metrics.get("device_name"),
               error=metrics.get("error"))
    return row


def naive_reference(family: str, steps: int) -> dict:
    """The stock implementation's tokens/s (scripts/benchmark_naive_reference.py), in a fresh process."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_naive_reference.py"), "--family",
                             family, "--steps", str(steps)], capture_output=True, text=True)
    if result.returncode:
        return {"naive_error": result.stderr.strip()[-300:]}
    return {"naive": json.loads(result.stdout.strip().splitlines()[-1])}


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if value < 100 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = {name: f"experiments/data/{tokenizer_name(get_family(name).default_tokenizer)}"
                    for name in ("qwen", "pythia")}
    parser.add_argument("--qwen_data", default=default_data["qwen"], help="prepared with the Qwen2.5 tokenizer")
    parser.add_argument("--neox_data", default=default_data["pythia"],
                        help="prepared with the GPT-NeoX-20B tokenizer (Pythia, Mamba, RWKV)")
    parser.add_argument("--families", default=",".join(FAMILY_MODULES))
    parser.add_argument("--sizes", default="0.5B")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                        help="a named set of training flags, e.g. mb2=\"--micro_batch_size 2 --compile\"")
    parser.add_argument("--naive", action="store_true",
                        help="also time each family's stock implementation (0.5B shapes) for the speed-up")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    variants = [v.split("=", 1) if "=" in v else (v, "") for v in args.variant] or [("plan", None)]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for size in [s for s in args.sizes.split(",") if s in SIZES]:
            for family in args.families.split(","):
                naive = None
                for name, flags in variants:
                    flags = " ".join(plan_flags(family, size)) if flags is None else flags
                    rows.append(run_one(family, size, name, flags, args, Path(work)))
                    if args.naive and size == "0.5B" and args.preset == "paper":
                        naive = naive or naive_reference(family, args.steps)
                        rows[-1].update(naive)
                        reference = naive.get("naive", {}).get("tokens_per_s")
                        if reference and rows[-1].get("tokens_per_s"):
                            rows[-1].update(naive_tokens_per_s=reference,
                                            speedup_vs_naive=rows[-1]["tokens_per_s"] / reference)
                    print(" ".join(f"{k}={cell(rows[-1].get(k))}" for k in COLUMNS), flush=True)
    device = next((r["device"] for r in rows if r.get("device")), "unknown")
    output = args.output or ROOT / "docs" / "benchmarks" / f"training_step_{device.replace(' ', '_')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"device": device, "date": time.strftime("%Y-%m-%d"), "args": vars(args) | {
        "output": str(output)}, "rows": rows}, indent=2, default=str) + "\n")
    print("| " + " | ".join(COLUMNS) + " |")
    for row in rows:
        print("| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

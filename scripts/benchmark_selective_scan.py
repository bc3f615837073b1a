#!/usr/bin/env python3
"""The selective scan's kernels at each Mamba size's plan: mamba-ssm's and the harness's (needs CUDA, mamba-ssm).

    python scripts/benchmark_selective_scan.py [--sizes 0.5B,1.5B,3B] [--rounds 2] [--tilings 8x8x2,...]
        [--energy_window 2] [--output FILE]

The selective scan takes over half of a Mamba step (docs/performance.md). This times mamba-ssm's kernels
(the stock model's) and the harness's (mamba/scan_kernel.py), forward and backward, with the gate z, softplus
on delta, D and a delta bias as Mamba calls them, on the plan's micro-batch, 2 x d_model channels, 8192 steps
and 16 states. The harness's run on Mamba's B and C (one pair per sequence), once per --tilings entry
(steps per thread x channels per cluster x states per sum [x threads per block] [/ threads per forward block];
default: the shipped tiling). mamba-ssm's run with B and C four ways:
- one (N, L) pair per sequence, read by every channel: Mamba's selective scan. The kernels give each channel a
  thread block of its own, so each block reads all of B and C, and in the backward adds its share of their
  gradients into float32 buffers with one atomic add per channel, state and step;
- 8 pairs per sequence, each shared by an eighth of the channels: as many reads and atomic adds, over 8 times
  as many addresses (less contention);
- one pair per channel: as many reads and atomic adds again, none shared (nothing for the cache to reuse);
- constant per channel: neither the per-step reads of B and C nor the per-step atomic adds.
Last, the whole mixer after its input projection (conv, projections, scan, gate, output projection), forward
and backward under bf16 autocast: the harness's fused function against mamba-ssm's mamba_inner_fn.
Each timing is the median of --reps calls timed with CUDA events, after a warm-up; every round repeats all.
Each scan kernel's energy per call comes from the GPU's energy counter (NVML) over back-to-back calls filling
about --energy_window seconds. Where a training step runs at the card's power limit its speed follows its
energy, so a kernel's energy per call says what the kernel can give the step there, beside its time (a shorter
kernel at the same energy gives nothing; a thriftier but slower one may leave the limit: docs/performance.md,
changes 37-39).
Prints one line per timing and writes them as JSON after every size (default
docs/benchmarks/selective_scan_<gpu>.json).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from efficientllm_metrics import open_nvml, write_json_atomic  # noqa: E402
from mamba.model import D_STATE, EXPAND, FAMILY, INSTALL_HINT, SHAPES, MambaMixer  # noqa: E402
from mamba.scan_kernel import TILING, ScanTiling, scan_backward, scan_forward  # noqa: E402
from mamba.selective_scan import mixer_fused, mixer_mamba_ssm  # noqa: E402

SEQ_LEN = 8192
#: B and C: how many (N, L) pairs per sequence (None: constant per channel; 0: one per channel).
VARIANTS = {"one per sequence": 1, "8 per sequence": 8, "one per channel": 0, "constant": None}


def median_ms(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def next_reading(read: Callable[[], float], timeout_s: float = 1.0) -> float:
    """The counter's first value after it next moves. NVML's energy counter is updated in steps, not
    continuously, so a window opened and closed on its updates misses no energy and adds at most one update
    interval's idle energy at the end."""
    first, deadline = read(), time.monotonic() + timeout_s
    while (value := read()) == first:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the GPU's energy counter did not move in {timeout_s} s")
    return value


def joules_per_call(fn: Callable[[], object], calls: int, read_energy_j: Callable[[], float],
                    synchronize: Callable[[], None] = torch.cuda.synchronize) -> float:
    """Energy per call of ``fn`` over ``calls`` back-to-back calls, from a cumulative counter in joules."""
    synchronize()
    start = next_reading(read_energy_j)
    for _ in range(calls):
        fn()
    synchronize()
    return (next_reading(read_energy_j) - start) / calls


class KernelMeter:
    """Median milliseconds, and millijoules per call where NVML reads the GPU's energy counter."""

    def __init__(self, reps: int, energy_window_s: float):
        self.reps, self.energy_window_s = reps, energy_window_s
        nvml, self.energy_unmeasured = open_nvml([torch.cuda.current_device()])
        self.read_energy_j = None
        if nvml:
            try:
                nvml.energy_j(0)
                self.read_energy_j = lambda: nvml.energy_j(0)
            except Exception as error:  # NVML without the counter (GPUs before Volta): time only
                self.energy_unmeasured = f"the GPU's energy counter is unreadable ({type(error).__name__}: {error})"

    def measure(self, fn: Callable[[], object]) -> tuple[float, float | None]:
        milliseconds = median_ms(fn, self.reps)
        if self.read_energy_j is None:
            return milliseconds, None
        calls = max(self.reps, math.ceil(self.energy_window_s * 1000 / milliseconds))
        return milliseconds, 1000 * joules_per_call(fn, calls, self.read_energy_j)


def scan_inputs(batch: int, channels: int, pairs: int | None) -> dict[str, torch.Tensor]:
    """Random inputs in the kernels' layouts (bf16 activations, float32 parameters), with ``pairs`` (B, C) pairs
    per sequence (``VARIANTS``)."""
    def bf16(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    if pairs is None:
        B, C = (torch.randn(channels, D_STATE, device="cuda") for _ in range(2))
    else:
        B, C = (bf16(batch, pairs or channels, D_STATE, SEQ_LEN) for _ in range(2))
    return {"u": bf16(batch, channels, SEQ_LEN), "delta": bf16(batch, channels, SEQ_LEN) * 0.5 - 1.0,
            "A": -torch.rand(channels, D_STATE, device="cuda") * D_STATE - 0.5, "B": B, "C": C,
            "D": torch.randn(channels, device="cuda"), "z": bf16(batch, channels, SEQ_LEN),
            "delta_bias": torch.randn(channels, device="cuda") * 0.3, "dout": bf16(batch, channels, SEQ_LEN)}


Measurement = tuple[float, float | None]  # ms, mJ per call (None: unmeasured)


def time_scan(selective_scan_cuda, batch: int, channels: int, pairs: int | None,
              meter: KernelMeter) -> tuple[Measurement, Measurement]:
    """Forward and backward of mamba-ssm's extension module ``selective_scan_cuda``."""
    x = scan_inputs(batch, channels, pairs)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"])
    out, states, _ = selective_scan_cuda.fwd(*args, True)
    forward = meter.measure(lambda: selective_scan_cuda.fwd(*args, True))
    # The backward as mamba_inner_fn calls it: dz written, out * silu(z) recomputed.
    backward = meter.measure(lambda: selective_scan_cuda.bwd(*args, x["dout"], states, out, None, True, True))
    return forward, backward


def time_harness_scan(batch: int, channels: int, tiling: ScanTiling,
                      meter: KernelMeter) -> tuple[Measurement, Measurement]:
    """Forward and backward of the harness's kernels, B and C one pair per sequence."""
    x = scan_inputs(batch, channels, 1)
    args = (x["u"], x["delta"], x["A"], x["B"][:, 0], x["C"][:, 0], x["D"], x["z"], x["delta_bias"])
    out, _, states = scan_forward(*args, tiling=tiling)
    dz = torch.empty_like(x["z"])
    forward = meter.measure(lambda: scan_forward(*args, tiling=tiling))
    backward = meter.measure(lambda: scan_backward(*args, x["dout"], states, out, dz, tiling=tiling))
    return forward, backward


def time_all(selective_scan_cuda, batch: int, channels: int, tilings: list[ScanTiling], meter: KernelMeter):
    """(kernel, B and C, (forward, backward)): mamba-ssm's four layouts, then the harness's tilings."""
    for variant, pairs in VARIANTS.items():
        yield "mamba-ssm", variant, time_scan(selective_scan_cuda, batch, channels, pairs, meter)
    for tiling in tilings:
        yield f"harness {tiling_label(tiling)}", "one per sequence", time_harness_scan(batch, channels, tiling, meter)


def time_mixers(size: str, reps: int) -> dict[str, float]:
    """Median ms of one Mamba mixer's forward and backward at the plan's shape, on the harness's fused function
    and on mamba-ssm's mamba_inner_fn, from the same input projection's output."""
    batch, d_model = FAMILY.gpu_plan[size]["micro_batch_size"], SHAPES["paper"][size]["d_model"]
    mixer = MambaMixer(d_model, fused=True).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        rows = torch.randn(batch * SEQ_LEN, d_model, device="cuda")
        projected = (mixer.in_proj.weight @ rows.t()).detach()  # (2E, B*L), the input projection's layout
    weights = (mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight,
               mixer.out_proj.weight)
    grad = torch.randn(batch, SEQ_LEN, d_model, device="cuda", dtype=torch.bfloat16)

    def forward_backward(mixer_function) -> None:
        xz = projected.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = mixer_function(xz.view(-1, batch, SEQ_LEN).transpose(0, 1), *weights, -torch.exp(mixer.A_log.float()),
                                 mixer.D.float(), mixer.dt_proj.bias.float())
        out.backward(grad)

    return {name: median_ms(lambda function=function: forward_backward(function), reps)
            for name, function in (("harness", mixer_fused), ("mamba_inner_fn", mixer_mamba_ssm))}


def parse_tiling(text: str) -> ScanTiling:
    """STEPSxCLUSTERxSTATES, with xTHREADS after it where the block is not the shipped tiling's size, and
    /FORWARD_THREADS where the forward splits a chunk among another number of threads than the backward."""
    backward, *forward = text.split("/")
    steps, cluster, states, *threads = (int(part) for part in backward.split("x"))
    if len(threads) > 1 or len(forward) > 1:
        raise ValueError(text)
    return ScanTiling(threads=threads[0] if threads else TILING.threads, steps_per_thread=steps, cluster=cluster,
                      states_per_sum=states, forward_threads=int(forward[0]) if forward else None)


def tiling_label(tiling: ScanTiling) -> str:
    label = f"{tiling.steps_per_thread}x{tiling.cluster}x{tiling.states_per_sum}"
    if tiling.threads != TILING.threads:
        label += f"x{tiling.threads}"
    return label if tiling.forward_block == tiling.threads else f"{label}/{tiling.forward_block}"


def energy_text(millijoules: float | None) -> str:
    return "(energy unmeasured)" if millijoules is None else f"{millijoules:6.1f} mJ"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5B,1.5B,3B", help="comma-separated Mamba sizes (paper shapes)")
    parser.add_argument("--rounds", type=int, default=2, help="repeat every timing, for the spread")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per median")
    parser.add_argument("--energy_window", type=float, default=2.0,
                        help="seconds of back-to-back calls over which each scan kernel's energy per call is read")
    parser.add_argument("--tilings", default=tiling_label(TILING),
                        help="the harness kernel's tilings to time, comma-separated: "
                             "STEPSxCLUSTERxSTATES[xTHREADS][/FORWARD_THREADS]")
    parser.add_argument("--output", type=Path, help="JSON file (default: docs/benchmarks/selective_scan_<gpu>.json)")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    try:
        tilings = [parse_tiling(text) for text in args.tilings.split(",")]
    except ValueError as error:
        parser.error(f"--tilings {args.tilings!r}: {error}; expected STEPSxCLUSTERxSTATES[xTHREADS][/FORWARD_THREADS] "
                     "entries such as 8x8x2, 8x4x2x64 or 8x4x2/64")
    if unknown := [size for size in sizes if size not in FAMILY.gpu_plan]:
        parser.error(f"--sizes: {', '.join(unknown)} not among {', '.join(FAMILY.gpu_plan)}")
    if not torch.cuda.is_available():
        print("benchmark_selective_scan.py needs a CUDA GPU", file=sys.stderr)
        return 1
    try:
        import selective_scan_cuda  # mamba-ssm's extension
    except ImportError as error:
        print(f"benchmark_selective_scan.py times mamba-ssm's kernels, which are not importable ({error}): "
              f"{INSTALL_HINT}", file=sys.stderr)
        return 1
    gpu = torch.cuda.get_device_name()
    meter = KernelMeter(args.reps, args.energy_window)
    print(f"{gpu}, torch {torch.__version__}" + (f"; energy not measured: {meter.energy_unmeasured}"
                                                  if meter.energy_unmeasured else ""))
    output = args.output or ROOT / "docs" / "benchmarks" / f"selective_scan_{gpu.replace(' ', '_')}.json"
    header = {"device": gpu, "torch": torch.__version__, "seq_len": SEQ_LEN, "d_state": D_STATE,
              "energy_window_s": args.energy_window, "energy_unmeasured": meter.energy_unmeasured}
    rows = []
    for round_index in range(args.rounds):
        for size in sizes:
            batch = FAMILY.gpu_plan[size]["micro_batch_size"]
            channels = EXPAND * SHAPES["paper"][size]["d_model"]
            for kernel, variant, (forward, backward) in time_all(selective_scan_cuda, batch, channels, tilings,
                                                                 meter):
                row = {"round": round_index, "size": size, "batch": batch, "channels": channels, "kernel": kernel,
                       "B_and_C": variant}
                for name, (milliseconds, millijoules) in (("forward", forward), ("backward", backward)):
                    row[f"{name}_ms"] = round(milliseconds, 3)
                    row[f"{name}_mJ"] = None if millijoules is None else round(millijoules, 2)
                rows.append(row)
                print(f"round {round_index} {size:>4} batch {batch} x {channels} channels, {kernel:>15}, B and C "
                      f"{variant:>16}: forward {forward[0]:6.3f} ms {energy_text(forward[1])}, backward "
                      f"{backward[0]:6.3f} ms {energy_text(backward[1])}", flush=True)
                torch.cuda.empty_cache()
            for kernel, milliseconds in time_mixers(size, args.reps).items():
                rows.append({"round": round_index, "size": size, "batch": batch, "channels": channels,
                             "kernel": f"mixer, {kernel}", "forward_backward_ms": round(milliseconds, 3)})
                print(f"round {round_index} {size:>4} batch {batch} x {channels} channels, the mixer on {kernel:>14}: "
                      f"forward and backward {milliseconds:6.3f} ms", flush=True)
            torch.cuda.empty_cache()
            write_json_atomic(output, {**header, "rows": rows})  # after every size: a stopped run keeps its rows
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a training step spends GPU time: kernel time and launches per step, and the kernels that take it; the
energy and clock of timed steps; and what a process spends compiling Triton kernels."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from efficientllm_metrics import METRICS, Monitor, Run


def speed(times: list[float], tokens_per_step: int) -> dict:
    """Median step time and its tokens/s, the spread of the steps, peak allocated memory and the GPU's name."""
    step_s = statistics.median(times)
    return {"tokens_per_s": tokens_per_step / step_s, "s_per_step": step_s, "step_s_spread": [min(times), max(times)],
            "peak_alloc_gb": torch.cuda.max_memory_allocated() / 1e9, "device": torch.cuda.get_device_name()}


def time_steps(step: Callable[[], None], steps: int) -> list[float]:
    """Wall seconds of each of ``steps`` calls of ``step``, the GPU synchronized after each."""
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


#: Measured over the same window as tokens/s: what a GPU at its power cap trades speed for.
ENERGY_METRICS = ("energy_j_per_token", "aec_w", "sm_clock_mean_mhz")


def measured_steps(step: Callable[[], None], steps: int, tokens_per_step: int,
                   cuda_indices: list[int]) -> tuple[list[float], dict]:
    """Wall seconds of each of ``steps`` calls of ``step``, and ``ENERGY_METRICS`` over all but the first
    (compilation, allocation), measured as a training run measures its window: each None, with its reason in
    ``energy_reasons``, where it cannot be (a CPU run, no NVML)."""
    monitor = Monitor(cuda_indices, warmup_iterations=1)
    monitor.start()
    times = []
    try:
        for _ in range(steps):
            started = time.perf_counter()
            step()
            monitor.iteration_done(tokens_per_step)  # synchronizes the devices
            times.append(time.perf_counter() - started)
    finally:
        measurement = monitor.stop()  # ends the sampler thread, also after a failed step (out of memory)
    run = Run([measurement], params=0, flops_per_token=None, validation=None)
    metrics = {name: METRICS[name](run) for name in ENERGY_METRICS}
    return times, {**{name: metric.value for name, metric in metrics.items()},
                   "energy_reasons": {name: metric.note for name, metric in metrics.items() if metric.value is None}}


#: The profiler's label of each profiled step, so that kernels can be told apart by step.
STEP_LABEL = "profiled_step"


def profile_steps(step: Callable[[], None], steps: int, top: int, step_s: float, trace: str | None = None) -> dict:
    """Run ``step`` ``steps`` times under torch.profiler; per step: kernel seconds, the share of ``step_s`` (the
    step's wall time, timed without the profiler) they fill, kernel launches, and the ``top`` kernels by their
    own GPU time. A low busy share means the host, not the GPU, sets the speed; ``steps`` says, step by step,
    where the GPU waited (``step_idle``), which finds the slow steps of a run whose steps are not all alike.
    ``trace``: also write the profile there as a Chrome trace (gzipped if it ends in .gz), host and GPU side by
    side, for Perfetto or chrome://tracing."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            with record_function(STEP_LABEL):
                step()
                if cuda:
                    torch.cuda.synchronize()  # the step's kernels end inside its range
    if trace:
        profiler.export_chrome_trace(trace)
    events = profiler.events()
    kernels = gpu_kernels(events)
    by_name: dict[str, float] = defaultdict(float)
    for event in kernels:
        by_name[event.name] += event.device_time / 1e6 / steps
    total = sum(by_name.values())
    ranked = sorted(by_name.items(), key=lambda item: -item[1])[:top]
    ranges = [(event.time_range.start, event.time_range.end) for event in events
              if event.name == STEP_LABEL and event.device_type == torch.autograd.DeviceType.CPU]
    spans = [(event.time_range.start, event.time_range.end, event.name) for event in kernels]
    return {"gpu_kernel_s_per_step": total, "gpu_busy": total / step_s, "kernels_per_step": round(len(kernels) / steps),
            "top_kernels": [{"name": name[:120], "s_per_step": seconds, "share": seconds / total}
                            for name, seconds in ranked],
            "steps": step_idle(sorted(ranges), spans)}


def gpu_kernels(events: list) -> list:
    """The profiler's GPU events that are kernels (and copies), not the spans on the GPU's timeline that name
    a host range around them: this module's step label, the optimizers' ``Optimizer.step#AdamW.step``. Counted
    as kernels, those would add their length to the kernel seconds a second time."""
    return [event for event in events
            if event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation]


def step_idle(step_ranges: list[tuple[float, float]], kernels: list[tuple[float, float, str]]) -> list[dict]:
    """Where the GPU waited in each step. ``step_ranges``: each step's (start, end); ``kernels``: each kernel's
    (start, end, name); microseconds on the profiler's one clock. A kernel belongs to the step it starts in. Per
    step: its wall seconds, the seconds at least one kernel ran (kernels overlapping on several streams count
    once), and its longest stretch without a kernel, named by the kernel that ended it ("step end" when
    nothing did)."""
    rows = []
    for start, end in step_ranges:
        inside = sorted(kernel for kernel in kernels if start <= kernel[0] < end)
        busy, longest, before, covered = 0.0, 0.0, "step end", start
        for kernel_start, kernel_end, name in inside:
            if kernel_start - covered > longest:
                longest, before = kernel_start - covered, name
            busy += max(0.0, kernel_end - max(kernel_start, covered))
            covered = max(covered, kernel_end)
        if end - covered > longest:
            longest, before = end - covered, "step end"
        rows.append({"wall_s": (end - start) / 1e6, "gpu_busy_s": busy / 1e6, "longest_idle_s": longest / 1e6,
                     "idle_before": before[:120]})
    return rows


def triton_compilation_knobs():
    """``triton.knobs.compilation``, or None without Triton or in a Triton without its listener."""
    try:
        from triton import knobs
    except ImportError:
        return None
    compilation = getattr(knobs, "compilation", None)
    return compilation if hasattr(compilation, "listener") else None


class TritonCompileLog:
    """The Triton kernels compiled in this process and their compile seconds, heard through Triton's
    compilation listener (``triton.knobs.compilation.listener``). Library kernels (fla, mamba-ssm) compile here
    at their first launch, one after another, which is what makes a cold first step slow; inductor compiles
    its regions in worker processes. The seconds per kernel name say which kernels a cold first step compiled
    itself (those a warm-up helper was meant to leave in the disk cache, or others). Without Triton, or a
    Triton without the listener, it hears nothing and ``stop()`` says so with an empty dict."""

    def __init__(self) -> None:
        self.compiled: list[tuple[str, float]] = []  # (kernel name, seconds), one per compilation
        self._compilation = self._previous = None

    def start(self) -> TritonCompileLog:
        compilation = triton_compilation_knobs()
        if compilation is None:
            return self
        self._compilation, self._previous = compilation, compilation.listener
        compilation.listener = self._heard
        return self

    def _heard(self, *, times, cache_hit: bool, **details) -> None:
        if self._previous is not None:  # a listener set before ours still hears everything
            self._previous(times=times, cache_hit=cache_hit, **details)
        if not cache_hit:
            name = (details.get("metadata") or {}).get("name", "unnamed")
            self.compiled.append((name, times.total / 1e6))  # microseconds

    def stop(self) -> dict:
        """{"triton_compilations": N, "triton_compile_s": S, "triton_compiled_kernels": {name: seconds, longest
        first}} since ``start()``, or {} where nothing listened. Gives the listener back; later calls return {}."""
        if self._compilation is None:
            return {}
        self._compilation.listener = self._previous
        self._compilation = None
        by_name: dict[str, float] = {}
        for name, seconds in self.compiled:
            by_name[name] = by_name.get(name, 0.0) + seconds
        by_time = sorted(by_name.items(), key=lambda item: -item[1])
        return {"triton_compilations": len(self.compiled), "triton_compile_s": sum(s for _, s in self.compiled),
                "triton_compiled_kernels": {name: round(seconds, 3) for name, seconds in by_time}}

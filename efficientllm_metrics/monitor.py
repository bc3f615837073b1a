"""The measured window: warm-up exclusion, iteration timing, energy counters, allocator peaks."""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from efficientllm_metrics.atomic import atomic_file
from efficientllm_metrics.backend import GpuBackend, open_nvml
from efficientllm_metrics.formulas import integrate_segments, time_average
from efficientllm_metrics.sampler import HOST, Sampler

TIMELINE_FILE = "efficientllm_timeline.csv"


def default_warmup_iterations(planned_iterations: int, fraction: float = 0.1, minimum: int = 3) -> int:
    """The first 10 % of iterations, at least 3: compilation, autotuning and allocator growth."""
    return max(minimum, math.ceil(fraction * planned_iterations))


@dataclass
class GpuWindow:
    """One GPU's readings over the window. Any None has its reason in ``reasons``."""

    name: str
    uuid: str
    memory_mean_bytes: float | None = None
    memory_peak_bytes: float | None = None
    power_mean_w: float | None = None
    sm_clock_mean_mhz: float | None = None
    energy_counter_j: float | None = None
    energy_integral_j: float | None = None
    reasons: dict[str, str] = field(default_factory=dict)


@dataclass
class RankMeasurement:
    """What one process measured; rank 0 combines these across processes."""

    rank: int
    window_s: float | None
    energy_window_s: float | None
    iteration_s: list[float]
    tokens: int
    warmup_iterations: int
    gpus: list[GpuWindow]
    host_memory_mean_bytes: float | None
    allocator_peak_allocated_bytes: float | None
    allocator_peak_reserved_bytes: float | None
    sample_count: int
    sampler_interval_s: float
    sampler_health: dict
    backend: dict
    no_window_reason: str | None = None


class _CudaAllocator:
    """The torch caching allocator's peaks for this process's devices (reset at the window's start)."""

    def __init__(self, cuda_indices: list[int]):
        self.indices = cuda_indices

    def synchronize(self) -> None:
        import torch

        for index in self.indices:
            torch.cuda.synchronize(index)

    def reset_peaks(self) -> None:
        import torch

        for index in self.indices:
            torch.cuda.reset_peak_memory_stats(index)

    def peaks(self) -> tuple[float | None, float | None]:
        if not self.indices:
            return None, None
        import torch

        allocated = max(torch.cuda.max_memory_allocated(i) for i in self.indices)
        reserved = max(torch.cuda.max_memory_reserved(i) for i in self.indices)
        return float(allocated), float(reserved)


class Monitor:
    """Measures a training run's window, after ``warmup_iterations`` optimizer iterations.

    Call ``start()`` right before the first iteration, ``iteration_done(tokens)`` after each
    optimizer step (it synchronizes the devices, so asynchronous kernels are inside the
    iteration they belong to), and ``stop()`` right after the last one, before evaluation.
    Work between iterations that is not training (periodic evaluation, checkpoints) goes
    between ``pause()`` and ``resume()``: the window is then several segments, and time,
    energy and memory averages cover the segments only.
    """

    def __init__(
        self,
        cuda_indices: list[int],
        warmup_iterations: int,
        sample_interval_s: float = 0.1,
        rank: int = 0,
        backend: GpuBackend | None = None,
        backend_reason: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if warmup_iterations < 0:
            raise ValueError(f"warm-up iterations must be >= 0, got {warmup_iterations}")
        if backend is None and backend_reason is None:
            backend, backend_reason = open_nvml(cuda_indices)
        self.backend = backend
        self.backend_reason = backend_reason
        self.rank = rank
        self.warmup_iterations = warmup_iterations
        self.clock = clock
        self.sampler = Sampler(backend, sample_interval_s, clock)
        self._allocator = _CudaAllocator(cuda_indices)
        self._iterations = 0
        self._last_boundary: float | None = None
        self._in_window = False
        self._paused = False
        self._segment_start: float | None = None
        self._segments: list[tuple[float, float]] = []
        self._energy_start: tuple[float, list[float | None]] | None = None
        self._energy_seconds = 0.0
        self._energy_j: list[float | None] | None = None
        self._iteration_s: list[float] = []
        self._tokens = 0
        self._measurement: RankMeasurement | None = None

    def start(self, thread: bool = True) -> None:
        """Begin sampling and mark the start of the first iteration."""
        self.sampler.sample_once()  # before the thread starts: one sampler at a time
        if thread:
            self.sampler.start()
        self._allocator.synchronize()
        self._last_boundary = self.clock()
        if self.warmup_iterations == 0:
            self._begin_window()

    def iteration_done(self, tokens: int) -> None:
        """Close one optimizer iteration that processed ``tokens`` tokens on this rank."""
        if self._last_boundary is None or self._paused:
            raise RuntimeError("iteration_done() needs a started, unpaused Monitor")
        self._allocator.synchronize()  # a sync point: kernels of this iteration finish here
        now = self.clock()
        self._iterations += 1
        if self._in_window:
            self._iteration_s.append(now - self._last_boundary)
            self._tokens += tokens
        self._last_boundary = now
        if self._iterations == self.warmup_iterations:
            self._begin_window()

    def pause(self) -> None:
        """Leave the window (before evaluation or a checkpoint); idempotent."""
        if self._paused or self._last_boundary is None:
            return
        self._paused = True
        if self._in_window:
            self._close_segment()

    def resume(self) -> None:
        """Re-enter the window; the next iteration is timed from here."""
        if not self._paused:
            return
        self._paused = False
        self._allocator.synchronize()
        if self._in_window:
            self._open_segment()
        self._last_boundary = self.clock()

    def _read_energy(self) -> list[float | None]:
        readings: list[float | None] = []
        for gpu in range(len(self.backend.gpus) if self.backend else 0):
            try:
                readings.append(self.backend.energy_j(gpu))
            except Exception:  # unsupported counter: the integral of sampled power stands in
                readings.append(None)
        return readings

    def _begin_window(self) -> None:
        self._allocator.reset_peaks()
        self._in_window = True
        self._energy_j = [0.0 for _ in self._gpu_infos()]
        self._open_segment()

    def _open_segment(self) -> None:
        self._energy_start = (self.clock(), self._read_energy())
        self._segment_start = self.clock()
        self._last_boundary = self._segment_start

    def _close_segment(self) -> None:
        """End the segment at the last iteration boundary; add the energy counters' delta."""
        read_at, readings = self.clock(), self._read_energy()
        if self._last_boundary > self._segment_start:  # a pause right after a resume adds no training time
            self._segments.append((self._segment_start, self._last_boundary))
        self._energy_seconds += read_at - self._energy_start[0]
        for gpu, (begin, end) in enumerate(zip(self._energy_start[1], readings)):
            unsupported = begin is None or end is None or self._energy_j[gpu] is None
            self._energy_j[gpu] = None if unsupported else self._energy_j[gpu] + end - begin

    def stop(self) -> RankMeasurement:
        """End the window at the last iteration's boundary and stop sampling (idempotent)."""
        if self._measurement is None:
            self._measurement = self._stop()
        return self._measurement

    def _stop(self) -> RankMeasurement:
        if self._in_window and not self._paused:
            self._close_segment()
        self.sampler.stop()
        allocated, reserved = self._allocator.peaks()
        health = asdict(self.sampler.health)
        backend = self.backend.provenance() if self.backend else {"unavailable": self.backend_reason}
        base = dict(
            rank=self.rank,
            iteration_s=self._iteration_s,
            tokens=self._tokens,
            warmup_iterations=self.warmup_iterations,
            allocator_peak_allocated_bytes=allocated,
            allocator_peak_reserved_bytes=reserved,
            sample_count=len(self.sampler.samples),
            sampler_interval_s=self.sampler.interval_s,
            sampler_health=health,
            backend=backend,
        )
        if not self._iteration_s:
            reason = f"no iteration after the {self.warmup_iterations} warm-up iterations ({self._iterations} ran)"
            gpus = [GpuWindow(g.name, g.uuid, reasons={"all": reason}) for g in self._gpu_infos()]
            return RankMeasurement(window_s=None, energy_window_s=None, gpus=gpus, host_memory_mean_bytes=None,
                                   no_window_reason=reason, **base)
        gpus = [self._gpu_window(i) for i in range(len(self._gpu_infos()))]
        host = None
        if self.backend is None:
            host = self._window_value(HOST, "memory_used_bytes", time_average, {}, "host_memory")
        window_s = sum(end - start for start, end in self._segments)
        return RankMeasurement(window_s=window_s, energy_window_s=self._energy_seconds,
                               gpus=gpus, host_memory_mean_bytes=host, **base)

    def latest_readings(self, fields: tuple[str, ...] = ("memory_used_bytes", "power_w")) -> dict[str, float]:
        """The newest sample of each field for this process's first GPU (the host on a CPU run)."""
        device = 0 if self.backend and self.backend.gpus else HOST
        latest: dict[str, float] = {}
        for sample in reversed(self.sampler.samples[-10 * len(fields):]):
            if sample.gpu == device and sample.field in fields:
                latest.setdefault(sample.field, sample.value)
        return latest

    def write_timeline(self, folder: str | os.PathLike) -> Path:
        """Every raw sample as CSV (time_s, rank, gpu UUID or 'host', field, value) in ``folder``: rank 0 writes
        efficientllm_timeline.csv, rank N efficientllm_timeline_rankN.csv."""
        name = TIMELINE_FILE if self.rank == 0 else TIMELINE_FILE.replace(".csv", f"_rank{self.rank}.csv")
        uuids = [gpu.uuid for gpu in self._gpu_infos()]
        path = Path(folder) / name
        with atomic_file(path, newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["time_s", "rank", "gpu", "field", "value"])
            for s in self.sampler.samples:
                writer.writerow([f"{s.time_s:.6f}", self.rank, uuids[s.gpu] if s.gpu >= 0 else "host", s.field,
                                 s.value])
        return path

    def _gpu_infos(self):
        return self.backend.gpus if self.backend else []

    def _window_value(self, gpu, name, reduce, reasons, key):
        times, values = self.sampler.series(gpu, name)
        # Ten missed ticks (at least 1 s) mean the sampler was not running, not a slow tick.
        max_gap_s = max(10 * self.sampler.interval_s, 1.0)
        try:
            return reduce(times, values, self._segments, max_gap_s)
        except ValueError as error:
            reasons[key] = f"{name}: {error}"
            return None

    def _gpu_window(self, gpu: int) -> GpuWindow:
        info = self.backend.gpus[gpu]
        window = GpuWindow(info.name, info.uuid)
        window.memory_mean_bytes = self._window_value(gpu, "memory_used_bytes", time_average,
                                                      window.reasons, "memory_mean_bytes")
        times, values = self.sampler.series(gpu, "memory_used_bytes")
        inside = [v for t, v in zip(times, values) if any(a <= t <= b for a, b in self._segments)]
        window.memory_peak_bytes = max(inside) if inside else None
        if window.memory_peak_bytes is None:
            window.reasons["memory_peak_bytes"] = "no memory sample inside the window"
        window.energy_integral_j = self._window_value(gpu, "power_w", integrate_segments,
                                                      window.reasons, "energy_integral_j")
        if window.energy_integral_j is not None:  # the mean is the same integral over the window's length
            window.power_mean_w = window.energy_integral_j / sum(end - start for start, end in self._segments)
        else:
            window.reasons["power_mean_w"] = window.reasons["energy_integral_j"]
        window.sm_clock_mean_mhz = self._window_value(gpu, "sm_clock_mhz", time_average, window.reasons,
                                                      "sm_clock_mean_mhz")
        window.energy_counter_j = self._energy_j[gpu]
        if window.energy_counter_j is None:
            window.reasons["energy_counter_j"] = "NVML total-energy counter unsupported on this GPU"
        elif window.energy_counter_j <= 0:  # a working GPU draws power: the counter has not updated yet
            window.energy_counter_j = None
            window.reasons["energy_counter_j"] = (f"NVML total-energy counter did not advance over the "
                                                  f"{self._energy_seconds:.3f} s window, shorter than its update "
                                                  "period")
        return window


def gather_measurements(local: RankMeasurement) -> list[RankMeasurement] | None:
    """All ranks' measurements on rank 0 (None elsewhere); just ``[local]`` without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [local]
    gathered: list[RankMeasurement] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    return gathered

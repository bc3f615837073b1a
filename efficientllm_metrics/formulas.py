"""The metric math: pure functions of timelines and counts, each unit in its name."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

GB = 1e9  #: AMU and memory figures are in decimal gigabytes (10^9 bytes), not GiB.

#: Dense bf16 tensor-core peak per GPU in FLOP/s, from the vendors' datasheets (without sparsity).
#: Matched against the NVML/torch device name, most specific first.
DENSE_BF16_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("H800", 989.4e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("B200", 2250e12),
)


@dataclass(frozen=True)
class LatencyStats:
    """Seconds per optimizer iteration over the measured window."""

    mean_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    stdev_s: float
    count: int

    @classmethod
    def from_values(cls, seconds: list[float]) -> LatencyStats:
        values = np.asarray(seconds, dtype=float)
        if values.size == 0:
            raise ValueError("no iteration times in the window")
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return cls(float(values.mean()), float(p50), float(p90), float(p99), float(values.std()), int(values.size))


def integrate(
    times_s: list[float], values: list[float], start_s: float, end_s: float, max_gap_s: float = math.inf
) -> float:
    """Trapezoid integral of a sampled signal over [start_s, end_s], linearly interpolated at the ends.

    Raises ValueError when no sample lies within ``max_gap_s`` of some point of the window (the
    sampler had stopped, or the window lies outside the samples): filling such a hole is a guess.
    """
    if end_s <= start_s:
        raise ValueError(f"empty window [{start_s}, {end_s}]")
    t = np.asarray(times_s, dtype=float)
    v = np.asarray(values, dtype=float)
    if t.size == 0:
        raise ValueError("no samples")
    inside = (t > start_s) & (t < end_s)
    before, after = t[t <= start_s], t[t >= end_s]
    # The samples that bound the window: the last one at or before it, those inside, the first after it.
    support = np.concatenate((before[-1:], t[inside], after[:1]))
    edges = np.concatenate(([min(start_s, support[0])], support, [max(end_s, support[-1])]))
    widest = float(np.diff(edges).max())
    if widest > max_gap_s:
        raise ValueError(f"a {widest:.3f} s stretch of the window has no sample (limit {max_gap_s:.3f} s)")
    grid = np.concatenate(([start_s], t[inside], [end_s]))
    curve = np.interp(grid, t, v)
    return float(np.sum((curve[1:] + curve[:-1]) * np.diff(grid)) / 2.0)


def integrate_segments(times_s: list[float], values: list[float], segments: list[tuple[float, float]],
                       max_gap_s: float = math.inf) -> float:
    """The integral over several disjoint [start, end] segments (a window with pauses)."""
    return sum(integrate(times_s, values, start, end, max_gap_s) for start, end in segments)


def time_average(times_s: list[float], values: list[float], segments: list[tuple[float, float]],
                 max_gap_s: float = math.inf) -> float:
    """(1/T) * integral of the signal over the window's segments: AMU's and AEC's definition."""
    duration = sum(end - start for start, end in segments)
    return integrate_segments(times_s, values, segments, max_gap_s) / duration


def tokens_per_param_per_s(tokens: int, params: int, window_s: float) -> float:
    """TT: tokens of all ranks / parameter count / window seconds."""
    return tokens / params / window_s


def perplexity(mean_loss_nats: float) -> float:
    """exp of the mean validation cross-entropy (nats per token); inf on overflow."""
    return math.exp(mean_loss_nats) if mean_loss_nats < 700 else math.inf


def bits_per_byte(mean_loss_nats: float, tokens: int, utf8_bytes: int) -> float:
    """Total bits over total UTF-8 bytes of the same text: comparable across tokenizers."""
    return mean_loss_nats * tokens / (math.log(2) * utf8_bytes)


def dense_bf16_peak_flops(device_name: str) -> float | None:
    """The datasheet peak for a known GPU, else None."""
    for key, flops in DENSE_BF16_PEAK_FLOPS:
        if key in device_name:
            return flops
    return None


def model_flops_utilization(
    flops_per_token: float, tokens_per_s: float, device_names: list[str]
) -> tuple[float | None, str]:
    """MFU = achieved model FLOP/s over the summed peak of the GPUs; (None, reason) when unknown."""
    if not device_names:
        return None, "no GPU: MFU is defined against a GPU's peak"
    peaks = [dense_bf16_peak_flops(name) for name in device_names]
    unknown = sorted({name for name, peak in zip(device_names, peaks) if peak is None})
    if unknown:
        return None, f"no dense bf16 peak known for {', '.join(unknown)} (add it to DENSE_BF16_PEAK_FLOPS)"
    return flops_per_token * tokens_per_s / sum(peaks), "model FLOPs per token x tokens/s / datasheet dense bf16 peak"

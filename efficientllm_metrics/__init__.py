"""Training-efficiency metrics: a GPU sampler thread, a measured window, the metric math, one results file."""

from efficientllm_metrics.backend import GpuBackend, GpuInfo, NvmlBackend, open_nvml
from efficientllm_metrics.formulas import GB, LatencyStats, bits_per_byte, perplexity
from efficientllm_metrics.monitor import Monitor, RankMeasurement, default_warmup_iterations, gather_measurements
from efficientllm_metrics.results import (
    METRICS,
    RESULTS_FILE,
    SCHEMA_VERSION,
    TIMELINE_FILE,
    Metric,
    Run,
    Validation,
    summarize,
    write_json_atomic,
    write_timeline,
)
from efficientllm_metrics.sampler import Sample, Sampler

__all__ = [
    "GB", "METRICS", "RESULTS_FILE", "SCHEMA_VERSION", "TIMELINE_FILE", "GpuBackend", "GpuInfo", "LatencyStats",
    "Metric", "Monitor", "NvmlBackend", "RankMeasurement", "Run", "Sample", "Sampler", "Validation",
    "bits_per_byte", "default_warmup_iterations", "gather_measurements", "open_nvml", "perplexity", "summarize",
    "write_json_atomic", "write_timeline",
]

"""Training-efficiency metrics: a GPU sampler thread, a measured window, the metric math, one results file."""

from efficientllm_metrics.atomic import NotOurFolder, atomic_file, atomic_folder, recover_folder, write_json_atomic
from efficientllm_metrics.backend import GpuBackend, GpuInfo, NvmlBackend, open_nvml
from efficientllm_metrics.formulas import GB, LatencyStats, bits_per_byte, perplexity
from efficientllm_metrics.monitor import (
    TIMELINE_FILE,
    Monitor,
    RankMeasurement,
    default_warmup_iterations,
    gather_measurements,
)
from efficientllm_metrics.results import (
    METRICS,
    RESULTS_FILE,
    SCHEMA_VERSION,
    Metric,
    ResultsError,
    Run,
    RunHeader,
    Validation,
    completed_steps,
    read_results,
    summarize,
    unmeasured,
)
from efficientllm_metrics.sampler import Sample, Sampler

__all__ = [
    "GB", "METRICS", "RESULTS_FILE", "SCHEMA_VERSION", "TIMELINE_FILE", "GpuBackend", "GpuInfo", "LatencyStats",
    "Metric", "Monitor", "NotOurFolder", "NvmlBackend", "RankMeasurement", "ResultsError", "Run", "RunHeader",
    "Sample", "Sampler", "Validation", "atomic_file", "atomic_folder", "bits_per_byte", "completed_steps",
    "default_warmup_iterations", "gather_measurements", "open_nvml", "perplexity", "read_results", "recover_folder",
    "summarize", "unmeasured", "write_json_atomic",
]

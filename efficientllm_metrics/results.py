"""The results file: its schema (a typed header, then every metric with its provenance), the one function that
combines the ranks' measurements into it, and the one reader every consumer uses."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from efficientllm_metrics.formulas import (
    GB,
    LatencyStats,
    bits_per_byte,
    model_flops_utilization,
    perplexity,
    tokens_per_param_per_s,
)
from efficientllm_metrics.monitor import RankMeasurement

SCHEMA_VERSION = 1
RESULTS_FILE = "efficientllm_metrics.json"


class ResultsError(ValueError):
    """A results file that cannot be read: not JSON, not an object, no status, or a schema this code does
    not know. ``problem`` is the message without the path."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True, kw_only=True)
class RunHeader:
    """What a results file says about its run before the metrics (schema version 1). None: not known, as
    for a run that died before it was built."""

    status: str
    """completed, oom, nan, interrupted or failed."""
    error: str | None = None
    model: str
    display_name: str | None = None
    size: str
    preset: str | None = None
    context: int | None = None
    steps: int = 0
    global_batch: int | None = None
    kernel_path: str | None = None
    device_name: str | None = None
    world_size: int | None = None
    micro_batch_size: int | None = None
    accumulation_steps: int | None = None
    activation_checkpointing: bool | None = None
    checkpoint_blocks: int | None = None
    """Blocks recomputed when only the first few are (None: every block, or none without checkpointing)."""
    compile: bool | None = None
    attention: str | None = None
    cuda_graphs: bool | None = None
    details: dict = field(default_factory=dict)
    """Figures of the outcome (memory at an out-of-memory error), written beside ``error``."""

    def as_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        details = fields.pop("details")
        return {"status": fields.pop("status"), "error": fields.pop("error"), **details, **fields}


def read_results(path: str | os.PathLike) -> dict:
    """The results document of a run folder (or file), checked: a JSON object with a status, in the schema
    this code writes. Raises FileNotFoundError when there is none and ResultsError when it cannot be read."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultsError(path, f"not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise ResultsError(path, "not a JSON object")
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ResultsError(path, f"schema_version {version!r}; this version of the suite reads {SCHEMA_VERSION} "
                                 "(collect it with the version that wrote it)")
    if not isinstance(document.get("status"), str):
        raise ResultsError(path, "no status")
    return document


def completed_steps(document: dict) -> int | None:
    """The steps of a completed run, None for any other outcome."""
    return document.get("steps") if document["status"] == "completed" else None


def unmeasured(header: RunHeader, params: int | None) -> dict:
    """The results document of a run that has no measured window (it failed before or during its start)."""
    return {"schema_version": SCHEMA_VERSION, **header.as_dict(), "params": params,
            "provenance": {"reason": header.error}}


@dataclass(frozen=True)
class Validation:
    """Mean cross-entropy over a fixed set of validation windows, and what it covered."""

    mean_loss_nats: float
    tokens: int
    utf8_bytes: float
    bytes_source: str
    """How ``utf8_bytes`` was found: exact per-token bytes, or an estimate."""


@dataclass(frozen=True)
class Metric:
    """A value with the method behind it, or None with the reason it could not be measured."""

    value: float | None
    note: str


@dataclass
class Run:
    """Everything the metric functions read: all ranks' windows plus model and validation facts."""

    ranks: list[RankMeasurement]
    params: int
    flops_per_token: float | None
    validation: Validation | None
    validation_reason: str = "no validation was run"

    @property
    def gpus(self):
        return [gpu for rank in self.ranks for gpu in rank.gpus]

    @property
    def measured(self) -> bool:
        return all(rank.window_s is not None for rank in self.ranks)

    @property
    def no_window_reason(self) -> str:
        return next(r.no_window_reason for r in self.ranks if r.no_window_reason)

    @property
    def window_s(self) -> float:
        return max(rank.window_s for rank in self.ranks)

    @property
    def tokens(self) -> int:
        return sum(rank.tokens for rank in self.ranks)


def _gpu_values(run: Run, attribute: str) -> tuple[list[float], str | None]:
    values = [getattr(gpu, attribute) for gpu in run.gpus]
    missing = [f"{gpu.uuid}: {gpu.reasons.get(attribute, 'not measured')}" for gpu in run.gpus
               if getattr(gpu, attribute) is None]
    return values, "; ".join(missing) or None


def _amu_gb(run: Run) -> Metric:
    if not run.gpus:
        hosts = [rank.host_memory_mean_bytes for rank in run.ranks]
        if None in hosts:
            return Metric(None, "host memory was not sampled inside the window")
        return Metric(statistics.mean(hosts) / GB, "no GPU: time-average of process RSS, mean over ranks")
    return _over_gpus(run, "memory_mean_bytes", lambda values: statistics.mean(values) / GB,
                      "time-average of NVML device memory used, trapezoid over samples, mean over GPUs")


def _over_gpus(run: Run, attribute: str, combine: Callable[[list[float]], float], note: str) -> Metric:
    """``combine`` of every GPU's ``attribute``; None with the reasons where a GPU lacks it or none is in use."""
    if not run.gpus:
        return Metric(None, "no GPU in use")
    values, missing = _gpu_values(run, attribute)
    return Metric(None, missing) if missing else Metric(combine(values), note)


def _peak_memory_gb(run: Run) -> Metric:
    return _over_gpus(run, "memory_peak_bytes", lambda values: max(values) / GB,
                      "max sampled NVML device memory used, max over GPUs")


def _allocator_peak(attribute: str) -> Callable[[Run], Metric]:
    def metric(run: Run) -> Metric:
        values = [getattr(rank, attribute) for rank in run.ranks]
        if None in values:
            return Metric(None, "no CUDA allocator (CPU run)")
        return Metric(max(values) / GB, f"torch.cuda.max_memory_{attribute.split('_')[2]} since the window's start")

    return metric


def _al_s_per_iter(run: Run) -> Metric:
    return Metric(statistics.mean(run.ranks[0].iteration_s),
                  "mean wall time between synchronized optimizer-step boundaries on rank 0 "
                  "(forward, backward, accumulation, communication, optimizer)")


def _sm_clock_mean_mhz(run: Run) -> Metric:
    return _over_gpus(run, "sm_clock_mean_mhz", statistics.mean, "time-average of the sampled NVML SM clock, mean "
                      "over GPUs (a GPU at its power cap lowers it, and tokens/s with it)")


def _tokens_per_s(run: Run) -> Metric:
    return Metric(run.tokens / run.window_s, "tokens of all ranks / window seconds")


def _tt(run: Run) -> Metric:
    return Metric(tokens_per_param_per_s(run.tokens, run.params, run.window_s),
                  "tokens of all ranks / parameters / window seconds")


def _energy(run: Run) -> tuple[float | None, float | None, str]:
    """(joules, seconds they cover, method) from the counter, else from integrated power."""
    if not run.gpus:
        return None, None, "no GPU in use: power and energy cannot be measured on a CPU run"
    counters, missing_counter = _gpu_values(run, "energy_counter_j")
    if not missing_counter:
        seconds = max(rank.energy_window_s for rank in run.ranks)
        return sum(counters), seconds, "NVML total-energy counter delta, summed over GPUs"
    integrals, missing_integral = _gpu_values(run, "energy_integral_j")
    if not missing_integral:
        return sum(integrals), run.window_s, f"trapezoid integral of sampled power ({missing_counter})"
    return None, None, f"{missing_counter}; {missing_integral}"


def _energy_j(run: Run) -> Metric:
    joules, _, note = _energy(run)
    return Metric(joules, note)


def _aec_w(run: Run) -> Metric:
    joules, seconds, note = _energy(run)
    return Metric(None if joules is None else joules / seconds, f"energy / its window: {note}")


def _energy_j_per_token(run: Run) -> Metric:
    joules, _, note = _energy(run)
    return Metric(None if joules is None else joules / run.tokens, f"energy / tokens of all ranks: {note}")


def _mfu(run: Run) -> Metric:
    if run.flops_per_token is None:
        return Metric(None, "the model gave no FLOP count")
    value, note = model_flops_utilization(run.flops_per_token, run.tokens / run.window_s,
                                          [gpu.name for gpu in run.gpus])
    return Metric(value, note)


def _ppl(run: Run) -> Metric:
    if run.validation is None:
        return Metric(None, run.validation_reason)
    return Metric(perplexity(run.validation.mean_loss_nats),
                  f"exp(mean cross-entropy) over {run.validation.tokens} held-out tokens")


def _bpb(run: Run) -> Metric:
    if run.validation is None:
        return Metric(None, run.validation_reason)
    v = run.validation
    return Metric(bits_per_byte(v.mean_loss_nats, v.tokens, v.utf8_bytes),
                  f"cross-entropy bits over {v.tokens} held-out tokens / {v.utf8_bytes:,.0f} bytes, "
                  f"{v.bytes_source}")


#: The one place metrics are registered: name -> function of the combined run.
METRICS: dict[str, Callable[[Run], Metric]] = {
    "amu_gb": _amu_gb,
    "peak_memory_gb": _peak_memory_gb,
    "allocator_peak_allocated_gb": _allocator_peak("allocator_peak_allocated_bytes"),
    "allocator_peak_reserved_gb": _allocator_peak("allocator_peak_reserved_bytes"),
    "al_s_per_iter": _al_s_per_iter,
    "tokens_per_s": _tokens_per_s,
    "tt_tokens_per_param_s": _tt,
    "energy_j": _energy_j,
    "aec_w": _aec_w,
    "energy_j_per_token": _energy_j_per_token,
    "sm_clock_mean_mhz": _sm_clock_mean_mhz,
    "mfu": _mfu,
}
#: Metrics that need no measured window (evaluation happens after it).
VALIDATION_METRICS: dict[str, Callable[[Run], Metric]] = {"ppl": _ppl, "bpb": _bpb}


def summarize(run: Run, header: RunHeader) -> dict:
    """The results document: ``header`` plus every metric and its provenance."""
    doc = {"schema_version": SCHEMA_VERSION, **header.as_dict(), "params": run.params}
    methods: dict[str, str] = {}
    measured = dict(METRICS) if run.measured else {}
    for name, function in {**measured, **VALIDATION_METRICS}.items():
        metric = function(run)
        doc[name], methods[name] = metric.value, metric.note
    if not run.measured:
        for name in METRICS:
            doc[name], methods[name] = None, run.no_window_reason
    doc["tokens"] = run.tokens
    doc["window_s"] = run.window_s if run.measured else None
    doc["latency"] = _latency(run)
    doc["energy_cross_check"] = _energy_cross_check(run)
    doc["provenance"] = _provenance(run, methods)
    return doc


def _latency(run: Run) -> dict | None:
    if not run.measured:
        return None
    return vars(LatencyStats.from_values(run.ranks[0].iteration_s))


def _energy_cross_check(run: Run) -> dict | None:
    counters, missing_c = _gpu_values(run, "energy_counter_j")
    integrals, missing_i = _gpu_values(run, "energy_integral_j")
    if not run.gpus or missing_c or missing_i:
        return None
    counter, integral = sum(counters), sum(integrals)
    return {"counter_j": counter, "integrated_power_j": integral, "integral_over_counter": integral / counter}


def _provenance(run: Run, methods: dict[str, str]) -> dict:
    first = run.ranks[0]
    return {
        "methods": methods,
        "world_size": len(run.ranks),
        "gpus": [{"name": gpu.name, "uuid": gpu.uuid, "rank": rank.rank} for rank in run.ranks for gpu in rank.gpus],
        "backend": first.backend,
        "sampler_interval_s": first.sampler_interval_s,
        "sample_count": sum(rank.sample_count for rank in run.ranks),
        "sampler_health": {rank.rank: rank.sampler_health for rank in run.ranks},
        "warmup_iterations": first.warmup_iterations,
        "measured_iterations": len(first.iteration_s),
        "gb": "10^9 bytes",
        "combine": "tokens and energy summed over ranks/GPUs; memory mean (AMU) and max (peaks) over GPUs; "
                   "latency from rank 0",
    }

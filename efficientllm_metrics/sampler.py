"""A background thread that samples GPU (or host) readings at a fixed interval."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from efficientllm_metrics.backend import SAMPLED_FIELDS, GpuBackend

HOST = -1  # the ``gpu`` of host samples (process RSS) on machines without a GPU
_MAX_CONSECUTIVE_ERRORS = 3


@dataclass(frozen=True)
class Sample:
    """One reading: ``time_s`` on the monotonic clock, ``gpu`` an index into the backend's GPUs or HOST."""

    time_s: float
    gpu: int
    field: str
    value: float


@dataclass
class SamplerHealth:
    """What went wrong while sampling: counts per field and the first message of each."""

    errors: dict[str, int] = field(default_factory=dict)
    first_error: dict[str, str] = field(default_factory=dict)
    disabled_fields: list[str] = field(default_factory=list)
    stopped_early: str | None = None


def process_rss_bytes() -> float:
    """Resident set size of this process (Linux /proc), for machines without a GPU."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return float(resident_pages * os.sysconf("SC_PAGE_SIZE"))


class Sampler:
    """Samples every field of every GPU each ``interval_s``; never raises into training.

    A field that fails ``_MAX_CONSECUTIVE_ERRORS`` times in a row is disabled; when all are
    disabled the thread stops. Errors are counted in ``health`` for the results' provenance.
    """

    def __init__(
        self,
        backend: GpuBackend | None,
        interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ):
        if interval_s <= 0:
            raise ValueError(f"sample interval must be positive, got {interval_s}")
        self.backend = backend
        self.interval_s = interval_s
        self.clock = clock
        self.samples: list[Sample] = []
        self.health = SamplerHealth()
        self._streak: dict[tuple[int, str], int] = {}
        self._active = self._initial_channels()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _initial_channels(self) -> list[tuple[int, str]]:
        if self.backend is None:
            return [(HOST, "memory_used_bytes")]
        return [(gpu, name) for gpu in range(len(self.backend.gpus)) for name in SAMPLED_FIELDS]

    def _read(self, gpu: int, name: str) -> float:
        if gpu == HOST:
            return process_rss_bytes()
        return self.backend.read(gpu, name)

    def sample_once(self) -> None:
        """Read every active channel once."""
        for channel in list(self._active):
            gpu, name = channel
            try:
                value = self._read(gpu, name)
            except Exception as error:  # an NVML error must never reach the training thread
                self._record_error(channel, error)
                continue
            self._streak[channel] = 0
            self.samples.append(Sample(self.clock(), gpu, name, value))
        if not self._active and self.health.stopped_early is None:
            self.health.stopped_early = "every reading failed repeatedly"
            self._stop.set()

    def _record_error(self, channel: tuple[int, str], error: Exception) -> None:
        key = f"{channel[1]}@{channel[0]}"
        self.health.errors[key] = self.health.errors.get(key, 0) + 1
        self.health.first_error.setdefault(key, f"{type(error).__name__}: {error}")
        self._streak[channel] = self._streak.get(channel, 0) + 1
        if self._streak[channel] >= _MAX_CONSECUTIVE_ERRORS:
            self._active.remove(channel)
            self.health.disabled_fields.append(key)

    def _run(self) -> None:
        next_time = time.monotonic()
        while not self._stop.is_set():
            self.sample_once()
            next_time += self.interval_s
            self._stop.wait(max(0.0, next_time - time.monotonic()))

    def start(self) -> None:
        """Start the daemon thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="efficientllm-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and take one last sample so the window's end is covered (idempotent)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample_once()

    def series(self, gpu: int, name: str) -> tuple[list[float], list[float]]:
        """Times and values of one channel, in sampling order."""
        points = [(s.time_s, s.value) for s in self.samples if s.gpu == gpu and s.field == name]
        return [t for t, _ in points], [v for _, v in points]

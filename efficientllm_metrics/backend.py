"""GPU readings behind one small interface: NVML on a GPU node, a fake in tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

#: Fields the sampler reads for every GPU, each in the unit its name ends with.
SAMPLED_FIELDS = (
    "memory_used_bytes",
    "process_memory_bytes",
    "power_w",
    "utilization_pct",
    "temperature_c",
    "sm_clock_mhz",
)


@dataclass(frozen=True)
class GpuInfo:
    """One GPU this process uses: its CUDA index in this process, NVML name and UUID."""

    cuda_index: int
    name: str
    uuid: str


class GpuBackend(Protocol):
    """What the monitor needs from a GPU library. Every read may raise."""

    gpus: list[GpuInfo]

    def read(self, gpu: int, field: str) -> float:
        """One reading of ``field`` (see ``SAMPLED_FIELDS``) for ``gpus[gpu]``."""

    def energy_j(self, gpu: int) -> float:
        """The GPU's cumulative energy counter in joules (raises where unsupported)."""

    def provenance(self) -> dict:
        """Driver and library versions, and how power is read."""


def _uuid_string(uuid: object) -> str:
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


class NvmlBackend:
    """NVML readings for exactly the CUDA devices this process uses, matched by UUID.

    NVML numbers GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES, so index-based
    handles can point at another job's GPU; UUIDs cannot.
    """

    def __init__(self, cuda_indices: list[int]):
        import pynvml
        import torch

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handles = []
        self.gpus = []
        for index in cuda_indices:
            uuid = _uuid_string(torch.cuda.get_device_properties(index).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid.encode())
            self._handles.append(handle)
            self.gpus.append(GpuInfo(index, _text(pynvml.nvmlDeviceGetName(handle)), uuid))
        self._pid = os.getpid()
        self.power_method = "NVML_FI_DEV_POWER_INSTANT"

    def read(self, gpu: int, field: str) -> float:
        nvml, handle = self._nvml, self._handles[gpu]
        if field == "memory_used_bytes":
            return float(nvml.nvmlDeviceGetMemoryInfo(handle).used)
        if field == "process_memory_bytes":
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == self._pid and proc.usedGpuMemory is not None:
                    return float(proc.usedGpuMemory)
            raise LookupError("this PID is not among the GPU's compute processes (containers hide PIDs)")
        if field == "power_w":
            return self._power_w(handle)
        if field == "utilization_pct":
            return float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        if field == "temperature_c":
            return float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        if field == "sm_clock_mhz":
            return float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
        raise KeyError(field)

    def _power_w(self, handle) -> float:
        nvml = self._nvml
        if self.power_method == "NVML_FI_DEV_POWER_INSTANT":
            value = nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_POWER_INSTANT])[0]
            if value.nvmlReturn == nvml.NVML_SUCCESS:
                return value.value.uiVal / 1000.0
            # Older drivers lack the instant field; the average is a 1 s window on Hopper.
            self.power_method = "nvmlDeviceGetPowerUsage (1 s average on Hopper)"
        return nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0

    def energy_j(self, gpu: int) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handles[gpu]) / 1000.0

    def provenance(self) -> dict:
        nvml = self._nvml
        return {
            "driver_version": _text(nvml.nvmlSystemGetDriverVersion()),
            "nvml_version": _text(nvml.nvmlSystemGetNVMLVersion()),
            "power_method": self.power_method,
        }


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def open_nvml(cuda_indices: list[int]) -> tuple[GpuBackend | None, str | None]:
    """NVML for these CUDA devices, or ``(None, reason)`` where it cannot be had."""
    if not cuda_indices:
        return None, "no CUDA device in use (CPU run): GPU power and energy cannot be measured"
    try:
        return NvmlBackend(cuda_indices), None
    except Exception as error:  # ImportError, NVMLError, a UUID NVML does not know
        return None, f"NVML unavailable ({type(error).__name__}: {error}); install nvidia-ml-py"

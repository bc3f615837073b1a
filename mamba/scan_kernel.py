"""The harness's selective-scan kernels (``selective_scan.cu``): compiled with NVRTC on first use, launched on
PyTorch's current stream.

They compute what mamba-ssm's ``selective_scan_cuda`` computes for Mamba-1 (one (N, L) pair of B and C per
sequence, z, D, a delta bias and softplus), with bf16 activations, but add the gradients of B and C once per
cluster of channels instead of once per channel (docs/performance.md, change 35).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("selective_scan.cu")


@dataclass(frozen=True)
class ScanTiling:
    """How the kernels split the work (scripts/benchmark_selective_scan.py times the alternatives). Both kernels
    walk a sequence in chunks of the same length, the forward keeping each chunk's final states for the backward,
    but each may split a chunk among its own number of threads."""

    threads: int = 128  # per backward thread block, one (sequence, channel)
    steps_per_thread: int = 8  # in the backward, a multiple of 8
    states_per_sum: int = 2  # states whose dB and dC terms a cluster sums between two of its barriers
    cluster: int = 4  # channels per thread-block cluster in the backward, at most; see cluster_size
    forward_threads: int | None = None  # per forward block; None: as many as the backward's

    def __post_init__(self):
        steps = self.forward_steps_per_thread
        if self.chunk % self.forward_block or steps % 8 or self.forward_block % 32:
            raise ValueError(f"a forward block of {self.forward_block} threads cannot split a chunk of {self.chunk} "
                             "steps into whole warps of a multiple of 8 steps each")

    @property
    def chunk(self) -> int:
        return self.threads * self.steps_per_thread

    @property
    def forward_block(self) -> int:
        return self.forward_threads or self.threads

    @property
    def forward_steps_per_thread(self) -> int:
        return self.chunk // self.forward_block

    @property
    def forward_kernel(self) -> ScanTiling:
        """The tiling the forward kernel is compiled with: its own block, the same chunks."""
        return dataclasses.replace(self, threads=self.forward_block, steps_per_thread=self.forward_steps_per_thread,
                                   forward_threads=None)

    def chunks(self, length: int) -> int:
        """Chunks a sequence of ``length`` steps takes: the forward keeps each one's final states."""
        return -(-length // self.chunk)

    def cluster_size(self, channels: int) -> int:
        """The largest power of two up to ``cluster`` that divides ``channels``."""
        size = self.cluster
        while channels % size:
            size //= 2
        return size

    def backward_shared_bytes(self) -> int:
        """The backward's three sets of dB and dC terms, float32 (selective_scan.cu's state loop)."""
        return 3 * self.states_per_sum * 2 * self.chunk * 4


TILING = ScanTiling(forward_threads=64)  # the forward in blocks of 64 threads, 16 steps each: change 40


@functools.cache
def _kernel(device: int, direction: str, d_state: int, cluster: int, tiling: ScanTiling) -> object:
    """selective_scan_``direction`` ("forward" or "backward") compiled alone for ``device`` with NVRTC, as
    ``torch.cuda._compile_kernel`` does, without its need for a CUDA toolkit's headers (the source includes
    none). The forward is compiled with ``tiling.forward_kernel``: its own block, the same chunks."""
    from torch.cuda import _utils as cuda_utils

    name = f"selective_scan_{direction}"
    nvrtc = cuda_utils._get_gpu_rtc_library()
    major, minor = torch.cuda.get_device_capability(device)
    options = [f"--gpu-architecture=sm_{major}{minor}", "--std=c++17", f"-DNTHREADS={tiling.threads}",
               f"-DNITEMS={tiling.steps_per_thread}", f"-DDSTATE={d_state}", f"-DCLUSTER={cluster}",
               f"-DGROUP={tiling.states_per_sum}", f"-DSCAN_{direction.upper()}"]
    program = ctypes.c_void_p()
    _check_nvrtc(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(program), SOURCE.read_bytes(), SOURCE.name.encode(),
                                                 0, None, None))
    try:
        encoded = [option.encode() for option in options]
        if nvrtc.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded)) != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, log)
            raise RuntimeError(f"NVRTC could not compile {SOURCE} ({' '.join(options)}):\n{log.value.decode()}")
        size = ctypes.c_size_t()
        _check_nvrtc(nvrtc, nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        _check_nvrtc(nvrtc, nvrtc.nvrtcGetCUBIN(program, cubin))
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    with torch.cuda.device(device):
        kernel = cuda_utils._cuda_load_module(cubin.raw, [name])[name]
        if direction == "backward" and tiling.backward_shared_bytes() >= 48 * 1024:  # above the default limit,
            kernel.set_shared_memory_config(tiling.backward_shared_bytes())  # the kernel must ask
    return kernel


def _check_nvrtc(nvrtc, result: int) -> None:
    if result != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC error {result}: {nvrtc.nvrtcGetErrorString(result).decode()}")


def _strides(name: str, tensor: torch.Tensor) -> list[int]:
    """(batch, channel) strides of a (batch, channels, L) bf16 tensor whose steps the kernels read 8 at a time."""
    if tensor.dtype != torch.bfloat16:
        raise TypeError(f"the harness's selective scan takes bf16 activations; {name} is {tensor.dtype}")
    if (tensor.stride(-1) != 1 or tensor.stride(0) % 8 or tensor.stride(1) % 8 or tensor.data_ptr() % 16
            or max(tensor.stride(0), tensor.stride(1)) >= 2**31):
        raise ValueError(f"{name}: steps must be contiguous, 16-byte aligned, with strides a multiple of 8 "
                         f"(got strides {tensor.stride()})")
    return [tensor.stride(0), tensor.stride(1)]


def _check_shapes(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> None:
    batch, channels, length = u.shape
    if length == 0 or length % 8:
        raise ValueError(f"the harness's selective scan needs a positive sequence length divisible by 8, got {length}")
    d_state = A.shape[1]
    for name, tensor in (("B", B), ("C", C)):
        if tensor.shape != (batch, d_state, length) or not tensor.is_contiguous() or tensor.dtype != torch.bfloat16:
            raise ValueError(f"{name} must be contiguous bf16 of shape {(batch, d_state, length)}, got "
                             f"{tuple(tensor.shape)} {tensor.dtype}")


def channel_major(batch: int, channels: int, length: int, device: torch.device) -> torch.Tensor:
    """An empty (batch, channels, L) bf16 tensor laid out as (channels, batch, L): viewed as (channels, batch * L),
    it is the operand of the projections around the scan without a transposing copy."""
    return torch.empty(channels, batch, length, dtype=torch.bfloat16, device=device).transpose(0, 1)


def scan_forward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, tiling: ScanTiling = TILING
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out = C h + D u (before the gate), out_z = out * silu(z), and each chunk's final states for the backward.

    u, delta, z: (batch, channels, L) bf16; A: (channels, N), D, delta_bias: (channels,) float32; B, C:
    (batch, N, L) bf16, contiguous. delta is taken through softplus(delta + delta_bias). out is contiguous,
    out_z ``channel_major``.
    """
    _check_shapes(u, A, B, C)
    batch, channels, length = u.shape
    out = torch.empty(batch, channels, length, dtype=u.dtype, device=u.device)
    out_z = channel_major(batch, channels, length, u.device)
    states = torch.empty(batch, channels, tiling.chunks(length), A.shape[1], dtype=torch.float32, device=u.device)
    kernel = _kernel(u.device.index, "forward", A.shape[1], tiling.cluster_size(channels), tiling.forward_kernel)
    kernel(grid=(channels, batch, 1), block=(tiling.forward_block, 1, 1),
           args=[u, delta, A.contiguous(), B, C, D.contiguous(), z, delta_bias.contiguous(), out, out_z, states,
                 length, channels, *_strides("u", u), *_strides("delta", delta), *_strides("z", z),
                 *_strides("out_z", out_z)])
    return out, out_z, states


def scan_backward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, dout: torch.Tensor,
                  states: torch.Tensor, out: torch.Tensor, dz: torch.Tensor, tiling: ScanTiling = TILING
                  ) -> tuple[torch.Tensor, ...]:
    """Gradients of ``scan_forward`` given dout, the gradient of out_z, and the forward's out and states (from
    the same tiling).

    Writes dz into ``dz`` (a (batch, channels, L) bf16 view, e.g. half of xz's gradient) and returns du, ddelta
    (bf16, the gradient of delta before the bias and softplus), dA, dB, dC, dD, ddelta_bias (float32) and out_z,
    recomputed for the output projection's weight gradient; du, ddelta and out_z are ``channel_major``.
    """
    _check_shapes(u, A, B, C)
    batch, channels, length = u.shape
    if not out.is_contiguous() or states.shape != (batch, channels, tiling.chunks(length), A.shape[1]):
        raise ValueError("out and states must be those of scan_forward with the same tiling")
    du, ddelta, out_z = (channel_major(batch, channels, length, u.device) for _ in range(3))
    dA = torch.zeros(A.shape, dtype=torch.float32, device=u.device)
    dB, dC = (torch.zeros(B.shape, dtype=torch.float32, device=u.device) for _ in range(2))
    dD, ddelta_bias = (torch.zeros(channels, dtype=torch.float32, device=u.device) for _ in range(2))
    kernel = _kernel(u.device.index, "backward", A.shape[1], tiling.cluster_size(channels), tiling)
    kernel(grid=(channels, batch, 1), block=(tiling.threads, 1, 1), shared_mem=tiling.backward_shared_bytes(),
           args=[u, delta, A.contiguous(), B, C, D.contiguous(), z, delta_bias.contiguous(), dout, states, out,
                 du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z, length, channels, *_strides("u", u),
                 *_strides("delta", delta), *_strides("z", z), *_strides("dout", dout), *_strides("dz", dz),
                 *_strides("du", du)])
    return du, ddelta, dA, dB, dC, dD, ddelta_bias, out_z

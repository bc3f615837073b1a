"""The harness's selective-scan kernels (``selective_scan.cu``): compiled with NVRTC on first use, launched on
PyTorch's current stream.

They compute what mamba-ssm's ``selective_scan_cuda`` computes for Mamba-1 (one (N, L) pair of B and C per
sequence, z, D, a delta bias and softplus), with bf16 activations, but add the gradients of B and C once per
cluster of channels instead of once per channel (docs/performance.md, change 35).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("selective_scan.cu")
THREADS = 128
STEPS_PER_THREAD = 8
CHUNK = THREADS * STEPS_PER_THREAD
STATES_PER_SUM = 2  # states whose dB and dC terms a cluster sums between two of its barriers


def cluster_size(channels: int) -> int:
    """Channels per thread-block cluster in the backward: the largest of 8, 4, 2, 1 that divides ``channels``."""
    return next(size for size in (8, 4, 2, 1) if channels % size == 0)


@functools.cache
def _kernels(device: int, d_state: int, cluster: int) -> dict[str, object]:
    """Compiles selective_scan.cu for ``device`` with NVRTC, as ``torch.cuda._compile_kernel`` does, without its
    need for a CUDA toolkit's headers (the source includes none)."""
    from torch.cuda import _utils as cuda_utils

    nvrtc = cuda_utils._get_gpu_rtc_library()
    major, minor = torch.cuda.get_device_capability(device)
    options = [f"--gpu-architecture=sm_{major}{minor}", "--std=c++17", f"-DNTHREADS={THREADS}",
               f"-DNITEMS={STEPS_PER_THREAD}", f"-DDSTATE={d_state}", f"-DCLUSTER={cluster}",
               f"-DGROUP={STATES_PER_SUM}"]
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
        kernels = cuda_utils._cuda_load_module(cubin.raw, ["selective_scan_forward", "selective_scan_backward"])
        if _backward_shared_bytes() >= 48 * 1024:
            kernels["selective_scan_backward"].set_shared_memory_config(_backward_shared_bytes())
    return kernels


def _backward_shared_bytes() -> int:
    """The backward's three sets of STATES_PER_SUM states' dB and dC terms, float32 (selective_scan.cu)."""
    return 3 * STATES_PER_SUM * 2 * CHUNK * 4


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
    if length % 8:
        raise ValueError(f"the harness's selective scan needs a sequence length divisible by 8, got {length}")
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
                 D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor
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
    states = torch.empty(batch, channels, -(-length // CHUNK), A.shape[1], dtype=torch.float32, device=u.device)
    kernel = _kernels(u.device.index, A.shape[1], cluster_size(channels))["selective_scan_forward"]
    kernel(grid=(channels, batch, 1), block=(THREADS, 1, 1),
           args=[u, delta, A.contiguous(), B, C, D.contiguous(), z, delta_bias.contiguous(), out, out_z, states,
                 length, channels, *_strides("u", u), *_strides("delta", delta), *_strides("z", z),
                 *_strides("out_z", out_z)])
    return out, out_z, states


def scan_backward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, dout: torch.Tensor,
                  states: torch.Tensor, out: torch.Tensor, dz: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of ``scan_forward`` given dout, the gradient of out_z, and the forward's out and states.

    Writes dz into ``dz`` (a (batch, channels, L) bf16 view, e.g. half of xz's gradient) and returns du, ddelta
    (bf16, the gradient of delta before the bias and softplus), dA, dB, dC, dD, ddelta_bias (float32) and out_z,
    recomputed for the output projection's weight gradient; du, ddelta and out_z are ``channel_major``.
    """
    _check_shapes(u, A, B, C)
    if not out.is_contiguous() or states.shape[:2] != u.shape[:2]:
        raise ValueError("out and states must be scan_forward's")
    batch, channels, length = u.shape
    du, ddelta, out_z = (channel_major(batch, channels, length, u.device) for _ in range(3))
    dA = torch.zeros(A.shape, dtype=torch.float32, device=u.device)
    dB, dC = (torch.zeros(B.shape, dtype=torch.float32, device=u.device) for _ in range(2))
    dD, ddelta_bias = (torch.zeros(channels, dtype=torch.float32, device=u.device) for _ in range(2))
    kernel = _kernels(u.device.index, A.shape[1], cluster_size(channels))["selective_scan_backward"]
    kernel(grid=(channels, batch, 1), block=(THREADS, 1, 1), shared_mem=_backward_shared_bytes(),
           args=[u, delta, A.contiguous(), B, C, D.contiguous(), z, delta_bias.contiguous(), dout, states, out,
                 du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z, length, channels, *_strides("u", u),
                 *_strides("delta", delta), *_strides("z", z), *_strides("dout", dout), *_strides("dz", dz),
                 *_strides("du", du)])
    return du, ddelta, dA, dB, dC, dD, ddelta_bias, out_z

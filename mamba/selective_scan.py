"""The Mamba-1 mixer after its input projection: mamba-ssm's fused CUDA path and a float32 reference.

Both take ``xz`` (B, 2E, L), the input projection's output with the sequence dimension contiguous (the
layout mamba-ssm's kernels read without a copy), and return the mixer's output (B, L, D) after the output
projection:

    x, z = xz;  x = silu(causal_conv1d(x));  (dt, B, C) = x_proj(x);  delta = softplus(dt_proj(dt))
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t;  y_t = C_t h_t + D x_t;  out = out_proj(y * silu(z))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FUSED_PATH = "mamba_ssm fused (mamba_inner_fn: causal_conv1d + selective_scan CUDA)"
REFERENCE_PATH = "PyTorch reference selective scan (slow)"


def fused_kernels_available() -> bool:
    try:
        import causal_conv1d  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn  # noqa: F401
    except ImportError:
        return False
    return True


@torch.compiler.disable  # CUDA kernels behind an autograd.Function: run eagerly between compiled regions
def mixer_fused(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, A, D, dt_bias):
    """mamba-ssm's fused conv, selective scan, gate and output projection (its checkpointing level 1)."""
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn

    return mamba_inner_fn(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, None, A,
                          None, None, D, delta_bias=dt_bias, delta_softplus=True)


def mixer_reference(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, A, D, dt_bias):
    """The same function as ``mixer_fused`` in plain PyTorch (float32 scan); runs anywhere."""
    length, d_state = xz.shape[-1], A.shape[1]
    dt_rank = dt_proj_weight.shape[1]
    x, z = xz.chunk(2, dim=1)  # (B, E, L) each
    x = F.silu(F.conv1d(x, conv_weight, conv_bias, padding=conv_weight.shape[-1] - 1,
                        groups=x.shape[1])[..., :length])  # causal: keep the first L outputs
    dt, B, C = F.linear(x.transpose(1, 2), x_proj_weight).split([dt_rank, d_state, d_state], dim=-1)
    delta = F.softplus(F.linear(dt, dt_proj_weight).transpose(1, 2).float() + dt_bias.unsqueeze(-1))  # (B, E, L)
    y = selective_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), D)
    y = y.to(xz.dtype) * F.silu(z)
    return F.linear(y.transpose(1, 2), out_proj_weight)  # (B, L, D)


@torch.compiler.disable  # a Python loop over tokens: tracing it would unroll the sequence
def selective_scan(x, delta, A, B, C, D):
    """Reference selective scan, float32, sequential in time and vectorized over batch and channels.

    x, delta: (B, E, L); A: (E, N); B, C: (B, N, L); D: (E,). Returns y: (B, E, L).
    """
    x, delta, B, C = x.float(), delta.float(), B.float(), C.float()
    decay = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))  # (B, E, L, N)
    drive = (delta * x).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (B, E, L, N)
    state = x.new_zeros(x.shape[0], x.shape[1], A.shape[1])  # (B, E, N)
    outputs = []
    for t in range(x.shape[-1]):
        state = decay[:, :, t] * state + drive[:, :, t]
        outputs.append(torch.einsum("ben,bn->be", state, C[:, :, t]))
    return torch.stack(outputs, dim=-1) + x * D.unsqueeze(-1)

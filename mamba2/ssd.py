"""The Mamba-2 mixer after its input projection: mamba-ssm's fused path (causal-conv1d plus the chunked SSD
scan in Triton, gated RMSNorm and the output projection in one autograd function) and a float32 reference.

Both take ``zxbcdt`` (B, L, 2E + 2GN + H), the input projection's output in mamba-ssm's order [z, x, B, C, dt],
and return the mixer's output (B, L, D):

    (x, B, C) = silu(causal_conv1d([x, B, C]));  dt = softplus(dt + dt_bias);  per head h of size P:
    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T  (P x N);  y_t = S_t C_t + D_h x_t
    out = out_proj(rmsnorm_per_group(y * silu(z)))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training_harness.kernel_pins import kernel_choice

FUSED_PATH = "mamba_ssm fused (mamba_split_conv1d_scan_combined: causal_conv1d + chunked SSD Triton)"
REFERENCE_PATH = "PyTorch reference SSD recurrence (slow)"


def ssd_kernel_choice() -> str | None:
    """How mamba-ssm's Triton kernels are chosen ("pinned ..." or "autotuned ..."), or None without mamba-ssm."""
    return kernel_choice("mamba2")


def fused_kernels_available() -> bool:
    try:
        import causal_conv1d  # noqa: F401
    except ImportError:
        return False
    return ssd_kernel_choice() is not None


@torch.compiler.disable  # Triton and CUDA kernels behind an autograd.Function: run eagerly
def mixer_fused(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, *, headdim: int,
                ngroups: int, chunk_size: int, eps: float):
    """mamba-ssm's memory-efficient path (its Mamba2 module's default in training)."""
    ssd_kernel_choice()  # the first import of mamba-ssm pins its kernel configurations
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined

    return mamba_split_conv1d_scan_combined(
        zxbcdt, conv_weight.squeeze(1), conv_bias, dt_bias, A, D=D, chunk_size=chunk_size, activation="silu",
        rmsnorm_weight=norm_weight, rmsnorm_eps=eps, outproj_weight=out_proj_weight, outproj_bias=None,
        headdim=headdim, ngroups=ngroups, norm_before_gate=False)


def mixer_reference(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, *, headdim: int,
                    ngroups: int, chunk_size: int, eps: float):
    """The same function as ``mixer_fused`` in plain PyTorch (float32 recurrence); runs anywhere.
    ``chunk_size`` only shapes the fused kernel's work, not its result."""
    batch, length, _ = zxbcdt.shape
    heads = A.shape[0]
    d_inner = heads * headdim
    d_state = (conv_weight.shape[0] - d_inner) // (2 * ngroups)
    z, xbc, dt = zxbcdt.split([d_inner, d_inner + 2 * ngroups * d_state, heads], dim=-1)
    xbc = F.silu(F.conv1d(xbc.transpose(1, 2), conv_weight, conv_bias, padding=conv_weight.shape[-1] - 1,
                          groups=xbc.shape[-1])[..., :length]).transpose(1, 2)  # causal: the first L outputs
    x, B, C = xbc.split([d_inner, ngroups * d_state, ngroups * d_state], dim=-1)
    y = ssd_scan(x.reshape(batch, length, heads, headdim), F.softplus(dt.float() + dt_bias.float()), A,
                 B.reshape(batch, length, ngroups, d_state), C.reshape(batch, length, ngroups, d_state), D)
    gated = y.reshape(batch, length, d_inner) * F.silu(z.float())
    groups = gated.reshape(batch, length, ngroups, d_inner // ngroups)
    normed = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    return F.linear((normed.reshape(batch, length, d_inner) * norm_weight.float()).to(zxbcdt.dtype), out_proj_weight)


@torch.compiler.disable  # a Python loop over tokens: tracing it would unroll the sequence
def ssd_scan(x, dt, A, B, C, D):
    """Reference SSD recurrence, float32, sequential in time and vectorized over batch and heads.

    x: (B, L, H, P); dt: (B, L, H), already softplus-ed; A, D: (H,); B, C: (B, L, G, N) with H a multiple of
    G (head h reads group h // (H / G)). Returns y: (B, L, H, P).
    """
    heads, groups = x.shape[2], B.shape[2]
    B = B.float().repeat_interleave(heads // groups, dim=2)  # (B, L, H, N)
    C = C.float().repeat_interleave(heads // groups, dim=2)
    x, dt = x.float(), dt.float()
    decay = torch.exp(dt * A.float())  # (B, L, H)
    state = x.new_zeros(x.shape[0], heads, x.shape[3], B.shape[3])  # (B, H, P, N)
    outputs = []
    for t in range(x.shape[1]):
        state = decay[:, t, :, None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None]
        outputs.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]) + D.float()[:, None] * x[:, t])
    return torch.stack(outputs, dim=1)

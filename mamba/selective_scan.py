"""The Mamba-1 mixer: its input projection, then a fused CUDA path or a float32 reference.

The fused path runs causal-conv1d's kernels and the harness's selective scan (``scan_kernel.py``) in one
autograd function, recomputing the conv's output and delta in the backward as mamba-ssm's ``mamba_inner_fn``
does; under fp32 activations, which the harness's scan does not take, it runs ``mamba_inner_fn`` itself. Both
paths take ``xz`` (B, 2E, L), the input projection's output with the sequence dimension contiguous (the
layout mamba-ssm's kernels read without a copy), and return the mixer's output (B, L, D) after the output
projection:

    x, z = xz;  x = silu(causal_conv1d(x));  (dt, B, C) = x_proj(x);  delta = softplus(dt_proj(dt))
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t;  y_t = C_t h_t + D x_t;  out = out_proj(y * silu(z))

The input projection (``InputProjection``, on both paths) and the fused path's products hand their weight
gradients to ``weight_gradient``, which adds each into its float32 sum where the weight trains on a working copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training_harness.working_weights import weight_gradient

FUSED_PATH = ("causal_conv1d + the harness's selective-scan CUDA kernel (bf16; mamba_ssm's mamba_inner_fn under "
              "fp32)")
REFERENCE_PATH = "PyTorch reference selective scan (slow)"


def fused_kernels_available() -> bool:
    try:
        from causal_conv1d.cpp_functions import causal_conv1d_bwd_function  # noqa: F401  (as mamba-ssm 2.3 imports it)
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn  # noqa: F401
    except ImportError:
        return False
    return True


@torch.compiler.disable  # CUDA kernels behind an autograd.Function: run eagerly between compiled regions
def mixer_fused(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, A, D, dt_bias):
    """The mixer on CUDA kernels: ``FusedMixer`` on bf16 activations, mamba-ssm's ``mamba_inner_fn`` on fp32."""
    if xz.dtype != torch.bfloat16:
        return mixer_mamba_ssm(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, A, D,
                               dt_bias)
    length = xz.shape[-1]
    if length % 8:  # the scan reads 8 steps at a time; zeros after the end leave a causal mixer's outputs alone
        xz = F.pad(xz, (0, 8 - length % 8))
    out = FusedMixer.apply(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, A, D, dt_bias)
    return out[:, :length]


def mixer_mamba_ssm(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, A, D, dt_bias):
    """mamba-ssm's ``mamba_inner_fn`` (its checkpointing level 1) with the mixer's arguments: the fused path on
    fp32 activations, and what scripts/benchmark_selective_scan.py times ``FusedMixer`` against."""
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn

    return mamba_inner_fn(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, None, A, None,
                          None, D, delta_bias=dt_bias, delta_softplus=True)


class InputProjection(torch.autograd.Function):
    """weight @ rows.T: (2E, B*L) from rows (B*L, D), contiguous, the layout the mixer's kernels read a view of.
    Its own backward, so that the weight's gradient goes through ``weight_gradient``; on both paths."""

    @staticmethod
    def forward(ctx, rows, weight):
        cast = weight.to(rows.dtype)  # autocast's cast, where the weight is not a bf16 working copy already
        ctx.save_for_backward(rows, cast)
        ctx.weight = weight
        return cast @ rows.t()

    @staticmethod
    def backward(ctx, dxz):
        rows, cast = ctx.saved_tensors
        return dxz.t() @ cast, weight_gradient(ctx.weight, dxz, rows)


class FusedMixer(torch.autograd.Function):
    """causal-conv1d, the input-dependent projections, the harness's selective scan and the output projection;
    saves xz and x_proj's output, and recomputes the conv's output and delta in the backward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, A, D, dt_bias):
        from causal_conv1d.cpp_functions import causal_conv1d_fwd_function

        from mamba.scan_kernel import scan_forward

        ctx.weights = x_proj_weight, dt_proj_weight, out_proj_weight  # the parameters, for weight_gradient
        x_proj_weight, dt_proj_weight, out_proj_weight = (w.to(xz.dtype) for w in
                                                          (x_proj_weight, dt_proj_weight, out_proj_weight))
        x, z = xz.chunk(2, dim=1)
        conv_out = causal_conv1d_fwd_function(x, conv_weight.squeeze(1), conv_bias, None, None, None, True)
        x_dbl = F.linear(conv_out.transpose(1, 2).reshape(-1, conv_out.shape[1]), x_proj_weight)  # (B*L, r+2N)
        B, C = _state_inputs(x_dbl, dt_proj_weight.shape[1], A.shape[1], xz.shape[0])
        delta = _delta(x_dbl, dt_proj_weight, xz.shape[0])
        out, out_z, states = scan_forward(conv_out, delta, A, B, C, D, z, dt_bias)
        ctx.save_for_backward(xz, conv_weight, conv_bias, x_dbl, x_proj_weight, dt_proj_weight, out_proj_weight, A, B,
                              C, D, dt_bias, states, out)
        out_rows = out_z.transpose(0, 1).reshape(out_z.shape[1], -1).t()  # (B*L, E), a view: out_z is channel-major
        return F.linear(out_rows, out_proj_weight).view(xz.shape[0], xz.shape[-1], -1)  # (B, L, D)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function

        from mamba.scan_kernel import scan_backward

        (xz, conv_weight, conv_bias, x_dbl, x_proj_weight, dt_proj_weight, out_proj_weight, A, B, C, D, dt_bias,
         states, out) = ctx.saved_tensors
        batch, length, rank, d_state = xz.shape[0], xz.shape[-1], dt_proj_weight.shape[1], A.shape[1]
        x, z = xz.chunk(2, dim=1)
        conv_out = causal_conv1d_fwd_function(x, conv_weight.squeeze(1), conv_bias, None, None, None, True)
        delta = _delta(x_dbl, dt_proj_weight, batch)
        dxz = torch.empty_like(xz)
        dx, dz = dxz.chunk(2, dim=1)
        dout = dout.reshape(-1, dout.shape[-1])  # (B*L, D)
        dout_z = (out_proj_weight.t() @ dout.t()).view(-1, batch, length).transpose(0, 1)  # (B, E, L), a view
        du, ddelta, dA, dB, dC, dD, ddt_bias, out_z = scan_backward(conv_out, delta, A, B, C, D, z, dt_bias, dout_z,
                                                                    states, out, dz)
        out_z, ddelta, du = (t.transpose(0, 1).reshape(t.shape[1], -1) for t in (out_z, ddelta, du))  # (E, B*L) views
        x_proj_param, dt_proj_param, out_proj_param = ctx.weights
        dout_proj_weight = weight_gradient(out_proj_param, dout.t(), out_z.t())
        dx_dbl = torch.empty_like(x_dbl)
        dx_dbl[:, :rank] = ddelta.t() @ dt_proj_weight
        dx_dbl[:, rank:rank + d_state] = dB.transpose(1, 2).reshape(-1, d_state)
        dx_dbl[:, rank + d_state:] = dC.transpose(1, 2).reshape(-1, d_state)
        ddt_proj_weight = weight_gradient(dt_proj_param, ddelta, x_dbl[:, :rank])
        conv_rows = conv_out.transpose(1, 2).reshape(-1, conv_out.shape[1])  # (B*L, E)
        dx_proj_weight = weight_gradient(x_proj_param, dx_dbl.t(), conv_rows)
        dconv_out = torch.addmm(du, x_proj_weight.t(), dx_dbl.t(), out=du).view(-1, batch, length).transpose(0, 1)
        dx, dconv_weight, dconv_bias, *_ = causal_conv1d_bwd_function(x, conv_weight.squeeze(1), conv_bias,
                                                                      dconv_out, None, None, None, dx, False, True)
        return (dxz, dconv_weight.unsqueeze(1), dconv_bias, dx_proj_weight, ddt_proj_weight, dout_proj_weight, dA, dD,
                ddt_bias)


def _state_inputs(x_dbl: torch.Tensor, rank: int, d_state: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B and C from x_proj's output (B*L, r+2N): (B, N, L) each, contiguous, as the scan reads them."""
    B, C = x_dbl[:, rank:].view(batch, -1, 2 * d_state).transpose(1, 2).split(d_state, dim=1)
    return B.contiguous(), C.contiguous()


def _delta(x_dbl: torch.Tensor, dt_proj_weight: torch.Tensor, batch: int) -> torch.Tensor:
    """dt_proj of the low-rank dt (before bias and softplus, which the scan applies): (B, E, L), a view of (E, B*L)."""
    rank = dt_proj_weight.shape[1]
    return (dt_proj_weight @ x_dbl[:, :rank].t()).view(dt_proj_weight.shape[0], batch, -1).transpose(0, 1)


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

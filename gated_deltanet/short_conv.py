"""Gated DeltaNet's short convolution: a causal depthwise convolution over time followed by SiLU, on
(B, T, C) with weights (C, taps). flash-linear-attention's Triton kernel (the one its own layer runs) on CUDA,
and shifted multiply-adds that run anywhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gated_deltanet.delta_rule import fla_kernel_choice


def short_conv_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The sum of the taps over shifted copies of x: y_t = silu(sum_j weight[:, j] x_{t - taps + 1 + j})."""
    taps, length = weight.shape[-1], x.shape[1]
    padded = F.pad(x, (0, 0, taps - 1, 0))  # (B, taps - 1 + T, C): zeros before the first token
    weight = weight.to(x.dtype)  # in the autocast dtype, as nn.Conv1d would run
    return F.silu(sum(padded[:, tap:tap + length] * weight[:, tap] for tap in range(taps)))


# A custom op, opaque to torch.compile: the compiled region around it keeps one graph, and inductor calls fla's
# kernels as they are (tracing into fla's autograd function would break the graph).
@torch.library.custom_op("gated_deltanet::short_conv", mutates_args=())
def short_conv_fla(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fla's causal_conv1d with SiLU; x (B, T, C) in bf16, weight (C, taps) in x's dtype."""
    fla_kernel_choice()  # the first import of fla pins its kernel configurations
    from fla.modules.causal_conv1d.ops import causal_conv1d_fwd

    out, _ = causal_conv1d_fwd(x=x, weight=weight, bias=None, residual=None, activation="silu")
    return out


@torch.library.custom_op("gated_deltanet::short_conv_backward", mutates_args=())
def _short_conv_fla_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    from fla.modules.causal_conv1d.ops import causal_conv1d_bwd

    grad_x, grad_weight, *_ = causal_conv1d_bwd(x=x, dy=grad.contiguous(), dht=None, weight=weight, bias=None,
                                                residual=None, activation="silu")
    return grad_x, grad_weight


@short_conv_fla.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@_short_conv_fla_backward.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(weight)


def _save_inputs(ctx, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _short_conv_fla_backward(*ctx.saved_tensors, grad)


short_conv_fla.register_autograd(_backward, setup_context=_save_inputs)

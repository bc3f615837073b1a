"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024): gated-delta-rule token mixing and a SwiGLU MLP in pre-norm
residual blocks, on flash-linear-attention's chunked kernel and causal convolution on CUDA and plain PyTorch on
CPU.

The layer follows ``fla.layers.GatedDeltaNet`` with its defaults (q/k/v short convolutions with SiLU, gate
and update rate from per-head projections, A_log and dt_bias as in Mamba-2, an output gate through a gated
RMSNorm per head, values twice the keys' width) and the block ``fla``'s GatedDeltaNet model (RMSNorm, SwiGLU
of 4x width rounded to 256, untied head).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gated_deltanet.delta_rule import (
    FUSED_PATH,
    REFERENCE_PATH,
    backward_refused,
    fla_kernel_choice,
    fused_kernels_available,
    gated_delta_rule_fused,
    gated_delta_rule_reference,
)
from gated_deltanet.short_conv import short_conv_fla, short_conv_reference
from training_harness.lm import CausalLM, tag_no_weight_decay
from training_harness.registry import ModelFamily, StockReference

_SHAPES = {  # 1.5B: the upstream reference configuration (fla's GatedDeltaNetConfig defaults, "1.3B"); 0.5B and
    # 3B keep its head size and ratios at the widths of the other families
    "0.5B": dict(layers=24, d_model=1024, heads=3, head_dim=256),
    "1.5B": dict(layers=21, d_model=2048, heads=6, head_dim=256),
    "3B": dict(layers=30, d_model=2560, heads=8, head_dim=256),
}
SHAPES = {
    "paper": _SHAPES,
    "matched": _SHAPES,  # already within 10 % of each nominal size
    # head size 64: at 16, fla's backward kernel read out of bounds on an H200 with Triton 3.7.1 (docs/device.md)
    "tiny": {size: dict(layers=2, d_model=64, heads=2, head_dim=64) for size in _SHAPES},
}
EXPAND_V, CONV_SIZE, MLP_RATIO, NORM_EPS = 2, 4, 4, 1e-6

INSTALL_HINT = ("pip install flash-linear-attention (see README, GPU install), or pass --allow_slow_kernels to "
                "time the slow reference path knowingly")


def mlp_width(d_model: int) -> int:
    """fla's GatedMLP width: 2/3 of 4x the model width, rounded up to a multiple of 256."""
    return 256 * math.ceil(int(d_model * MLP_RATIO * 2 / 3) / 256)


class GatedDeltaNetMixer(nn.Module):
    """The token mixer, split around the kernel: ``prepare`` (projections, short convolutions) and ``readout``
    (gated norm, output projection), so that each side compiles as one graph."""

    def __init__(self, d_model: int, heads: int, head_dim: int, fused: bool):
        super().__init__()
        self.heads, self.head_dim, self.fused = heads, head_dim, fused
        key_dim, value_dim = heads * head_dim, heads * head_dim * EXPAND_V
        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.a_proj = nn.Linear(d_model, heads, bias=False)
        self.b_proj = nn.Linear(d_model, heads, bias=False)
        self.g_proj = nn.Linear(d_model, value_dim, bias=False)
        self.q_conv, self.k_conv = (nn.Conv1d(key_dim, key_dim, CONV_SIZE, groups=key_dim, padding=CONV_SIZE - 1,
                                              bias=False) for _ in range(2))
        self.v_conv = nn.Conv1d(value_dim, value_dim, CONV_SIZE, groups=value_dim, padding=CONV_SIZE - 1, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(1e-4, 16)))
        dt = torch.exp(torch.rand(heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.o_norm = nn.RMSNorm(head_dim * EXPAND_V, eps=NORM_EPS)
        self.o_proj = nn.Linear(value_dim, d_model, bias=False)
        tag_no_weight_decay(self.A_log, self.dt_bias)

    def short_conv(self, x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
        """Causal depthwise convolution then SiLU, on (B, T, C), with ``conv``'s weights (C, 1, taps)."""
        weight = conv.weight.squeeze(1)
        return short_conv_fla(x, weight.to(x.dtype)) if self.fused else short_conv_reference(x, weight)

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, T, D) -> the kernel's inputs q, k, v, a, b and the output gate."""
        heads = lambda t: t.unflatten(-1, (self.heads, -1))  # noqa: E731
        q = heads(self.short_conv(self.q_proj(x), self.q_conv))
        k = heads(self.short_conv(self.k_proj(x), self.k_conv))
        v = heads(self.short_conv(self.v_proj(x), self.v_conv))
        return q, k, v, self.a_proj(x), self.b_proj(x), heads(self.g_proj(x))

    def delta_rule(self, q, k, v, a, b) -> torch.Tensor:
        rule = gated_delta_rule_fused if self.fused else gated_delta_rule_reference
        return rule(q, k, v, a, b, self.A_log, self.dt_bias)

    def readout(self, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """rmsnorm(o) x silu(gate) per head, then the output projection: (B, T, H, V) -> (B, T, D)."""
        gated = self.o_norm(out.to(gate.dtype)) * F.silu(gate)
        return self.o_proj(gated.flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *inputs, gate = self.prepare(x)
        return self.readout(self.delta_rule(*inputs), gate)


class GatedDeltaNetBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, head_dim: int, fused: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.mixer = GatedDeltaNetMixer(d_model, heads, head_dim, fused)
        self.mlp_norm = nn.RMSNorm(d_model, eps=NORM_EPS)
        width = mlp_width(d_model)
        self.gate_proj = nn.Linear(d_model, width, bias=False)
        self.up_proj = nn.Linear(d_model, width, bias=False)
        self.down_proj = nn.Linear(width, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *inputs, gate = self.before_rule(x)
        return self.after_rule(x, self.mixer.delta_rule(*inputs), gate)

    def before_rule(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.mixer.prepare(self.attn_norm(x))

    def after_rule(self, x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer.readout(out, gate)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    def compile_regions(self, **kwargs) -> None:
        """Two whole graphs, before and after the kernel, which runs eagerly between them."""
        self.before_rule = torch.compile(self.before_rule, fullgraph=True, **kwargs)
        self.after_rule = torch.compile(self.after_rule, fullgraph=True, **kwargs)


class GatedDeltaNetBackbone(nn.Module):
    def __init__(self, shape: dict, vocab_size: int, fused: bool):
        super().__init__()
        d_model = shape["d_model"]
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(GatedDeltaNetBlock(d_model, shape["heads"], shape["head_dim"], fused)
                                    for _ in range(shape["layers"]))
        self.norm_f = nn.RMSNorm(d_model, eps=NORM_EPS)
        for module in self.modules():  # fla's init: N(0, 0.02) for embeddings, linear and conv weights
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.norm_f(x)


def build(shape: dict, vocab_size: int, device_type: str, allow_slow_kernels: bool) -> CausalLM:
    installed = device_type == "cuda" and fused_kernels_available()
    refused = backward_refused() if installed else None
    fused = installed and refused is None
    if refused and not allow_slow_kernels:
        raise RuntimeError(f"Gated DeltaNet: {refused}; or pass --allow_slow_kernels to run the (very slow) "
                           "reference path")
    if device_type == "cuda" and not installed and not allow_slow_kernels:
        raise RuntimeError(f"Gated DeltaNet on CUDA needs flash-linear-attention, which is not importable: "
                           f"{INSTALL_HINT}")
    kernel_path = f"{FUSED_PATH}, {fla_kernel_choice()}" if fused else REFERENCE_PATH
    return CausalLM(GatedDeltaNetBackbone(shape, vocab_size, fused), vocab_size, shape["d_model"],
                    tie_embeddings=False, kernel_path=kernel_path)


def delta_rule_flops_per_token(shape: dict, seq_len: int) -> float:
    """The gated delta rule per token and head, forward, in its recurrent form: the decayed state's read-out
    S^T k, its rank-one update and the output S^T q, 2 K V each, plus the short convolutions 2 x 4 per
    channel. x3 for training (the chunked kernel's intra-chunk work is extra and not counted)."""
    key, value = shape["head_dim"], shape["head_dim"] * EXPAND_V
    conv_channels = shape["heads"] * (2 * key + value)
    return 3.0 * shape["layers"] * (shape["heads"] * 6 * key * value + 2 * CONV_SIZE * conv_channels)


def build_stock(shape: dict, vocab_size: int) -> nn.Module:
    """fla's GatedDeltaNetForCausalLM at the same shape, with its defaults (fused norms and cross-entropy), its
    kernels pinned like the harness's (training_harness/kernel_pins.py)."""
    fla_kernel_choice()  # fla's first import pins its kernels, fla.models' among them
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    return GatedDeltaNetForCausalLM(GatedDeltaNetConfig(
        hidden_size=shape["d_model"], num_hidden_layers=shape["layers"], num_heads=shape["heads"],
        head_dim=shape["head_dim"], expand_v=EXPAND_V, vocab_size=vocab_size))


def stock_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """fla's own loss: labels shifted by one, its fused cross-entropy."""
    return model(input_ids=tokens, labels=tokens).loss


FAMILY = ModelFamily(
    name="gated_deltanet", display_name="Gated DeltaNet", default_tokenizer="EleutherAI/pythia-410m",
    tokenizer_vocab=50_277, shapes=SHAPES, build=build, sequence_flops_per_token=delta_rule_flops_per_token,
    gpu_plan={"0.5B": {"micro_batch_size": 4}, "1.5B": {"micro_batch_size": 2},  # device peaks 52, 65 GB
              "3B": {"micro_batch_size": 1, "activation_checkpointing": True, "checkpoint_blocks": 11,
                     "cuda_graphs": True}},  # 79 GB
    pinned_kernels="fla.ops.gated_delta_rule",
    stock=StockReference("fla GatedDeltaNetForCausalLM (chunk mode)", build_stock, stock_loss),
)

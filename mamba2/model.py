"""Mamba-2 (Dao & Gu 2024): SSD blocks on mamba-ssm's fused kernels on CUDA, plain PyTorch on CPU.

The parameter layout and initialisation follow ``mamba_ssm.modules.mamba2.Mamba2`` and ``MambaLMHeadModel``
(pre-norm RMSNorm residual blocks with the residual in float32, tied embeddings), so the fused
``mamba_split_conv1d_scan_combined`` consumes these weights directly. Blocks and backbone are Mamba-1's.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn

from mamba.model import MambaBackbone, stock_builder, stock_loss
from mamba2.ssd import (
    FUSED_PATH,
    REFERENCE_PATH,
    fused_kernels_available,
    mixer_fused,
    mixer_reference,
    ssd_kernel_choice,
)
from training_harness.lm import CausalLM, tag_no_weight_decay
from training_harness.registry import ModelFamily, StockReference

_PAPER = {  # the published mamba2-130m, -780m and -2.7b checkpoints: the nearest to each nominal size
    "0.5B": dict(layers=24, d_model=768),
    "1.5B": dict(layers=48, d_model=1536),
    "3B": dict(layers=64, d_model=2560),
}
SHAPES = {
    "paper": _PAPER,
    "matched": {
        "0.5B": dict(layers=48, d_model=1152),
        "1.5B": dict(layers=48, d_model=2176),
        "3B": dict(layers=64, d_model=2688),
    },
    "tiny": {size: dict(layers=2, d_model=64, headdim=16, d_state=16, chunk_size=16) for size in _PAPER},
}
D_STATE, D_CONV, EXPAND, HEADDIM, NGROUPS, CHUNK_SIZE = 128, 4, 2, 64, 1, 256

INSTALL_HINT = ("pip install --no-build-isolation 'causal-conv1d>=1.4' 'mamba-ssm>=2.2' (see README, GPU install), "
                "or pass --allow_slow_kernels to time the slow reference path knowingly")


class Mamba2Mixer(nn.Module):
    def __init__(self, d_model: int, fused: bool, headdim: int = HEADDIM, d_state: int = D_STATE,
                 chunk_size: int = CHUNK_SIZE):
        super().__init__()
        self.d_inner = EXPAND * d_model
        self.headdim, self.d_state, self.chunk_size, self.fused = headdim, d_state, chunk_size, fused
        self.heads = self.d_inner // headdim
        conv_dim = self.d_inner + 2 * NGROUPS * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + conv_dim + self.heads, bias=False)  # [z, x, B, C, dt]
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, D_CONV, groups=conv_dim, padding=D_CONV - 1)
        self.dt_bias = nn.Parameter(self._initial_dt_bias())
        self.A_log = nn.Parameter(torch.log(torch.empty(self.heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        tag_no_weight_decay(self.dt_bias, self.A_log, self.D)

    def _initial_dt_bias(self, dt_min: float = 1e-3, dt_max: float = 1e-1) -> torch.Tensor:
        """softplus(dt_bias) log-uniform in [dt_min, dt_max] (Mamba2's init)."""
        dt = torch.exp(torch.rand(self.heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus

    def init_for_depth(self, layers: int) -> None:
        """MambaLMHeadModel's init: out_proj scaled by 1/sqrt(layers)."""
        with torch.no_grad():
            self.out_proj.weight /= math.sqrt(layers)

    def prepare(self, hidden: torch.Tensor) -> torch.Tensor:
        """The input projection, compiled with the block's norm: (B, L, D) -> zxbcdt (B, L, 2E + 2GN + H), the
        layout the fused kernel reads."""
        return self.in_proj(hidden)

    def scan(self, zxbcdt: torch.Tensor, batch: int) -> torch.Tensor:
        """Everything after the input projection: (B, L, 2E + 2GN + H) -> (B, L, D)."""
        mixer = mixer_fused if self.fused else mixer_reference
        return mixer(zxbcdt, self.conv1d.weight, self.conv1d.bias, self.dt_bias, -torch.exp(self.A_log.float()),
                     self.D, self.norm_weight, self.out_proj.weight, headdim=self.headdim, ngroups=NGROUPS,
                     chunk_size=self.chunk_size, eps=1e-5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.scan(self.prepare(hidden), hidden.shape[0])


def build(shape: dict, vocab_size: int, device_type: str, allow_slow_kernels: bool) -> CausalLM:
    fused = device_type == "cuda" and fused_kernels_available()
    if device_type == "cuda" and not fused and not allow_slow_kernels:
        raise RuntimeError(f"Mamba-2 on CUDA needs the mamba-ssm kernels, which are not importable: {INSTALL_HINT}")
    sizes = {key: shape[key] for key in ("headdim", "d_state", "chunk_size") if key in shape}  # tiny shapes
    backbone = MambaBackbone(shape["layers"], shape["d_model"], vocab_size, fused, partial(Mamba2Mixer, **sizes))
    return CausalLM(backbone, vocab_size, shape["d_model"], tie_embeddings=True,
                    kernel_path=f"{FUSED_PATH}, {ssd_kernel_choice()}" if fused else REFERENCE_PATH)


def ssd_flops_per_token(shape: dict, seq_len: int) -> float:
    """The chunked SSD's work per token and layer, forward (Dao & Gu 2024, Sec. 6, with chunk length Q):
    causal conv 2 K (E + 2 G N); within a chunk C B^T 2 Q G N and its product with the inputs 2 Q E; chunk
    states and their read-out 4 E N. x3 for training."""
    d_inner, d_state = EXPAND * shape["d_model"], shape.get("d_state", D_STATE)
    chunk = min(shape.get("chunk_size", CHUNK_SIZE), seq_len)
    forward = (2 * D_CONV * (d_inner + 2 * NGROUPS * d_state) + 2 * chunk * (NGROUPS * d_state + d_inner)
               + 4 * d_inner * d_state)
    return 3.0 * shape["layers"] * forward


def build_stock(shape: dict, vocab_size: int) -> nn.Module:
    """mamba-ssm's MambaLMHeadModel with the Mamba2 layer, its SSD kernels pinned like the harness's."""
    ssd_kernel_choice()  # mamba-ssm's first import pins its kernels
    return stock_builder("Mamba2")(shape, vocab_size)


FAMILY = ModelFamily(
    name="mamba2", display_name="Mamba-2", default_tokenizer="EleutherAI/pythia-410m", tokenizer_vocab=50_277,
    shapes=SHAPES, build=build, sequence_flops_per_token=ssd_flops_per_token,
    # device peaks 29.2, 60.3 and 78.2 GB on an H200 (docs/performance.md); at 3B the host cannot launch the
    # step's ~11,000 kernels as fast as the GPU runs them, so its forward and backward replay as a CUDA graph
    gpu_plan={"0.5B": {"micro_batch_size": 8}, "1.5B": {"micro_batch_size": 4},
              "3B": {"micro_batch_size": 1, "cuda_graphs": True}},
    pinned_kernels="mamba_ssm.ops.triton.ssd_combined",
    stock=StockReference("mamba_ssm MambaLMHeadModel (Mamba2; fused add+RMSNorm, residual in fp32)", build_stock,
                         stock_loss),
)

"""Mamba-1 (Gu & Dao 2023): selective-SSM blocks on the mamba-ssm fused kernels on CUDA, plain PyTorch on CPU.

The parameter layout and initialisation follow ``mamba_ssm.modules.mamba_simple.Mamba`` and
``MambaLMHeadModel`` (pre-norm RMSNorm residual blocks, tied embeddings), so the fused
``mamba_inner_fn`` consumes these weights directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from training_harness.lm import CausalLM, tag_no_weight_decay
from training_harness.registry import ModelFamily

_PAPER = {
    "0.5B": dict(layers=24, d_model=768),
    "1.5B": dict(layers=48, d_model=1536),
    "3B": dict(layers=64, d_model=2560),
}
SHAPES = {
    "paper": _PAPER,
    "matched": {
        "0.5B": dict(layers=48, d_model=1152),
        "1.5B": dict(layers=48, d_model=2176),
        "3B": dict(layers=64, d_model=2560),
    },
    "tiny": {size: dict(layers=2, d_model=64) for size in _PAPER},
}
D_STATE, D_CONV, EXPAND = 16, 4, 2

FUSED_PATH = "mamba_ssm fused (mamba_inner_fn: causal_conv1d + selective_scan CUDA)"
REFERENCE_PATH = "PyTorch reference selective scan (slow)"
INSTALL_HINT = ("pip install --no-build-isolation 'causal-conv1d>=1.4' 'mamba-ssm>=2.2' (see README, GPU install), "
                "or pass --allow_slow_kernels to time the slow reference path knowingly")


def fused_kernels_available() -> bool:
    try:
        import causal_conv1d  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn  # noqa: F401
    except ImportError:
        return False
    return True


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


@torch.compiler.disable  # CUDA kernels behind an autograd.Function: run eagerly inside compiled blocks
def _fused_mixer(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, A, D, dt_bias):
    """mamba-ssm's fused conv, selective scan, gate and output projection."""
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn

    return mamba_inner_fn(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, None, A,
                          None, None, D, delta_bias=dt_bias, delta_softplus=True)


class MambaMixer(nn.Module):
    def __init__(self, d_model: int, fused: bool):
        super().__init__()
        self.d_inner = EXPAND * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.fused = fused
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, D_CONV, groups=self.d_inner, padding=D_CONV - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * D_STATE, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, D_STATE + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        tag_no_weight_decay(self.A_log, self.D)
        self._init_dt()

    def _init_dt(self, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        """dt_proj so that softplus(bias) is log-uniform in [dt_min, dt_max] (mamba_simple's init)."""
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        length = hidden.shape[1]
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2E, L)
        A = -torch.exp(self.A_log.float())  # (E, N)
        if self.fused:
            return _fused_mixer(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                                self.out_proj.weight, A, self.D.float(), self.dt_proj.bias.float())
        x, z = xz.chunk(2, dim=1)  # (B, E, L) each
        x = F.silu(self.conv1d(x)[..., :length])  # causal: keep the first L outputs
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, D_STATE, D_STATE], dim=-1)
        delta = F.softplus(self.dt_proj(dt).transpose(1, 2).float())  # (B, E, L)
        y = selective_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float())
        y = y.to(hidden.dtype) * F.silu(z)
        return self.out_proj(y.transpose(1, 2))  # (B, L, D)


class MambaBlock(nn.Module):
    def __init__(self, d_model: int, fused: bool):
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.mixer = MambaMixer(d_model, fused)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.mixer(self.norm(hidden))


class MambaBackbone(nn.Module):
    def __init__(self, layers: int, d_model: int, vocab_size: int, fused: bool):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(MambaBlock(d_model, fused) for _ in range(layers))
        self.norm_f = nn.RMSNorm(d_model, eps=1e-5)
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        """MambaLMHeadModel's init: embeddings N(0, 0.02), zero linear biases, out_proj scaled by 1/sqrt(L)."""
        nn.init.normal_(self.embedding.weight, std=0.02)
        for block in self.blocks:
            mixer = block.mixer
            for linear in (mixer.in_proj, mixer.x_proj, mixer.out_proj):
                nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
            with torch.no_grad():
                mixer.out_proj.weight /= math.sqrt(layers)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(input_ids)  # (B, T, D)
        for block in self.blocks:
            hidden = block(hidden)
        return self.norm_f(hidden)


def build(shape: dict, vocab_size: int, device_type: str, allow_slow_kernels: bool) -> CausalLM:
    fused = device_type == "cuda" and fused_kernels_available()
    if device_type == "cuda" and not fused and not allow_slow_kernels:
        raise RuntimeError(f"Mamba on CUDA needs the mamba-ssm fused kernels, which are not importable: {INSTALL_HINT}")
    backbone = MambaBackbone(shape["layers"], shape["d_model"], vocab_size, fused)
    return CausalLM(backbone, vocab_size, shape["d_model"], tie_embeddings=True,
                    kernel_path=FUSED_PATH if fused else REFERENCE_PATH)


def scan_flops_per_token(shape: dict, seq_len: int) -> float:
    """Selective scan and conv, forward ~ (9 N + 2 K) x E per layer (Gu & Dao 2023, Sec. 3.3); x3 for training."""
    d_inner = EXPAND * shape["d_model"]
    return 3.0 * shape["layers"] * d_inner * (9 * D_STATE + 2 * D_CONV)


FAMILY = ModelFamily(
    name="mamba", display_name="Mamba", default_tokenizer="EleutherAI/pythia-410m", shapes=SHAPES, build=build,
    sequence_flops_per_token=scan_flops_per_token,
)

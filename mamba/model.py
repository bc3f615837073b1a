"""Mamba-1 (Gu & Dao 2023): selective-SSM blocks on the mamba-ssm fused kernels on CUDA, plain PyTorch on CPU.

The parameter layout and initialisation follow ``mamba_ssm.modules.mamba_simple.Mamba`` and
``MambaLMHeadModel`` (pre-norm RMSNorm residual blocks, tied embeddings), so the fused
``mamba_inner_fn`` consumes these weights directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba.selective_scan import (
    FUSED_PATH,
    REFERENCE_PATH,
    InputProjection,
    fused_kernels_available,
    mixer_fused,
    mixer_reference,
)
from training_harness.lm import CausalLM, products_dtype, tag_no_weight_decay
from training_harness.registry import ModelFamily, StockReference

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

INSTALL_HINT = ("pip install --no-build-isolation 'causal-conv1d>=1.4' 'mamba-ssm>=2.2' (see README, GPU install), "
                "or pass --allow_slow_kernels to time the slow reference path knowingly")


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

    def init_for_depth(self, layers: int) -> None:
        """MambaLMHeadModel's init of the projections: out_proj scaled by 1/sqrt(layers)."""
        for linear in (self.in_proj, self.x_proj, self.out_proj):
            nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
        with torch.no_grad():
            self.out_proj.weight /= math.sqrt(layers)

    def prepare(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, D) as rows (B*L, D) in the products' dtype (autocast's where it is on), compiled with the
        block's norm. The input projection itself runs in ``scan``: its backward is the harness's own."""
        return hidden.reshape(-1, hidden.shape[-1]).to(products_dtype(hidden))

    def scan(self, rows: torch.Tensor, batch: int) -> torch.Tensor:
        """The input projection and everything after it: rows (B*L, D) -> (B, L, D).

        The kernels read xz as (B, 2E, L) with the sequence dimension contiguous, a view of the projection's
        (2E, B*L) output, and write its gradient in the same layout (as mamba_simple does): no transposing copy
        either way."""
        xz = InputProjection.apply(rows, self.in_proj.weight)
        xz = xz.view(xz.shape[0], batch, -1).transpose(0, 1)
        mixer = mixer_fused if self.fused else mixer_reference
        return mixer(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                     self.out_proj.weight, -torch.exp(self.A_log.float()), self.D.float(), self.dt_proj.bias.float())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.scan(self.prepare(hidden), hidden.shape[0])


class MambaBlock(nn.Module):
    """Pre-norm residual block in mamba-ssm's form: the residual stream (float32) is carried beside the mixer's
    output, and each block begins with the previous block's residual add, so that add, the norm and the mixer's
    ``prepare`` form one compiled region before the kernels."""

    def __init__(self, d_model: int, fused: bool, mixer_class: Callable[[int, bool], nn.Module] = MambaMixer):
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.mixer = mixer_class(d_model, fused)  # prepare(hidden) -> prepared (compiled); scan(prepared, batch)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        prepared, residual = self.prepare(hidden, residual)
        return self.mixer.scan(prepared, hidden.shape[0]), residual

    def prepare(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # the first block copies the embedding: handing back its own input would hand FSDP2 a view to hook
        residual = hidden.to(torch.float32, copy=True) if residual is None else (residual + hidden).float()
        return self.mixer.prepare(self.norm(residual.to(self.norm.weight.dtype))), residual

    def compile_regions(self, **kwargs) -> None:
        """One whole graph before the kernel; the kernel runs eagerly and nothing follows it in the block."""
        self.prepare = torch.compile(self.prepare, fullgraph=True, **kwargs)


class MambaBackbone(nn.Module):
    """Embedding, residual blocks of ``mixer_class`` (Mamba-1's, or Mamba-2's), final norm."""

    def __init__(self, layers: int, d_model: int, vocab_size: int, fused: bool,
                 mixer_class: Callable[[int, bool], nn.Module] = MambaMixer):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(MambaBlock(d_model, fused, mixer_class) for _ in range(layers))
        self.norm_f = nn.RMSNorm(d_model, eps=1e-5)
        nn.init.normal_(self.embedding.weight, std=0.02)  # MambaLMHeadModel's init
        for block in self.blocks:
            block.mixer.init_for_depth(layers)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embedding(input_ids), None  # (B, T, D)
        for block in self.blocks:
            hidden, residual = block(hidden, residual)
        return self.norm_f((residual + hidden).to(self.norm_f.weight.dtype))


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


def stock_builder(layer: str) -> Callable[[dict, int], nn.Module]:
    """mamba-ssm's MambaLMHeadModel with ``layer`` ("Mamba1", "Mamba2") and its defaults: fused add + RMSNorm
    (Triton), residual in float32."""
    def build_stock(shape: dict, vocab_size: int) -> nn.Module:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        return MambaLMHeadModel(MambaConfig(d_model=shape["d_model"], n_layer=shape["layers"], vocab_size=vocab_size,
                                            ssm_cfg={"layer": layer}, rms_norm=True, fused_add_norm=True,
                                            residual_in_fp32=True))

    return build_stock


def stock_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """MambaLMHeadModel returns logits only: cross-entropy of the float logits, labels shifted by one."""
    logits = model(tokens).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


FAMILY = ModelFamily(
    name="mamba", display_name="Mamba", default_tokenizer="EleutherAI/pythia-410m", tokenizer_vocab=50_277,
    shapes=SHAPES, build=build, sequence_flops_per_token=scan_flops_per_token,
    gpu_plan={"0.5B": {"micro_batch_size": 4, "working_weights": True},  # change 45
              "1.5B": {"micro_batch_size": 4},
              "3B": {"micro_batch_size": 1, "working_weights": True}},  # change 41
    published_ranks={"ppl": 2, "amu_gb": 1, "al_s_per_iter": 1, "tt_tokens_per_param_s": 4, "aec_w": 1},
    stock=StockReference("mamba_ssm MambaLMHeadModel (Mamba1; fused add+RMSNorm, residual in fp32)",
                         stock_builder("Mamba1"), stock_loss),
)

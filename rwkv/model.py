"""RWKV-7 "Goose": the x070 time mix (WKV-7 recurrence, value residual, gates) and the squared-ReLU channel mix.

Structure and initialisation follow the official RWKV-7 training code (BlinkDL/RWKV-LM, RWKV-v7,
Apache-2.0); the recurrence runs on flash-linear-attention's chunked kernel on CUDA and on the
float32 reference in ``wkv7.py`` on CPU.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkv.wkv7 import (
    CHUNK_STATES_FLA_VERSION,
    REFERENCE_PATH,
    fla_available,
    fla_kernel_choice,
    fla_path,
    keeps_chunk_states,
    wkv7_fla,
    wkv7_reference,
)
from training_harness.lm import CausalLM, tag_no_weight_decay
from training_harness.registry import ModelFamily, StockReference

HEAD_SIZE = 64
_PAPER = {
    "0.5B": dict(layers=24, d_model=1024),
    "1.5B": dict(layers=32, d_model=2048),
    "3B": dict(layers=40, d_model=2560),
}
SHAPES = {
    "paper": _PAPER,
    "matched": {
        "0.5B": dict(layers=28, d_model=1024),
        "1.5B": dict(layers=26, d_model=2048),
        "3B": dict(layers=36, d_model=2560),
    },
    "tiny": {size: dict(layers=2, d_model=128) for size in _PAPER},
}
INSTALL_HINT = ("pip install --no-build-isolation 'flash-linear-attention>=0.6' (see README, GPU install), "
                "or pass --allow_slow_kernels to time the slow reference path knowingly")


def _lora_rank(d_model: int, scale: float, power: float) -> int:
    """The official x070 low-rank sizes: a multiple of 32, at least 32."""
    return max(32, int(round(scale * d_model ** power / 32)) * 32)


def time_shift(x: torch.Tensor) -> torch.Tensor:
    """The previous token's vector at every position (zeros at t = 0). x: (B, T, C)."""
    return F.pad(x, (0, 0, 1, -1))


class LowRank(nn.Module):
    """x -> act(down(x)) -> up, the LoRA-shaped projections of the time mix. Linear layers, so that the FLOP
    count (``matmul_params``) sees them."""

    def __init__(self, d_model: int, rank: int, activation=None):
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, d_model, bias=False)
        nn.init.zeros_(self.down.weight)
        nn.init.orthogonal_(self.up.weight, gain=0.1)
        self.activation = activation

    def forward(self, x):
        hidden = self.down(x)
        return self.up(self.activation(hidden) if self.activation else hidden)


class TimeMix(nn.Module):
    """The x070 time mix, in three steps that ``RWKV7Block`` drives: ``prepare``, ``wkv`` (the recurrence) and
    ``readout``, so that the code on each side of the kernel compiles as one graph."""

    def __init__(self, d_model: int, layer: int, layers: int, fused: bool):
        super().__init__()
        self.heads = d_model // HEAD_SIZE
        self.layer = layer
        self.fused = fused
        self.keep_in_chunk_terms = False  # RWKV7Backbone.keep_recurrence_terms
        ratio_0_to_1 = layer / max(1, layers - 1)
        ratio_1_to_almost0 = 1.0 - layer / layers
        position = torch.arange(d_model) / d_model
        # Token-shift mixing coefficients: early layers lean on the previous token more.
        mix = {name: 1.0 - position ** (p * ratio_1_to_almost0)
               for name, p in (("r", 0.2), ("w", 0.9), ("k", 0.7), ("v", 0.7), ("a", 0.9), ("g", 0.2))}
        # Per-channel vectors are 1-D and broadcast over (B, T, C): with (1, 1, C) parameters, inductor's
        # backward of a compiled block returned (C,) gradients (torch 2.11, H200).
        self.mix = nn.ParameterDict({name: nn.Parameter(value) for name, value in mix.items()})

        linear = torch.arange(d_model) / (d_model - 1) - 0.5
        in_head = torch.arange(d_model) % HEAD_SIZE
        zigzag = (in_head - (HEAD_SIZE - 1) / 2) / ((HEAD_SIZE - 1) / 2)
        zigzag = zigzag * zigzag.abs()
        decay_speed = -6 + 6 * (torch.arange(d_model) / (d_model - 1)) ** (1 + ratio_0_to_1 ** 0.3)
        self.w0 = nn.Parameter(decay_speed + 0.5 + zigzag * 2.5)
        self.a0 = nn.Parameter(-0.19 + zigzag * 0.3 + linear * 0.4)
        # Layer 0's values are the residual source itself: no value-residual gate there.
        self.v0 = nn.Parameter(0.73 - linear * 0.4) if layer > 0 else None
        self.k_k = nn.Parameter(0.71 - linear * 0.1)
        self.k_a = nn.Parameter(torch.full((d_model,), 1.02))
        self.r_k = nn.Parameter(torch.full((self.heads, HEAD_SIZE), -0.04))
        tag_no_weight_decay(*self.mix.values(), self.w0, self.a0, self.k_k, self.k_a, self.r_k)
        if self.v0 is not None:
            tag_no_weight_decay(self.v0)

        decay_rank = _lora_rank(d_model, 1.8, 0.5)
        self.w_lora = LowRank(d_model, decay_rank, torch.tanh)
        self.a_lora = LowRank(d_model, decay_rank)
        self.v_lora = LowRank(d_model, _lora_rank(d_model, 1.3, 0.5)) if layer > 0 else None
        self.g_lora = LowRank(d_model, _lora_rank(d_model, 0.6, 0.8), torch.sigmoid)

        self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.output = nn.Linear(d_model, d_model, bias=False)
        bound = 1 / math.sqrt(d_model)
        nn.init.uniform_(self.receptance.weight, -0.5 * bound, 0.5 * bound)
        nn.init.uniform_(self.key.weight, -0.05 * bound, 0.05 * bound)
        nn.init.uniform_(self.value.weight, -0.5 * bound, 0.5 * bound)
        nn.init.zeros_(self.output.weight)  # each block starts as identity
        self.ln_x = nn.GroupNorm(self.heads, d_model, eps=64e-5)
        with torch.no_grad():
            self.ln_x.weight.fill_(((1 + layer) / layers) ** 0.7)

    def prepare(self, x: torch.Tensor, v_first: torch.Tensor | None):
        """Everything before the recurrence: (r, w, k, v, a, b) for ``wkv``, the output gate and v_first."""
        batch, length, channels = x.shape
        heads = (batch, length, self.heads, HEAD_SIZE)
        delta = time_shift(x) - x
        xr, xw, xk, xv, xa, xg = (x + delta * self.mix[name] for name in "rwkvag")
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        # log decay in [-exp(-0.5), 0): the official -exp(-softplus(-z) - 0.5), written as a sigmoid
        log_w = -math.exp(-0.5) * torch.sigmoid((self.w0 + self.w_lora(xw)).float())
        if v_first is None:
            v_first = v  # layer 0's values feed every later layer (value residual)
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + self.v_lora(xv))
        iclr = torch.sigmoid(self.a0 + self.a_lora(xa))  # in-context learning rate
        gate = self.g_lora(xg)
        kk = F.normalize((k * self.k_k).view(heads), dim=-1)  # (B, T, H, N)
        k = k * (1 + (iclr - 1) * self.k_a)
        r, k, v, iclr = (t.view(heads) for t in (r, k, v, iclr))
        inputs = (r, log_w.view(heads), k, v, -kk, kk * iclr)
        if self.fused:  # the kernel wants one dtype; fp32 parameters have promoted some of these
            inputs = tuple(t.to(r.dtype) for t in inputs)
        return inputs, gate, v_first

    def wkv(self, r, w, k, v, a, b) -> torch.Tensor:
        """The recurrence: fla's kernel, or the reference. (B, T, H, N) in and out."""
        if self.fused:
            return wkv7_fla(r, w, k, v, a, b, self.keep_in_chunk_terms)
        return wkv7_reference(r, w, k, v, a, b)[0]

    def readout(self, out: torch.Tensor, inputs: tuple, gate: torch.Tensor) -> torch.Tensor:
        """Per-head normalization, the r.k bonus, the gate and the output projection. out: (B, T, H, N)."""
        r, _, k, v, _, _ = inputs
        batch, length, channels = gate.shape
        out = self.ln_x(out.reshape(batch * length, channels).to(gate.dtype)).view(batch, length, channels)
        bonus = ((r * k * self.r_k).sum(-1, keepdim=True) * v).view(batch, length, channels)
        return self.output((out + bonus) * gate)


class ChannelMix(nn.Module):
    def __init__(self, d_model: int, layer: int, layers: int):
        super().__init__()
        position = torch.arange(d_model) / d_model
        self.mix_k = nn.Parameter(1.0 - position ** ((1.0 - layer / layers) ** 4))
        tag_no_weight_decay(self.mix_k)
        self.key = nn.Linear(d_model, 4 * d_model, bias=False)
        self.value = nn.Linear(4 * d_model, d_model, bias=False)
        bound = 1 / math.sqrt(d_model)
        nn.init.uniform_(self.key.weight, -0.5 * bound, 0.5 * bound)
        nn.init.zeros_(self.value.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = x + (time_shift(x) - x) * self.mix_k
        return self.value(torch.relu(self.key(mixed)) ** 2)


class RWKV7Block(nn.Module):
    def __init__(self, d_model: int, layer: int, layers: int, fused: bool):
        super().__init__()
        self.ln0 = nn.LayerNorm(d_model) if layer == 0 else None  # normalizes the embedding
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.att = TimeMix(d_model, layer, layers, fused)
        self.ffn = ChannelMix(d_model, layer, layers)

    def forward(self, x: torch.Tensor, v_first: torch.Tensor | None):
        """The block's output and, from the first block only, the values every later block mixes in: a block
        that handed back its v_first input would hand FSDP2 a view of it to hook."""
        x, inputs, gate, values = self.before_wkv(x, v_first)
        return self.after_wkv(x, self.att.wkv(*inputs), inputs, gate), (values if v_first is None else None)

    def before_wkv(self, x: torch.Tensor, v_first: torch.Tensor | None):
        if self.ln0 is not None:
            x = self.ln0(x)
        return x, *self.att.prepare(self.ln1(x), v_first)

    def after_wkv(self, x: torch.Tensor, out: torch.Tensor, inputs: tuple, gate: torch.Tensor) -> torch.Tensor:
        x = x + self.att.readout(out, inputs, gate)
        return x + self.ffn(self.ln2(x))

    def compile_regions(self, **kwargs) -> None:
        """Two whole graphs around the recurrence, which runs eagerly: compiling the block instead leaves
        dynamo to split it at the kernel call, and most of the block then ran eagerly (profiled, H200)."""
        self.before_wkv = torch.compile(self.before_wkv, fullgraph=True, **kwargs)
        self.after_wkv = torch.compile(self.after_wkv, fullgraph=True, **kwargs)


class RWKV7Backbone(nn.Module):
    def __init__(self, layers: int, d_model: int, vocab_size: int, fused: bool):
        super().__init__()
        if d_model % HEAD_SIZE:
            raise ValueError(f"RWKV-7 needs d_model divisible by the head size {HEAD_SIZE}, got {d_model}")
        self.embedding = nn.Embedding(vocab_size, d_model)
        nn.init.uniform_(self.embedding.weight, -1e-4, 1e-4)
        self.blocks = nn.ModuleList(RWKV7Block(d_model, i, layers, fused) for i in range(layers))
        self.ln_out = nn.LayerNorm(d_model)

    def keep_recurrence_terms(self) -> None:
        """Every block's recurrence keeps its in-chunk terms for the backward instead of recomputing them
        (``rwkv.wkv7.ChunkWKV7``): about 5 % of a block's time for 0.74 GB per 32,768 tokens. Only fla's kernels
        recompute them; the reference path keeps everything anyway."""
        if self.blocks[0].att.fused and not keeps_chunk_states():
            warnings.warn(f"keep_recurrence_terms keeps nothing with this flash-linear-attention release (its "
                          f"chunk_rwkv7 recomputes them); it needs {CHUNK_STATES_FLA_VERSION}", stacklevel=2)
        for block in self.blocks:
            block.att.keep_in_chunk_terms = True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x, v_first = self.embedding(input_ids), None  # (B, T, C)
        for block in self.blocks:
            x, first_values = block(x, v_first)
            v_first = first_values if v_first is None else v_first
        return self.ln_out(x)


def build(shape: dict, vocab_size: int, device_type: str, allow_slow_kernels: bool) -> CausalLM:
    fused = device_type == "cuda" and fla_available()
    if device_type == "cuda" and not fused and not allow_slow_kernels:
        raise RuntimeError(f"RWKV-7 on CUDA needs flash-linear-attention, which is not importable: {INSTALL_HINT}")
    if fused and not keeps_chunk_states():
        warnings.warn(f"RWKV-7 keeps its chunk states for the backward only with flash-linear-attention "
                      f"{CHUNK_STATES_FLA_VERSION}; with this release it runs fla's chunk_rwkv7, about 10 % slower in "
                      f"its recurrence (docs/performance.md, change 50). pip install "
                      f"flash-linear-attention=={CHUNK_STATES_FLA_VERSION} for the measured speed", stacklevel=2)
    backbone = RWKV7Backbone(shape["layers"], shape["d_model"], vocab_size, fused)
    model = CausalLM(backbone, vocab_size, shape["d_model"], tie_embeddings=False,
                     kernel_path=f"{fla_path()}, {fla_kernel_choice()}" if fused else REFERENCE_PATH,
                     head_init_std=None)
    # The official head init: orthogonal, gain 0.5 * sqrt(V / C).
    nn.init.orthogonal_(model.lm_head.weight, gain=0.5 * math.sqrt(max(1.0, vocab_size / shape["d_model"])))
    return model


def wkv_flops_per_token(shape: dict, seq_len: int) -> float:
    """WKV-7 state update and readout: ~10 K x V per head per token forward (decay, a^T S, rank-1 updates,
    S^T r), x3 for training; independent of the sequence length."""
    heads = shape["d_model"] // HEAD_SIZE
    return 3.0 * shape["layers"] * heads * 10 * HEAD_SIZE * HEAD_SIZE


def build_stock(shape: dict, vocab_size: int) -> nn.Module:
    """flash-linear-attention's RWKV7ForCausalLM with its defaults (fused norms and cross-entropy), its kernels
    pinned like the harness's (training_harness/kernel_pins.py)."""
    fla_kernel_choice()  # fla's first import pins its kernels, fla.models' among them
    from fla.models import RWKV7Config, RWKV7ForCausalLM

    return RWKV7ForCausalLM(RWKV7Config(hidden_size=shape["d_model"], num_hidden_layers=shape["layers"],
                                        head_dim=HEAD_SIZE, vocab_size=vocab_size))


def stock_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """fla's own loss: labels shifted by one, its fused cross-entropy."""
    return model(input_ids=tokens, labels=tokens).loss


FAMILY = ModelFamily(
    name="rwkv", display_name="RWKV-7", default_tokenizer="EleutherAI/pythia-410m", tokenizer_vocab=50_277,
    shapes=SHAPES, build=build, sequence_flops_per_token=wkv_flops_per_token,
    # device peaks 73.5, 78.6 and 78.9 GB on an H200 (docs/performance.md); replaying each step as a CUDA graph,
    # without the host's gaps between launches, gave 1.5 %, 2-3 % and 13 % more tokens/s. At 0.5B and 1.5B the
    # compiled regions give up activations (at 0.5B for 2 % of the step), and the recurrence's kept in-chunk terms
    # take that memory to save more: 3.4-3.5 % and 1.6 % in all (changes 55 and 56); bf16 working weights add
    # 0.3 % and 1.5-1.8 % (changes 52 and 56), cast once a step for two and four micro-batches
    gpu_plan={"0.5B": {"micro_batch_size": 4, "cuda_graphs": True, "working_weights": True,
                       "activation_memory_budget": 0.7, "keep_recurrence_terms": True},
              "1.5B": {"micro_batch_size": 1, "cuda_graphs": True, "working_weights": True,
                       "activation_memory_budget": 0.7, "keep_recurrence_terms": True},
              "3B": {"micro_batch_size": 1, "activation_checkpointing": True, "checkpoint_blocks": 32,
                     "cuda_graphs": True}},
    published_ranks={"ppl": 3, "amu_gb": 2, "al_s_per_iter": 2, "tt_tokens_per_param_s": 2, "aec_w": 2},
    pinned_kernels="fla.ops.rwkv7",
    stock=StockReference("flash-linear-attention RWKV7ForCausalLM (fused norms and cross-entropy)", build_stock,
                         stock_loss),
)

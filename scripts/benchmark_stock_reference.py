#!/usr/bin/env python3
"""The naive reference the harness is compared with: each family's stock implementation at the 0.5B paper
shapes, bf16 weights, fused AdamW, eager, one 8192-token sequence per step, the library's own loss.

    python scripts/benchmark_naive_reference.py --family qwen [--steps 10] [--seq_len 8192] [--device cuda]
        [--profile_steps 3]

Stock implementations: transformers' Qwen2ForCausalLM and GPTNeoXForCausalLM, mamba-ssm's
MambaLMHeadModel (Mamba-1), flash-linear-attention's RWKV7ForCausalLM. Prints one JSON line.
``--profile_steps`` adds the GPU's kernel time per step (torch.profiler, after the timed steps): far below
the wall time per step means the host, not the GPU, sets the speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = {"qwen": 151_936, "pythia": 50_304, "mamba": 50_304, "rwkv": 50_304}


def build(family: str) -> torch.nn.Module:
    if family == "qwen":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(
            vocab_size=VOCAB[family], hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, attn_implementation="sdpa",
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}))
    if family == "pythia":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        return GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=VOCAB[family], hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
            intermediate_size=4096, max_position_embeddings=8192, attn_implementation="sdpa",
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.25}))
    if family == "mamba":
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        return MambaLMHeadModel(MambaConfig(d_model=768, n_layer=24, vocab_size=VOCAB[family],
                                            ssm_cfg={"layer": "Mamba1"}))
    if family == "rwkv":
        from rwkv.kernel_configs import import_fla_with_pinned_configs

        # The chunk kernels take the configurations autotuning chose for the harness (minutes saved);
        # the layer's other kernels autotune as usual.
        import_fla_with_pinned_configs("fla.models")
        from fla.models import RWKV7Config, RWKV7ForCausalLM

        return RWKV7ForCausalLM(RWKV7Config(hidden_size=1024, num_hidden_layers=24, head_dim=64,
                                            vocab_size=VOCAB[family]))
    raise ValueError(f"unknown family {family!r}")


def loss_of(family: str, model, tokens: torch.Tensor) -> torch.Tensor:
    if family == "mamba":  # MambaLMHeadModel returns logits only
        logits = model(tokens).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    return model(input_ids=tokens, labels=tokens).loss  # the library shifts the labels by one


def gpu_kernel_time(step: Callable[[], None], steps: int) -> tuple[float, int]:
    """Seconds of CUDA kernel time per step and kernels per step over ``steps`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / steps / 1e6, round(len(kernels) / steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(VOCAB))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq_len", type=int, default=8192)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--profile_steps", type=int, default=0, help="steps to profile after the timed ones (CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.profile_steps and device.type != "cuda":
        parser.error("--profile_steps measures CUDA kernel time; it needs --device cuda")
    torch.manual_seed(0)
    model = build(args.family).to(device=device, dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(0, VOCAB[args.family], (1, args.seq_len), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        loss_of(args.family, model, tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
    row = {"family": args.family, "variant": "naive", "params_m": round(sum(p.numel() for p in model.parameters())
                                                                          / 1e6, 1),
           "tokens_per_s": args.seq_len / step_s, "s_per_step": step_s, "first_step_s": times[0],
           "step_s": [round(t, 4) for t in times],
           "peak_alloc_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}
    if args.profile_steps:
        row["gpu_kernel_s_per_step"], row["kernels_per_step"] = gpu_kernel_time(step, args.profile_steps)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Fused kernels against what the harness runs today, on one GPU (needs CUDA).

    python scripts/benchmark_fused_kernels.py [--rounds 2] [--output FILE]

Five parts, each timed with CUDA events over repeated calls after a warm-up, in rounds, the spread reported:
- loss: the cross-entropy and its gradient over one (4096, vocabulary) chunk of bf16 logits, as the output
  head's loss computes them, for Qwen2.5's and GPT-NeoX's vocabularies: the reference compiled as the harness
  compiles it (``CausalLM.compile_regions``), the Triton kernel (``training_harness/cross_entropy_kernel.py``) at
  several tile sizes, and liger-kernel's cross-entropy kernel where that package is installed.
- blocks (with liger-kernel installed): forward and backward of four Qwen2.5 0.5B blocks under bf16 autocast
  over fp32 weights, micro-batch 4 at 8192 tokens, compiled per block as the harness compiles them, with
  transformers' RMSNorm, SwiGLU MLP and rotary embedding, then with liger-kernel's in their place.
- wgrad: the weight-gradient products of Mamba 3B's input and output projections at micro-batch 1 (8192 tokens),
  and of Qwen2.5 0.5B's output head over one loss chunk, as a float32 gradient sum takes them: a bf16 product
  that is then cast (the first micro-batch or chunk) or added (the others), against the product adding itself
  into the sum in cuBLAS (``weight_gradient`` for working weights, change 42; ``add_product`` in the loss, 44).
- head: the whole output head's loss, forward and backward (``linear_cross_entropy`` under bf16 autocast over a
  float32 weight), over one 0.5B micro-batch of 32,768 tokens at the shapes of Qwen2.5, Pythia and Mamba, in
  chunks of 4096 to 32,768 tokens (``--loss_chunk_tokens``), with the allocator's peak above its inputs.
- wkv (with flash-linear-attention installed): RWKV-7's recurrence, forward and backward at the 0.5B, 1.5B and
  3B plans' micro-batches: fla's ``chunk_rwkv7``, whose backward recomputes the forward's intermediates, against
  ``rwkv.wkv7.ChunkWKV7``, which keeps the chunk states; with the memory each keeps for its backward.
Prints one line per measurement and writes them as JSON (default: docs/benchmarks/fused_kernels_<gpu>.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from efficientllm_metrics import write_json_atomic  # noqa: E402
from training_harness.lm import linear_cross_entropy, softmax_cross_entropy_grad  # noqa: E402
from training_harness.working_weights import WorkingWeights, weight_gradient  # noqa: E402

VOCABULARIES = {"qwen2.5": 151_936, "gpt-neox-20b": 50_304}
CHUNK_TOKENS = 4096
#: The output heads of the 0.5B plans: vocabulary rows and width; tokens per micro-batch (4 x 8192).
HEADS = {"Qwen2.5 0.5B": (151_936, 896), "Pythia 0.5B": (50_304, 1024), "Mamba 0.5B": (50_304, 768)}
HEAD_TOKENS = 32_768
HEAD_CHUNKS = (4096, 8192, 16_384, 32_768)
#: RWKV-7's recurrence at the plans' micro-batches: (sequences, heads) of 8192 tokens, head size 64.
WKV_CASES = {"RWKV-7 0.5B, micro-batch 4": (4, 16), "RWKV-7 1.5B, micro-batch 1": (1, 32),
             "RWKV-7 3B, micro-batch 1": (1, 40)}
KERNEL_TILES = [(4096, 8), (8192, 8), (8192, 16), (16384, 16), (16384, 32), (32768, 32)]


def time_ms(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def loss_candidates() -> dict[str, Callable]:
    """name -> fn(logits, labels) returning (loss sum, gradient); the in-place ones get a fresh copy each call."""
    from training_harness import cross_entropy_kernel  # Triton: imported only where it runs

    compiled = torch.compile(softmax_cross_entropy_grad)
    candidates = {"reference compiled": compiled}
    for block, warps in KERNEL_TILES:
        candidates[f"kernel {block}x{warps}"] = (
            lambda x, y, b=block, w=warps: cross_entropy_kernel.softmax_cross_entropy_grad_(
                x, y, block_columns=b, num_warps=w))
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.ops.cross_entropy import cross_entropy_forward

        def liger(x, y):
            x = x.detach().requires_grad_()  # the same storage; without requires_grad liger skips the gradient
            loss, _, _, _, grad = cross_entropy_forward(x, y, None, -100, 0.0, 0.0, "sum", None, False)
            return loss, grad
        candidates["liger-kernel cross_entropy"] = liger
    return candidates


def bench_loss(rounds: int, reps: int) -> list[dict]:
    return [row for name, vocab in VOCABULARIES.items() for row in bench_loss_case(f"{name} V={vocab}", vocab,
                                                                                    rounds, reps)]


def bench_loss_case(case: str, vocab: int, rounds: int, reps: int) -> list[dict]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(CHUNK_TOKENS, vocab, device="cuda", generator=generator)).to(torch.bfloat16)
    labels = torch.randint(vocab, (CHUNK_TOKENS,), device="cuda", generator=generator)
    ref_loss, ref_grad = softmax_cross_entropy_grad(logits, labels)
    scratch = torch.empty_like(logits)
    rows = []
    for candidate, fn in loss_candidates().items():
        def call(fn=fn):
            scratch.copy_(logits)  # every candidate pays the copy, so the in-place ones start from the logits
            return fn(scratch, labels)
        loss, grad = call()
        error = {"loss_rel": abs(float(loss) / float(ref_loss) - 1),
                 "grad_max_abs": float((grad.float() - ref_grad.float()).abs().max())}
        times = [time_ms(call, reps) for _ in range(rounds)]
        rows.append(record("loss", case, candidate, times, error))
    copy = [time_ms(lambda: scratch.copy_(logits), reps) for _ in range(rounds)]
    rows.append(record("loss", case, "the copy alone (in every row above)", copy, {}))
    return rows


def bench_blocks(rounds: int, reps: int) -> list[dict]:
    if importlib.util.find_spec("liger_kernel") is None:
        print("blocks: liger-kernel is not installed, skipped")
        return []
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    transformers_rope = qwen2.apply_rotary_pos_emb
    rows = []
    for variant in ("transformers", "liger rms_norm", "liger swiglu", "liger rms_norm+swiglu+rope"):
        try:
            step = qwen_blocks_step(variant)
            times = [time_ms(step, reps) for _ in range(rounds)]
        finally:
            qwen2.apply_rotary_pos_emb = transformers_rope  # a variant may have swapped liger's in
        rows.append(record("blocks", "Qwen2.5 0.5B, 4 blocks, micro-batch 4 x 8192", variant, times, {}))
        torch.compiler.reset()
    return rows


def qwen_blocks_step(variant: str) -> Callable[[], None]:
    import transformers.models.qwen2.modeling_qwen2 as qwen2
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    from qwen.model import SHAPES, hf_config
    from training_harness.lm import register_causal_sdpa

    config = hf_config({**SHAPES["paper"]["0.5B"], "layers": 4}, 151_936)
    config._attn_implementation = register_causal_sdpa()
    if "rope" in variant:
        qwen2.apply_rotary_pos_emb = liger_rotary_pos_emb  # bench_blocks puts transformers' back
    layers = torch.nn.ModuleList(qwen2.Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers)).cuda()
    for layer in layers:
        if "rms_norm" in variant:
            layer.input_layernorm = LigerRMSNorm(config.hidden_size, eps=config.rms_norm_eps).cuda()
            layer.post_attention_layernorm = LigerRMSNorm(config.hidden_size, eps=config.rms_norm_eps).cuda()
        if "swiglu" in variant:
            layer.mlp = LigerSwiGLUMLP(config).cuda()
        layer.compile()
    rotary = qwen2.Qwen2RotaryEmbedding(config).cuda()
    hidden = torch.randn(4, 8192, config.hidden_size, device="cuda", requires_grad=True)
    positions = torch.arange(8192, device="cuda").unsqueeze(0)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            position_embeddings = rotary(hidden, positions)
            x = hidden
            for layer in layers:
                x = layer(x, position_embeddings=position_embeddings)
                x = x[0] if isinstance(x, tuple) else x  # transformers releases differ here
        x.float().square().mean().backward()
    return step


def bench_weight_gradients(rounds: int, reps: int) -> list[dict]:
    tokens, d_model, d_inner = 8192, 2560, 5120
    generator = torch.Generator(device="cuda").manual_seed(0)

    def bf16(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=generator).to(torch.bfloat16)

    cases = {"in_proj: (2E, L) @ (L, D)": (bf16(2 * d_inner, tokens), bf16(tokens, d_model)),
             "out_proj: (D, L) @ (L, E), a transposed view": (bf16(tokens, d_model).t(), bf16(d_inner, tokens).t()),
             "Qwen2.5 0.5B head: (V, N) @ (N, D), transposed": (bf16(CHUNK_TOKENS, VOCABULARIES["qwen2.5"]).t(),
                                                                bf16(CHUNK_TOKENS, 896))}
    return [row for case, (left, right) in cases.items()
            for row in bench_weight_gradient_case(case, left, right, rounds, reps)]


def bench_weight_gradient_case(case: str, left: torch.Tensor, right: torch.Tensor, rounds: int,
                               reps: int) -> list[dict]:
    exact = left.double() @ right.double()
    weight = torch.nn.Parameter(torch.zeros(exact.shape, device="cuda"))
    WorkingWeights([weight])  # the float32 sum that weight_gradient adds into, kept by the parameter
    weight_gradient(weight, left, right)  # the sum exists from here on: every later call adds into it
    total = torch.zeros(exact.shape, device="cuda")
    candidates = {"bf16 product": lambda: left @ right,
                  "bf16 product, cast to start a sum": lambda: (left @ right).float(),
                  "bf16 product, added into the sum": lambda: total.add_(left @ right),
                  "float32 product starting a sum": lambda: torch.mm(left, right, out_dtype=torch.float32),
                  "weight_gradient: added into the sum by cuBLAS": lambda: weight_gradient(weight, left, right)}
    rows = []
    for candidate, fn in candidates.items():
        error = {}
        if candidate in ("bf16 product", "float32 product starting a sum"):  # one product against float64's
            error["rel_error"] = float((fn().double() - exact).norm() / exact.norm())
        rows.append(record("wgrad", case, candidate, [time_ms(fn, reps) for _ in range(rounds)], error))
    return rows


def bench_heads(rounds: int, reps: int) -> list[dict]:
    return [row for case, (vocab, d_model) in HEADS.items() for row in bench_head_case(case, vocab, d_model,
                                                                                        rounds, reps)]


def bench_head_case(case: str, vocab: int, d_model: int, rounds: int, reps: int) -> list[dict]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.nn.Parameter(0.02 * torch.randn(vocab, d_model, device="cuda", generator=generator))
    hidden = torch.randn(HEAD_TOKENS, d_model, device="cuda", generator=generator).to(torch.bfloat16)
    hidden.requires_grad_()
    labels = torch.randint(vocab, (HEAD_TOKENS,), device="cuda", generator=generator)
    rows, reference = [], None
    for chunk in HEAD_CHUNKS:
        def step(chunk=chunk):
            weight.grad = hidden.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
            loss.backward()
            return loss

        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss = step()
        facts = {"peak_gb_above_inputs": (torch.cuda.max_memory_allocated() - start) / 1e9}
        if reference is None:
            reference = loss.item(), weight.grad.clone()
        facts["loss_rel_to_4096"] = abs(loss.item() / reference[0] - 1)
        facts["grad_rel_to_4096"] = float((weight.grad - reference[1]).norm() / reference[1].norm())
        rows.append(record("head", case, f"chunks of {chunk} tokens", [time_ms(step, reps) for _ in range(rounds)],
                           facts))
    return rows


def bench_wkv(rounds: int, reps: int) -> list[dict]:
    if importlib.util.find_spec("fla") is None:
        print("wkv: flash-linear-attention is not installed, skipped")
        return []
    return [row for case, (batch, heads) in WKV_CASES.items() for row in bench_wkv_case(case, batch, heads, rounds,
                                                                                          reps)]


def bench_wkv_case(case: str, batch: int, heads: int, rounds: int, reps: int) -> list[dict]:
    from rwkv.wkv7 import LOG_DECAY_LOWER_BOUND, fla_kernel_choice, fla_path, keeps_chunk_states, wkv7_fla

    fla_kernel_choice()  # the harness's pinned kernel table, for both candidates
    from fla.ops.rwkv7 import chunk_rwkv7

    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, 8192, heads, 64)
    r, k, v, kk, iclr, decay = (torch.randn(shape, device="cuda", generator=generator) for _ in range(6))
    kk = torch.nn.functional.normalize(kk, dim=-1)
    inputs = [t.to(torch.bfloat16).requires_grad_() for t in (
        r, LOG_DECAY_LOWER_BOUND * torch.sigmoid(decay), k, v, -kk, kk * torch.sigmoid(iclr))]
    d_output = torch.randn(shape, device="cuda", generator=generator).to(torch.bfloat16)
    candidates = {
        "fla chunk_rwkv7 (recomputes)": lambda: chunk_rwkv7(*inputs, scale=1.0, safe_gate=True,
                                                            lower_bound=LOG_DECAY_LOWER_BOUND)[0],
        ("harness ChunkWKV7 (keeps the chunk states)" if keeps_chunk_states()
         else f"harness wkv7_fla: {fla_path()}"): lambda: wkv7_fla(*inputs)}
    rows, reference = [], None
    for candidate, forward in candidates.items():
        def step(forward=forward):
            for t in inputs:
                t.grad = None
            forward().backward(d_output)

        step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        output = forward()
        facts = {"kept_for_backward_gb": (torch.cuda.memory_allocated() - before) / 1e9}
        output.backward(d_output)
        grads = [t.grad.clone() for t in inputs]
        if reference is None:
            reference = output.detach(), grads
        facts["output_equal_to_fla"] = float(torch.equal(output, reference[0]))
        facts["grad_rel_to_fla_max"] = max(float((g.float() - want.float()).norm() / want.float().norm())
                                           for g, want in zip(grads, reference[1]))
        del output
        rows.append(record("wkv", case, candidate, [time_ms(step, reps) for _ in range(rounds)], facts))
    return rows


def record(part: str, case: str, candidate: str, times: list[float], error: dict) -> dict:
    row = {"part": part, "case": case, "candidate": candidate, "ms": [round(t, 4) for t in times],
           "ms_median": round(statistics.median(times), 4), **error}
    print(f"{part:6s} {case:46s} {candidate:40s} ms {' '.join(f'{t:8.3f}' for t in times)} "
          + " ".join(f"{k} {v:.3g}" for k, v in error.items()), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="timings of every measurement, for the spread")
    parser.add_argument("--reps", type=int, default=20, help="calls per round")
    parser.add_argument("--parts", default="loss,blocks,wgrad,head,wkv",
                        help="comma-separated: loss, blocks, wgrad, head, wkv")
    parser.add_argument("--output", type=Path, help="JSON file (default: docs/benchmarks/fused_kernels_<gpu>.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmark_fused_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 1
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, torch {torch.__version__}")
    parts = args.parts.split(",")
    rows = ((bench_loss(args.rounds, args.reps) if "loss" in parts else [])
            + (bench_blocks(args.rounds, max(args.reps // 4, 3)) if "blocks" in parts else [])
            + (bench_weight_gradients(args.rounds, args.reps) if "wgrad" in parts else [])
            + (bench_heads(args.rounds, max(args.reps // 4, 3)) if "head" in parts else [])
            + (bench_wkv(args.rounds, args.reps) if "wkv" in parts else []))
    output = args.output or ROOT / "docs" / "benchmarks" / f"fused_kernels_{gpu.replace(' ', '_')}.json"
    write_json_atomic(output, {"device": gpu, "torch": torch.__version__, "rows": rows})
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cross-entropy and its gradient over a chunk of logits in one Triton kernel (CUDA only).

The kernel path of ``training_harness.lm.softmax_cross_entropy_grad``, which stays the reference (and the
path on other devices); a GPU test compares the two. One program per row reads the row twice and writes it
once: an online log-sum-exp (running maximum and rescaled sum), then softmax minus the one-hot target, written
over the logits. On an H200 it takes half (GPT-NeoX's vocabulary) to two thirds (Qwen2.5's) of the compiled
reference's time and needs no buffer for the gradient (docs/performance.md, change 32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Columns per loop iteration and warps per row: the tiling of the end-to-end runs on an H200, 1-4 % slower than
#: the fastest of six measured there (8192 by 16; docs/performance.md, change 32).
BLOCK_COLUMNS = 4096
NUM_WARPS = 8
#: The kernel works in base 2 (x * log2(e)): exp2 is one hardware instruction, exp a longer routine (0-5 % of
#: the kernel's time on an H200).
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _softmax_cross_entropy_grad_kernel(logits_ptr, labels_ptr, row_loss_ptr, n_columns, row_stride,
                                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    columns = tl.arange(0, BLOCK)

    running_max = -float("inf")  # of x * log2(e)
    running_sum = 0.0  # of 2^(x * log2(e) - running_max)
    for start in range(0, n_columns, BLOCK):
        mask = start + columns < n_columns
        x = tl.load(row_ptr + start + columns, mask=mask, other=-float("inf")).to(tl.float32) * LOG2E
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp2(running_max - new_max) + tl.sum(tl.exp2(x - new_max), axis=0)
        running_max = new_max
    log2_normalizer = running_max + tl.log2(running_sum)

    label = tl.load(labels_ptr + row)
    in_range = (label >= 0) & (label < n_columns)
    # A label outside the vocabulary makes the loss NaN (the trainer stops on it), never another row's logit.
    label_logit = tl.load(row_ptr + label, mask=in_range, other=float("nan")).to(tl.float32)
    tl.store(row_loss_ptr + row, log2_normalizer / LOG2E - label_logit)

    for start in range(0, n_columns, BLOCK):
        mask = start + columns < n_columns
        x = tl.load(row_ptr + start + columns, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp2(x * LOG2E - log2_normalizer) - tl.where(start + columns == label, 1.0, 0.0)
        tl.store(row_ptr + start + columns, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def softmax_cross_entropy_grad_(logits: torch.Tensor, labels: torch.Tensor, block_columns: int = BLOCK_COLUMNS,
                                num_warps: int = NUM_WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of (N, V) CUDA logits and its gradient, written over the logits (returned).

    The same contract as ``softmax_cross_entropy_grad`` (loss in float32, gradient in the logits' dtype), for
    logits that are not needed afterwards. The tile arguments are for scripts/benchmark_fused_kernels.py.
    """
    if not logits.is_cuda or logits.stride(1) != 1:
        raise ValueError("softmax_cross_entropy_grad_ takes CUDA logits with contiguous rows")
    row_loss = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
    _softmax_cross_entropy_grad_kernel[(logits.shape[0],)](
        logits, labels.contiguous(), row_loss, logits.shape[1], logits.stride(0), BLOCK=block_columns,
        num_warps=num_warps)
    return row_loss.sum(), logits

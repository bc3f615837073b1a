"""bf16 working copies of the backbone's matrix weights, made once per optimizer step instead of per micro-batch.

Under bf16 autocast with fp32 master weights, every micro-batch casts each matrix weight to bf16 for its
products, and casts each bf16 weight gradient back to fp32 to add it to those accumulated: at Mamba 3B about
30 ms of kernels in a 0.9 s step (docs/performance.md, change 41). ``WorkingWeights`` does the same arithmetic
once per optimizer step. The parameters hold bf16 copies of their fp32 masters through the forward and
backward passes, so autocast finds nothing to cast; each micro-batch's bf16 gradient is added into a float32
sum as soon as it is ready; and inside ``masters()`` the parameters hold their masters and those sums, so that
clipping, AdamW and checkpoints see exactly what they would without the copies.

A backward of the harness's own can do better with ``weight_gradient``: on CUDA the product that is a
weight's gradient adds itself into the float32 sum (cuBLAS, C = A B + C), so no bf16 gradient is written,
read back and added (change 42). That skips a rounding to bf16, so it is not bit for bit what autocast does.

Only weights whose products autocast runs in bf16 and whose gradients come out of them in bf16 qualify: the
backbone's ``nn.Linear`` weights. The output head stays float32: the loss accumulates its gradient in float32
over chunks of tokens, which a bf16 copy would round.

A plan takes the copies with --working_weights (each family's ``gpu_plan`` says which), one process at a time:
several would reduce bf16 gradients. They cost memory where blocks are recomputed, whose casts autocast
frees as soon as each block is done. Under --cuda_graphs the capture makes the float32 sums in the graph's
pool, as it makes gradients, and each replay writes them anew (cuda_graphs.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn as nn

from training_harness.config import TrainConfig
from training_harness.lm import CausalLM, add_product


def working_weights_refusal(config: TrainConfig, world_size: int) -> str | None:
    """Why a run's --working_weights cannot apply (its plan's flag under other settings), or None."""
    if config.precision != "bf16-mixed":
        return f"--precision {config.precision} has no float32 master weights cast to bf16"
    if world_size > 1:
        return f"these {world_size} processes would reduce bf16 gradients"
    return None


def matrix_weights(model: CausalLM) -> list[nn.Parameter]:
    """The backbone's trainable ``nn.Linear`` weights, each once, without the output head's."""
    head, chosen = model.head_weight, {}
    for module in model.backbone.modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad and module.weight is not head:
            chosen[id(module.weight)] = module.weight
    return list(chosen.values())


def weight_gradient(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor | None:
    """``left @ right``, the gradient of ``weight``, for a backward to return; or, where ``weight`` trains on a
    working copy, that product added into its float32 gradient sum, and None: nothing left for autograd to add."""
    add_product = getattr(weight, "add_gradient_product", None)
    if add_product is None:
        return left @ right
    add_product(left, right)
    return None


class WorkingWeights:
    """Swaps ``parameters`` (float32) to bf16 copies; ``masters()`` swaps their float32 masters back in."""

    def __init__(self, parameters: list[nn.Parameter]):
        if any(parameter.dtype != torch.float32 for parameter in parameters):
            raise TypeError("working copies are made of float32 master weights")
        self.parameters = parameters
        self.masters_data = [parameter.data for parameter in parameters]
        self.copies = [parameter.data.to(torch.bfloat16) for parameter in parameters]
        self.sums: list[torch.Tensor | None] = [None] * len(parameters)
        for index, (parameter, copy) in enumerate(zip(parameters, self.copies, strict=True)):
            parameter.data = copy
            parameter.register_post_accumulate_grad_hook(functools.partial(self._add_gradient, index))
            parameter.add_gradient_product = functools.partial(self._add_product, index)  # for weight_gradient

    def _add_gradient(self, index: int, parameter: nn.Parameter) -> None:
        """As autograd accumulates ``.grad``; it calls this with none where a backward took the gradient into
        the sum itself (``weight_gradient``)."""
        gradient, parameter.grad = parameter.grad, None
        if gradient is not None:
            self._add(index, gradient)

    def _add(self, index: int, gradient: torch.Tensor) -> None:
        """A new sum after ``zero_grad``, else added to."""
        if self.sums[index] is None:
            self.sums[index] = gradient.float()
        else:
            self.sums[index].add_(gradient)

    def _add_product(self, index: int, left: torch.Tensor, right: torch.Tensor) -> None:
        """``left @ right`` (bf16) into the sum: by the product itself on CUDA, else as autograd would add it."""
        self.sums[index] = add_product(self.sums[index], left, right)

    @contextlib.contextmanager
    def masters(self) -> Iterator[None]:
        """The parameters hold their float32 masters and gradient sums; on leaving, the copies are refreshed
        from the masters, and a gradient set to None inside (``zero_grad``) frees its sum."""
        for parameter, master, total in zip(self.parameters, self.masters_data, self.sums, strict=True):
            parameter.data = master
            parameter.grad = total
        try:
            yield
        finally:
            for index, (parameter, copy) in enumerate(zip(self.parameters, self.copies, strict=True)):
                self.sums[index] = parameter.grad
                parameter.grad = None
                parameter.data = copy
            with torch.no_grad():
                torch._foreach_copy_(self.copies, self.masters_data)

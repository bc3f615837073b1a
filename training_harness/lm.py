"""What every family shares: the language-model head, a memory-bounded cross-entropy, counting."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch._functorch.config
import torch.nn as nn
import torch.nn.functional as F

from training_harness.torch_workarounds import apply_compile_workarounds

#: Tokens per cross-entropy chunk unless a plan sets --loss_chunk_tokens: 4096 x 151,936 bf16 logits are 1.2 GB.
LOSS_CHUNK_TOKENS = 4096

#: (logits, labels) -> (summed loss, gradient with respect to the logits): one chunk's loss.
LossAndGrad = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def softmax_cross_entropy_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of (N, V) logits and its gradient with respect to them, in float32 arithmetic
    at least.

    Returns (loss sum, d loss / d logits in the logits' dtype). The one-hot target is a comparison, not a
    scatter, so that compiled (``CausalLM.compile_regions``) the gradient is one pointwise pass over the
    logits after the pass that reduces them; eager, each line is a pass of its own.
    """
    logits32 = logits.to(_math_dtype(logits.dtype))
    log_normalizer = torch.logsumexp(logits32, dim=-1, keepdim=True)  # (N, 1)
    loss = (log_normalizer.squeeze(1) - logits32.gather(1, labels.unsqueeze(1)).squeeze(1)).sum()
    target = torch.arange(logits.shape[1], device=logits.device) == labels.unsqueeze(1)  # (N, V) one-hot
    grad = (logits32 - log_normalizer).exp() - target.to(logits32.dtype)  # softmax minus the one-hot target
    return loss, grad.to(logits.dtype)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


_MM_INTO_FLOAT32 = "dtype_out" in torch.ops.aten.addmm.overloads()  # addmm(..., out_dtype=): in recent torch, CUDA only


def add_product(total: torch.Tensor | None, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``total + left @ right`` kept in float32 at least (a new sum where ``total`` is None), for gradients summed
    over chunks or micro-batches. On CUDA a bf16 product adds itself into the sum (cuBLAS, C = A B + C): it is
    neither rounded to bf16 nor written, read back and added (docs/performance.md, changes 42 and 44)."""
    if left.is_cuda and _MM_INTO_FLOAT32 and left.dtype in (torch.bfloat16, torch.float16):
        if total is None:
            return torch.mm(left, right, out_dtype=torch.float32)
        return torch.addmm(total, left, right, out_dtype=torch.float32, out=total)
    product = left @ right
    return product.to(_math_dtype(product.dtype)) if total is None else total.add_(product)


def device_loss_and_grad(device: torch.device) -> LossAndGrad:
    """The chunk loss for a device: on CUDA the Triton kernel (cross_entropy_kernel.py), which overwrites the
    chunk's logits with their gradient in one kernel; elsewhere ``softmax_cross_entropy_grad``."""
    if device.type == "cuda":
        from training_harness.cross_entropy_kernel import softmax_cross_entropy_grad_

        return softmax_cross_entropy_grad_
    return softmax_cross_entropy_grad


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight^T, labels_i), one chunk of tokens at a time. The gradients are computed in
    the forward pass, so no chunk's logits outlive it and none is recomputed in the backward pass; the
    weight's gradient is summed over chunks in float32 (``add_product``)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, loss_and_grad):
        matrix = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = None
        total = hidden.new_zeros((), dtype=_math_dtype(hidden.dtype))
        for start in range(0, hidden.shape[0], chunk_tokens):
            chunk = hidden[start:start + chunk_tokens]
            loss, grad_logits = loss_and_grad(chunk @ matrix.t(), labels[start:start + chunk_tokens])
            total += loss
            grad_hidden[start:start + chunk_tokens] = grad_logits @ matrix
            grad_weight = add_product(grad_weight, grad_logits.t(), chunk)
            del grad_logits  # before the next chunk's logits exist: one chunk's logits in memory at a time
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total, (grad_weight * grad_total).to(ctx.weight_dtype), None, None, None


def products_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype ``tensor``'s matrix products run in: autocast's where it is on for its device, else its own."""
    device_type = tensor.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else tensor.dtype


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_tokens: int = LOSS_CHUNK_TOKENS, loss_and_grad: LossAndGrad | None = None
                         ) -> torch.Tensor:
    """Mean next-token cross-entropy of the output head without the (tokens, vocab) logits in memory.

    hidden (..., D), weight (V, D), labels (...). The matrix products run in the autocast dtype when autocast
    is on (bf16 on the GPU), else in hidden's dtype. ``loss_and_grad(logits, labels)`` computes each chunk's
    summed loss and gradient (default: ``device_loss_and_grad``).
    """
    loss_and_grad = loss_and_grad or device_loss_and_grad(hidden.device)
    device_type, dtype = hidden.device.type, products_dtype(hidden)
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    labels = labels.reshape(-1)
    with torch.autocast(device_type, enabled=False):  # the products run in ``dtype``, the softmax in float32
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            total = _LinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens, loss_and_grad)
        else:  # evaluation: the loss alone
            matrix = weight.to(dtype)
            total = sum(F.cross_entropy((hidden[i:i + chunk_tokens] @ matrix.t()).to(_math_dtype(dtype)),
                                        labels[i:i + chunk_tokens], reduction="sum")
                        for i in range(0, hidden.shape[0], chunk_tokens))
    return total / labels.numel()


#: transformers' SDPA attention without its mask step (``TransformersBackbone``).
CAUSAL_SDPA = "causal_sdpa"


def _no_mask(*args, **kwargs) -> None:
    return None  # SDPA's is_causal alone: every window is one causal sequence, never padded


def register_causal_sdpa() -> str:
    """Register CAUSAL_SDPA with transformers and return its name: the library's own SDPA attention, and a mask
    step that builds no mask. transformers' mask step decides at each forward whether SDPA's ``is_causal``
    suffices, reading a value back from the GPU to decide (a host synchronisation per micro-batch), and during
    a CUDA graph's capture it builds the full (T, T) mask instead, which changes the attention kernel that
    the graph replays."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(CAUSAL_SDPA, _no_mask)
    return CAUSAL_SDPA


class TransformersBackbone(nn.Module):
    """A ``transformers`` base model (Qwen2Model, GPTNeoXModel, ...) as a backbone: hidden states after the
    final norm, its decoder layers as ``blocks`` and its input embedding. Its attention is CAUSAL_SDPA."""

    def __init__(self, model: nn.Module):
        super().__init__()
        model.set_attn_implementation(register_causal_sdpa())
        self.model = model

    # Properties, not attributes: assigning the submodules again would register them twice.
    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, D)


class CausalLM(nn.Module):
    """A backbone (embedding, blocks, final norm) plus the output head and the training loss.

    ``backbone(input_ids)`` returns normalized hidden states (B, T, D); ``backbone.blocks`` is
    the ModuleList that activation checkpointing and FSDP wrap; ``backbone.embedding`` is the
    input embedding, shared with the head when ``tie_embeddings``.
    """

    def __init__(self, backbone: nn.Module, vocab_size: int, d_model: int, tie_embeddings: bool,
                 kernel_path: str, head_init_std: float | None = 0.02):
        super().__init__()
        self.backbone = backbone
        self.vocab_size = vocab_size
        self.kernel_path = kernel_path
        self.loss_and_grad = None  # the device's (device_loss_and_grad) unless compile_regions compiles one
        self.loss_chunk_tokens = LOSS_CHUNK_TOKENS
        self.lm_head = None if tie_embeddings else nn.Linear(d_model, vocab_size, bias=False)
        if self.lm_head is not None and head_init_std is not None:
            nn.init.normal_(self.lm_head.weight, std=head_init_std)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.blocks

    @property
    def head_weight(self) -> torch.Tensor:
        return self.backbone.embedding.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The mean loss against ``labels`` (B, T); the logits (B, T, V) when no labels are given."""
        hidden = self.backbone(input_ids)
        if labels is None:
            return hidden @ self.head_weight.t()
        return linear_cross_entropy(hidden, self.head_weight, labels, self.loss_chunk_tokens, self.loss_and_grad)

    def compile_regions(self, **kwargs) -> None:
        """Regional compilation: each block (compiled once, reused by its identical siblings) and, off CUDA,
        the loss's softmax (on CUDA a kernel of its own). A block with its own ``compile_regions`` chooses its
        regions (around a kernel that dynamo cannot trace); elsewhere such kernels stay eager behind
        ``torch.compiler.disable``."""
        apply_compile_workarounds()
        lower_backward_with_forward()
        for block in self.blocks:
            if hasattr(block, "compile_regions"):
                block.compile_regions(**kwargs)
            else:
                block.compile(**kwargs)
        if not self.head_weight.is_cuda:
            self.loss_and_grad = torch.compile(softmax_cross_entropy_grad, **kwargs)


def lower_backward_with_forward() -> None:
    """Lower each compiled region's backward together with its forward, not at the first backward
    (docs/performance.md, change 21). Same kernels, earlier: the training process does the lowering while the
    helper compiles the library's kernels (training_harness/kernel_warmup.py), instead of after waiting for it."""
    if hasattr(torch._functorch.config, "force_non_lazy_backward_lowering"):  # older releases lower lazily only
        torch._functorch.config.force_non_lazy_backward_lowering = True


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


def matmul_params(model: CausalLM) -> int:
    """Weights used in matrix products per token: every nn.Linear plus the output head."""
    linear = sum(m.weight.numel() for m in model.backbone.modules() if isinstance(m, nn.Linear))
    return linear + model.head_weight.numel()


def tag_no_weight_decay(*parameters: nn.Parameter) -> None:
    """Mark parameters (decay rates, mixing coefficients) that AdamW must not decay."""
    for parameter in parameters:
        parameter._no_weight_decay = True


def no_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    """Norm weights, biases and other vectors, embeddings, and tagged parameters take no weight decay."""
    return parameter.ndim < 2 or "embed" in name or getattr(parameter, "_no_weight_decay", False)

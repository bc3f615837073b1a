"""What every family shares: the language-model head, a memory-bounded cross-entropy, counting."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

#: Tokens per cross-entropy chunk: 4096 x 151,936 bf16 logits are 1.2 GB, recomputed in backward.
LOSS_CHUNK_TOKENS = 4096


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()  # (N, V), bf16 under autocast
    return F.cross_entropy(logits.to(_loss_dtype(hidden)), labels, reduction="sum")


def _loss_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.promote_types(hidden.dtype, torch.float32)  # at least float32 for the softmax


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Mean next-token cross-entropy without keeping the full (tokens, vocab) logits alive.

    Each chunk's logits are recomputed in the backward pass (activation checkpointing), so
    peak memory holds one chunk of logits instead of all of them.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    labels = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=_loss_dtype(hidden))
    for start in range(0, hidden.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpoint(_chunk_loss_sum, hidden[start:stop], weight, labels[start:stop],
                                   use_reentrant=False)
    return total / labels.numel()


class TransformersBackbone(nn.Module):
    """A ``transformers`` base model (Qwen2Model, GPTNeoXModel, ...) as a backbone: hidden states after the
    final norm, its decoder layers as ``blocks`` and its input embedding."""

    def __init__(self, model: nn.Module):
        super().__init__()
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
        return chunked_cross_entropy(hidden, self.head_weight, labels)


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

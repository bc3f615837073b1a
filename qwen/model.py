"""Qwen2.5 at the study's shapes: transformers' Qwen2Model backbone, SDPA attention, tied embeddings."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from training_harness.lm import CausalLM, TransformersBackbone
from training_harness.registry import ModelFamily, StockReference

_PAPER = {
    "0.5B": dict(layers=24, d_model=896, heads=14, kv_heads=2, ffn=4864),
    "1.5B": dict(layers=28, d_model=1536, heads=12, kv_heads=2, ffn=8960),
    "3B": dict(layers=36, d_model=2048, heads=16, kv_heads=2, ffn=11008),
}
SHAPES = {
    "paper": _PAPER,
    "matched": _PAPER,  # already within 10 % of nominal: 494M, 1.54B, 3.09B
    "tiny": {size: dict(layers=2, d_model=64, heads=4, kv_heads=2, ffn=128) for size in _PAPER},
}
#: The attention kernel is the run's ``--attention`` (recorded beside this); auto leaves the choice to PyTorch.
SDPA_PATH = "torch SDPA (the kernel --attention picks)"


def hf_config(shape: dict, vocab_size: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=shape["d_model"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=32768, rms_norm_eps=1e-6,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        attn_implementation="sdpa",
    )


def build(shape: dict, vocab_size: int, device_type: str, allow_slow_kernels: bool) -> CausalLM:
    return CausalLM(TransformersBackbone(Qwen2Model(hf_config(shape, vocab_size))), vocab_size, shape["d_model"],
                    tie_embeddings=True, kernel_path=SDPA_PATH)


def attention_flops_per_token(shape: dict, seq_len: int) -> float:
    """Causal attention scores and values: 6 x layers x T x d_attn (PaLM, Chowdhery et al. 2022, App. B,
    12 x L x d x T halved for the causal mask)."""
    head_dim = shape["d_model"] // shape["heads"]
    return 6.0 * shape["layers"] * seq_len * shape["heads"] * head_dim


def transformers_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A transformers causal LM's own loss: it shifts the labels by one and upcasts the logits."""
    return model(input_ids=tokens, labels=tokens).loss


FAMILY = ModelFamily(
    name="qwen", display_name="Qwen2.5", default_tokenizer="Qwen/Qwen2.5-0.5B", tokenizer_vocab=151_665,
    shapes=SHAPES, build=build, sequence_flops_per_token=attention_flops_per_token,
    min_vocab_rows={"paper": 151_936, "matched": 151_936},
    gpu_plan={"0.5B": {"micro_batch_size": 4, "loss_chunk_tokens": 16_384, "working_weights": True,  # change 48
                       "cuda_graphs": True},  # change 49
              "1.5B": {"micro_batch_size": 2, "loss_chunk_tokens": 16_384, "working_weights": True},
              "3B": {"micro_batch_size": 1, "activation_checkpointing": True, "checkpoint_blocks": 14}},
    published_ranks={"ppl": 1, "amu_gb": 4, "al_s_per_iter": 4, "tt_tokens_per_param_s": 1, "aec_w": 4},
    stock=StockReference("transformers Qwen2ForCausalLM (SDPA attention)",
                         lambda shape, vocab: Qwen2ForCausalLM(hf_config(shape, vocab)), transformers_loss),
)

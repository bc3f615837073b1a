"""Pythia (GPT-NeoX): rotary on 25 % of each head, parallel residual, FFN 4x, untied output head."""

from __future__ import annotations

from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXModel

from qwen.model import SDPA_PATH, attention_flops_per_token, transformers_loss
from training_harness.lm import CausalLM, TransformersBackbone
from training_harness.registry import ModelFamily, StockReference

_PAPER = {
    "0.5B": dict(layers=24, d_model=1024, heads=16),
    "1.5B": dict(layers=32, d_model=2048, heads=16),
    "3B": dict(layers=32, d_model=2560, heads=32),
}
SHAPES = {
    "paper": _PAPER,
    "matched": {
        "0.5B": dict(layers=30, d_model=1024, heads=16),
        "1.5B": dict(layers=26, d_model=2048, heads=16),
        "3B": dict(layers=32, d_model=2560, heads=32),
    },
    "tiny": {size: dict(layers=2, d_model=64, heads=4) for size in _PAPER},
}


def hf_config(shape: dict, vocab_size: int) -> GPTNeoXConfig:
    return GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=shape["d_model"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], intermediate_size=4 * shape["d_model"], hidden_act="gelu",
        max_position_embeddings=8192, use_parallel_residual=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.25},
        attn_implementation="sdpa",
    )


def build(shape: dict, vocab_size: int, device_type: str, allow_slow_kernels: bool) -> CausalLM:
    config = hf_config(shape, vocab_size)
    # Pythia's output head is separate from the input embedding, initialised like its other linears.
    return CausalLM(TransformersBackbone(GPTNeoXModel(config)), vocab_size, shape["d_model"], tie_embeddings=False,
                    kernel_path=SDPA_PATH,
                    head_init_std=config.initializer_range)


FAMILY = ModelFamily(
    name="pythia", display_name="Pythia", default_tokenizer="EleutherAI/pythia-410m", tokenizer_vocab=50_277,
    shapes=SHAPES, build=build, sequence_flops_per_token=attention_flops_per_token,
    gpu_plan={"0.5B": {"micro_batch_size": 4, "attention": "cudnn", "cuda_graphs": True},  # change 51
              "1.5B": {"micro_batch_size": 2},
              # device peak 76.9 GB on an H200 with expandable segments (docs/performance.md, change 25)
              "3B": {"micro_batch_size": 1, "activation_checkpointing": True, "checkpoint_blocks": 3}},
    published_ranks={"ppl": 4, "amu_gb": 3, "al_s_per_iter": 3, "tt_tokens_per_param_s": 3, "aec_w": 3},
    stock=StockReference("transformers GPTNeoXForCausalLM (SDPA attention)",
                         lambda shape, vocab: GPTNeoXForCausalLM(hf_config(shape, vocab)), transformers_loss),
)

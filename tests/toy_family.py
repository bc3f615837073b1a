"""A fifth family kept outside the repository's family folders, registered only through
EFFICIENTLLM_FAMILY_MODULES: each block mixes a token with the one before it (a width-2 causal convolution)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from training_harness.lm import CausalLM
from training_harness.registry import SIZES, ModelFamily


class ShiftBlock(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mix = nn.Linear(2 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        previous = F.pad(h, (0, 0, 1, -1))  # the previous token's vector, zeros at t = 0
        return x + self.mix(torch.cat([h, previous], dim=-1))


class ShiftBackbone(nn.Module):
    def __init__(self, layers: int, d_model: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(ShiftBlock(d_model) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def build(shape: dict, vocab_size: int, device_type: str, allow_slow_kernels: bool) -> CausalLM:
    backbone = ShiftBackbone(shape["layers"], shape["d_model"], vocab_size)
    return CausalLM(backbone, vocab_size, shape["d_model"], tie_embeddings=True, kernel_path="PyTorch (toy)")


FAMILY = ModelFamily(
    name="toy", display_name="Toy shift", default_tokenizer="EleutherAI/pythia-410m", tokenizer_vocab=50_277,
    shapes={"tiny": {size: {"layers": 2, "d_model": 32} for size in SIZES}}, build=build,
    sequence_flops_per_token=lambda shape, seq_len: 0.0,
)

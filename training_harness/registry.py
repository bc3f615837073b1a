"""The model families, one registry line each, and the interface every family module provides."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from training_harness.lm import CausalLM, matmul_params, parameter_count, round_up

SIZES = ("0.5B", "1.5B", "3B")
#: preset -> what it means. ``tiny`` keeps the size names but shrinks every shape, for CPU tests.
PRESETS = {
    "paper": "the shapes of the study (docs/models.md), the default",
    "matched": "shapes within 10 % of each nominal size",
    "tiny": "a few million parameters, for tests and CPU smoke runs",
}

#: The families of this repository: a folder with model.py defining FAMILY, a train script, and one line here.
FAMILY_MODULES = {
    "qwen": "qwen.model",
    "pythia": "pythia.model",
    "mamba": "mamba.model",
    "rwkv": "rwkv.model",
    "mamba2": "mamba2.model",
    "gated_deltanet": "gated_deltanet.model",
}
#: The study's four, the default of every sweep; the others join when named (or with "all").
PAPER_FAMILIES = ("qwen", "pythia", "mamba", "rwkv")
#: Families kept outside this repository join through this variable: "name=module[,name=module...]", each
#: module importable and defining FAMILY.
EXTRA_FAMILIES_VARIABLE = "EFFICIENTLLM_FAMILY_MODULES"


@dataclass(frozen=True)
class StockReference:
    """A family's public implementation as its library ships it (bf16 weights, the library's own fast options
    and loss), the yardstick of the harness's speed."""

    name: str
    """What is built, with the options that matter for speed."""
    build: Callable[[dict, int], torch.nn.Module]
    """build(shape, vocab_rows) -> the library's model, at the family's shape for that size."""
    loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    """loss(model, tokens (B, T)) -> mean next-token cross-entropy as the library computes it."""


@dataclass(frozen=True)
class ModelFamily:
    """What a family gives the harness."""

    name: str
    display_name: str
    default_tokenizer: str
    tokenizer_vocab: int
    """Vocabulary of ``default_tokenizer`` (added tokens included): the embedding rows before data exists."""
    shapes: dict[str, dict[str, dict]]
    """preset -> nominal size -> shape keyword arguments for ``build``."""
    build: Callable[..., CausalLM]
    """build(shape, vocab_size, device_type, allow_slow_kernels) -> CausalLM."""
    sequence_flops_per_token: Callable[[dict, int], float]
    """Training FLOPs per token that are not weight matmuls (attention scores, state updates)."""
    min_vocab_rows: dict[str, int] | None = None
    """Per preset, the embedding rows of the original model when larger than the padded vocabulary."""
    gpu_plan: dict[str, dict] = field(default_factory=dict)
    """Per nominal size, the training settings that fit one 80 GB GPU at 8K context with the real shapes
    (micro_batch_size, activation_checkpointing, checkpoint_blocks, attention), measured (docs/performance.md)."""
    published_ranks: dict[str, int] | None = None
    """The study's ranks (1 = best) by table metric, for families the study compared."""
    stock: StockReference | None = None
    pinned_kernels: str | None = None
    """The module of a Triton library whose autotuned kernels the family pins at import, from tables in its
    ``kernel_configs/`` folder (training_harness/kernel_pins.py); None: nothing to pin."""

    def shape(self, size: str, preset: str) -> dict:
        if preset not in self.shapes:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(self.shapes)}")
        if size not in self.shapes[preset]:
            raise ValueError(f"unknown size {size!r} for {self.name}; choose one of {sorted(self.shapes[preset])}")
        return self.shapes[preset][size]

    def vocab_rows(self, tokenizer_vocab: int, preset: str) -> int:
        """Embedding rows: the tokenizer's vocabulary padded to a multiple of 64."""
        return max(round_up(tokenizer_vocab, 64), (self.min_vocab_rows or {}).get(preset, 0))

    def default_vocab_rows(self, preset: str) -> int:
        """Embedding rows with the family's default tokenizer."""
        return self.vocab_rows(self.tokenizer_vocab, preset)

    def flops_per_token(self, model: CausalLM, shape: dict, seq_len: int) -> float:
        """6 x matmul weights (forward 2, backward 4; Kaplan et al. 2020) + the sequence-mixing term."""
        return 6.0 * matmul_params(model) + self.sequence_flops_per_token(shape, seq_len)


def family_modules() -> dict[str, str]:
    """Family name -> module: this repository's, then those named by EFFICIENTLLM_FAMILY_MODULES."""
    modules = dict(FAMILY_MODULES)
    for entry in filter(None, os.environ.get(EXTRA_FAMILIES_VARIABLE, "").split(",")):
        name, _, module = entry.partition("=")
        if not (name.strip() and module.strip()):
            raise ValueError(f"{EXTRA_FAMILIES_VARIABLE}: {entry!r} is not name=module")
        modules[name.strip()] = module.strip()
    return modules


def family_names() -> list[str]:
    return list(family_modules())


def resolve_families(names: str) -> list[str]:
    """A comma-separated list of families, "paper" for the study's four or "all" for every registered one;
    ValueError names the unknown ones."""
    wanted = {"paper": list(PAPER_FAMILIES), "all": family_names()}.get(names) or [n for n in names.split(",") if n]
    unknown = [name for name in wanted if name not in family_names()]
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {family_names()}, 'paper' or 'all'")
    return wanted


def get_family(name: str) -> ModelFamily:
    modules = family_modules()
    if name not in modules:
        raise ValueError(f"unknown model family {name!r}; choose one of {sorted(modules)} (or register it in "
                         f"{EXTRA_FAMILIES_VARIABLE})")
    return importlib.import_module(modules[name]).FAMILY


def build_model(family: ModelFamily, size: str, preset: str, vocab_rows: int, device: torch.device | str,
                allow_slow_kernels: bool = False) -> CausalLM:
    """The family's model at ``size`` and ``preset``, its parameters created on ``device`` (meta: no memory)."""
    device = torch.device(device)
    with device:
        return family.build(family.shape(size, preset), vocab_rows, device.type, allow_slow_kernels)


def count_on_meta(family: ModelFamily, size: str, preset: str, tokenizer_vocab: int | None = None,
                  seq_len: int = 8192) -> dict:
    """Parameter count and FLOPs per token of a model built on the meta device (no memory used), with the
    family's default tokenizer unless ``tokenizer_vocab`` is given."""
    shape = family.shape(size, preset)
    vocab = family.vocab_rows(tokenizer_vocab or family.tokenizer_vocab, preset)
    model = build_model(family, size, preset, vocab, "meta", allow_slow_kernels=True)
    return {"params": parameter_count(model), "vocab_rows": vocab,
            "flops_per_token": family.flops_per_token(model, shape, seq_len), **shape}

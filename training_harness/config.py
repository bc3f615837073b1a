"""The one training configuration and its command line: defaults < --config JSON < flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from training_harness.errors import ConfigError
from training_harness.flags import dataclass_parser
from training_harness.lm import LOSS_CHUNK_TOKENS
from training_harness.prepare_data import DEFAULT_VAL_FRACTION
from training_harness.registry import PRESETS, SIZES

#: Sequences per optimizer step in the study, by nominal size.
SPEC_GLOBAL_BATCH = {"0.5B": 8, "1.5B": 4, "3B": 2}
PRECISIONS = ("bf16-mixed", "bf16", "fp32")
ATTENTION_KERNELS = ("auto", "flash", "cudnn", "efficient")


@dataclass(kw_only=True)
class TrainConfig:
    """One training run. Every field is a command-line flag of the same name."""

    model: str = field(default="", metadata={"help": "family: qwen, pythia, mamba or rwkv (set by the script)"})
    model_size: str = field(default="0.5B", metadata={"help": f"nominal size: {', '.join(SIZES)}"})
    preset: str = field(default="paper", metadata={"help": f"shapes: {', '.join(PRESETS)}"})
    data_path: str = field(default="", metadata={
        "help": "prepared folder, or a .jsonl/.json/.parquet/.txt file (default: the bundled 28-document corpus "
                "with a tokenizer trained on it: a check that the code runs, with no download)"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer for raw data files (default: the family's); prepared folders carry their own"})
    val_fraction: float = field(default=DEFAULT_VAL_FRACTION, metadata={
        "help": "held-out share of documents when preparing a raw file"})
    output_dir: str = field(default="", metadata={"help": "where results, logs and checkpoints go"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int | None = field(default=None, metadata={
        "help": "global sequences per optimizer step (default: the spec's 8/4/2 for 0.5B/1.5B/3B)"})
    micro_batch_size: int | None = field(default=None, metadata={
        "help": "sequences per forward pass on one GPU; the rest is gradient accumulation (default: one "
                "process starts at the whole batch and halves it while the first step runs out of memory; "
                "several processes use 1)"})
    seq_len: int = field(default=8192, metadata={"help": "tokens per training window"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay ends at lr x this"})
    lr_warmup_steps: int | None = field(default=None, metadata={"help": "linear warm-up (default: 1 %% of steps)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay (not on norms, biases, embeddings)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm"})
    precision: str = field(default="bf16-mixed", metadata={
        "help": "bf16-mixed (bf16 autocast, fp32 weights), bf16 (pure) or fp32"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute blocks in backward"})
    checkpoint_blocks: int | None = field(default=None, metadata={
        "help": "with --activation_checkpointing, recompute only the first N blocks (default: all); the memory "
                "of the others' activations buys back their share of the recomputation"})
    compile: bool = field(default=False, metadata={"help": "torch.compile each block and the loss"})
    activation_memory_budget: float = field(default=1.0, metadata={
        "help": "with --compile: the share of the compiled regions' activations kept for the backward, the rest "
                "recomputed there from what is kept (torch._functorch.config.activation_memory_budget; 1.0: "
                "torch's own choice): memory for other uses at the price of some recomputation"})
    keep_recurrence_terms: bool = field(default=False, metadata={
        "help": "RWKV-7 on fla's kernels: keep the recurrence's in-chunk matrices and WY form from the forward for "
                "the backward instead of recomputing them (0.74 GB a block per 32,768 tokens; rwkv/wkv7.py)"})
    cuda_graphs: bool = field(default=False, metadata={
        "help": "on one CUDA device, capture the forward and backward passes of a step as one CUDA graph (at the "
                "second step) and replay it: for steps whose kernels the host cannot launch as fast as the GPU "
                "runs them"})
    working_weights: bool = field(default=False, metadata={
        "help": "bf16-mixed on one process: keep bf16 copies of the matrix weights from one optimizer step to the "
                "next instead of casting them in every micro-batch (autocast's arithmetic, except that Mamba's own "
                "backward adds weight gradients into float32 sums unrounded; more memory where blocks are "
                "recomputed, whose casts autocast frees at once)"})
    loss_chunk_tokens: int = field(default=LOSS_CHUNK_TOKENS, metadata={
        "help": "tokens per chunk of the output head's loss: a larger chunk holds more logits (tokens x vocabulary, "
                "bf16 under autocast) and adds its head gradient into the float32 sum fewer times"})
    kernel_warmup: bool = field(default=True, metadata={
        "help": "on CUDA, for families that pin Triton kernels (RWKV-7, Mamba-2, Gated DeltaNet): compile them in "
                "a helper process while the first step compiles the rest (its output: kernel_warmup.log)"})
    attention: str = field(default="auto", metadata={
        "help": f"SDPA kernel for the transformers on CUDA: {', '.join(ATTENTION_KERNELS)} (auto: PyTorch's choice)"})
    fsdp: bool = field(default=False, metadata={"help": "FSDP2 sharding instead of DDP under torchrun"})
    seed: int = field(default=1234, metadata={"help": "weights and data order"})
    data_order: str = field(default="sequential", metadata={
        "help": "sequential: consecutive windows in document order, no text twice until the split runs out "
                "(every family reads the same documents in the same order); random: seeded random windows"})
    eval_interval: int = field(default=0, metadata={"help": "validate every N steps (0: at the end only)"})
    eval_windows: int = field(default=32, metadata={
        "help": "validation windows, the first of the held-out split (0: all of them, every held-out "
                "document but the last partial window)"})
    checkpoint_interval: int = field(default=0, metadata={"help": "checkpoint every N steps (0: at the end)"})
    final_checkpoint: bool = field(default=True, metadata={"help": "checkpoint the completed run"})
    save_optimizer: bool = field(default=False, metadata={"help": "keep AdamW state in checkpoints"})
    resume: bool = field(default=False, metadata={"help": "continue from output_dir's checkpoint"})
    device: str = field(default="", metadata={"help": "cuda, cuda:N or cpu (default: cuda if available)"})
    allow_slow_kernels: bool = field(default=False, metadata={
        "help": "let Mamba/RWKV run their PyTorch reference path on CUDA (slow; recorded in the results)"})
    sample_interval_s: float = field(default=0.1, metadata={"help": "GPU sampler period in seconds"})
    warmup_iterations: int | None = field(default=None, metadata={
        "help": "iterations excluded from metrics (default: 10 %% of steps, at least 3)"})

    def __post_init__(self):
        checks = [
            (self.model_size in SIZES, f"model_size must be one of {SIZES}, got {self.model_size!r}"),
            (self.preset in PRESETS, f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.data_order in ("random", "sequential"), "data_order must be random or sequential"),
            (self.attention in ATTENTION_KERNELS, f"attention must be one of {ATTENTION_KERNELS}"),
            (self.max_steps > 0, f"max_steps must be positive, got {self.max_steps}"),
            (self.seq_len > 0, f"seq_len must be positive, got {self.seq_len}"),
            (self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr must be positive and min_lr_ratio in [0, 1]"),
            (self.sample_interval_s > 0, "sample_interval_s must be positive"),
            (self.batch_size is None or self.batch_size > 0, "batch_size must be positive"),
            (self.micro_batch_size is None or self.micro_batch_size > 0, "micro_batch_size must be positive"),
            (self.loss_chunk_tokens > 0, f"loss_chunk_tokens must be positive, got {self.loss_chunk_tokens}"),
            (0 < self.activation_memory_budget <= 1,
             f"activation_memory_budget must be in (0, 1], got {self.activation_memory_budget}"),
            (self.activation_memory_budget == 1 or self.compile,
             "activation_memory_budget shares out the compiled regions' activations and needs --compile"),
            (self.checkpoint_blocks is None or (self.activation_checkpointing and self.checkpoint_blocks > 0),
             "checkpoint_blocks must be positive and needs --activation_checkpointing"),
            (self.eval_windows >= 0, f"eval_windows must be 0 (all) or positive, got {self.eval_windows}"),
            (0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}"),
            (re.fullmatch(r"|cpu|cuda(:\d+)?", self.device) is not None,
             f"device must be cuda, cuda:N or cpu, got {self.device!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def global_batch(self) -> int:
        return self.batch_size or SPEC_GLOBAL_BATCH[self.model_size]

    @property
    def training_tokens(self) -> int:
        """The run's budget: tokens of all optimizer steps."""
        return self.max_steps * self.global_batch * self.seq_len

    def batch_plan(self, world_size: int) -> tuple[int, int]:
        """(micro-batch per rank, accumulation steps) that make up the global batch exactly."""
        micro = self.micro_batch_size or (self.global_batch if world_size == 1 else 1)
        if self.global_batch % (micro * world_size):
            raise ConfigError(f"batch_size {self.global_batch} is not a multiple of micro_batch_size x world size "
                              f"= {micro} x {world_size}; change one of them")
        return micro, self.global_batch // (micro * world_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = dataclass_parser(TrainConfig, description)
    parser.add_argument("--config", help="JSON file of these fields (flags override it)")
    return parser


def read_config_file(path: Path) -> dict:
    """The fields a --config JSON sets, each checked against its field's type (ConfigError names the file)."""
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not a readable JSON config ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config is a JSON object of flag names and values")
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}")
    for key, value in values.items():
        if not _has_type(value, hints[key]):
            raise ConfigError(f"{path}: {key} must be {_type_name(hints[key])}, got {value!r}")
    return values


def _has_type(value, annotation) -> bool:
    allowed = typing.get_args(annotation) or (annotation,)
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):
        return bool in allowed
    return any(isinstance(value, kind) for kind in allowed if kind is not type(None)) or \
        (float in allowed and isinstance(value, int))


def _type_name(annotation) -> str:
    return " or ".join("null" if kind is type(None) else kind.__name__
                       for kind in (typing.get_args(annotation) or (annotation,)))


def parse_config(argv: list[str] | None, family: str, description: str) -> TrainConfig:
    """Defaults, then the --config JSON, then command-line flags; the script fixes the family."""
    flags = vars(build_parser(description).parse_args(argv))
    values: dict = {}
    if "config" in flags:
        values = read_config_file(Path(flags.pop("config")))
    values.update(flags)
    if values.get("model", family) != family:
        raise ConfigError(f"this script trains {family}, but the config asks for {values['model']}")
    values["model"] = family
    if not values.get("output_dir"):
        raise ConfigError("--output_dir is required")
    return TrainConfig(**values)

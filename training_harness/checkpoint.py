"""Checkpoints: weights as safetensors, trainer state as JSON, AdamW state when asked; written atomically."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from efficientllm_metrics import atomic_folder, recover_folder
from training_harness.errors import DataError

CHECKPOINT_DIR = "checkpoint"
_FILES = frozenset({"model.safetensors", "optimizer.pt", "trainer_state.json"})
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save(output_dir: Path, model: nn.Module, optimizer, scheduler, step: int, with_optimizer: bool,
         is_main: bool) -> None:
    """Every rank takes part (FSDP gathers shards); rank 0 writes aside and renames into place."""
    weights = get_model_state_dict(model, options=_FULL)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_FULL) if with_optimizer else None
    if not is_main:
        return
    with atomic_folder(output_dir / CHECKPOINT_DIR, _FILES) as staging:
        save_file({name: tensor.contiguous() for name, tensor in weights.items()}, staging / "model.safetensors")
        if optimizer_state is not None:
            torch.save(optimizer_state, staging / "optimizer.pt")
        state = {"step": step, "scheduler": scheduler.state_dict(), "has_optimizer": optimizer_state is not None}
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


def exists(output_dir: Path) -> bool:
    """Whether a complete checkpoint is there (after finishing a swap that a crash interrupted)."""
    return (recover_folder(output_dir / CHECKPOINT_DIR) / "trainer_state.json").exists()


def load(output_dir: Path, model: nn.Module, optimizer, scheduler) -> tuple[int, bool]:
    """Restore weights, scheduler and (if saved) AdamW state; returns (step, optimizer restored). A file that
    is not what this suite writes raises DataError; nothing in a checkpoint is run as code."""
    folder = output_dir / CHECKPOINT_DIR
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        weights = load_file(folder / "model.safetensors")
        # weights_only: tensors and plain containers only, never code from the file
        optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True) \
            if state["has_optimizer"] else None
    except (OSError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as error:
        raise DataError(f"{folder}: not a checkpoint this suite can load ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:200]}); move it away or drop --resume") from None
    try:
        set_model_state_dict(model, weights, options=_FULL)
    except (RuntimeError, KeyError) as error:
        raise DataError(f"{folder}: its weights do not fit this model (another family, preset or size?): "
                        f"{str(error).splitlines()[0][:200]}") from None
    if optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=_FULL)
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], state["has_optimizer"]

"""Checkpoints: weights as safetensors, trainer state as JSON, AdamW state when asked; written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from efficientllm_metrics import atomic_folder

CHECKPOINT_DIR = "checkpoint"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save(output_dir: Path, model: nn.Module, optimizer, scheduler, step: int, with_optimizer: bool,
         is_main: bool) -> None:
    """Every rank takes part (FSDP gathers shards); rank 0 writes aside and renames into place."""
    weights = get_model_state_dict(model, options=_FULL)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_FULL) if with_optimizer else None
    if not is_main:
        return
    with atomic_folder(output_dir / CHECKPOINT_DIR) as staging:
        save_file({name: tensor.contiguous() for name, tensor in weights.items()}, staging / "model.safetensors")
        if optimizer_state is not None:
            torch.save(optimizer_state, staging / "optimizer.pt")
        state = {"step": step, "scheduler": scheduler.state_dict(), "has_optimizer": optimizer_state is not None}
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


def exists(output_dir: Path) -> bool:
    return (output_dir / CHECKPOINT_DIR / "trainer_state.json").exists()


def load(output_dir: Path, model: nn.Module, optimizer, scheduler) -> tuple[int, bool]:
    """Restore weights, scheduler and (if saved) AdamW state; returns (step, optimizer restored)."""
    folder = output_dir / CHECKPOINT_DIR
    state = json.loads((folder / "trainer_state.json").read_text())
    set_model_state_dict(model, load_file(folder / "model.safetensors"), options=_FULL)
    if state["has_optimizer"]:
        optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=_FULL)
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], state["has_optimizer"]

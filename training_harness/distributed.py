"""Process setup: one device per process, torchrun's environment for DDP/FSDP, wrapping the model."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn as nn

from training_harness.errors import ConfigError


@dataclass(frozen=True)
class ProcessContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def cuda_indices(self) -> list[int]:
        return [self.device.index] if self.device.type == "cuda" else []


#: The caching allocator's settings unless the user gives their own: segments that grow in place instead of
#: new fixed-size ones, so that a step's device peak stays near the memory it allocates (docs/performance.md,
#: change 25: the 3B plans' 3-7 GB of cached but unusable blocks are what fewer recomputed blocks spend).
ALLOCATOR_SETTINGS = "expandable_segments:True"
ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # the first is the newer name


def configure_allocator() -> None:
    """Use ALLOCATOR_SETTINGS where neither variable is set and CUDA has not started yet (the allocator reads
    them once, when it starts)."""
    if allocator_settings() is None and not torch.cuda.is_initialized():
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_SETTINGS


def allocator_settings() -> str | None:
    """The caching allocator's settings from the environment (None: PyTorch's defaults)."""
    return next((os.environ[name] for name in ALLOCATOR_VARIABLES if os.environ.get(name)), None)


def setup(device_arg: str) -> ProcessContext:
    """The process's device, with the harness's allocator settings unless it is the CPU; under torchrun
    (WORLD_SIZE > 1) also the process group.

    Multi-node runs use torchrun's rendezvous variables (MASTER_ADDR, MASTER_PORT, RANK, ...).
    """
    if not device_arg.startswith("cpu"):
        configure_allocator()
    requested = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    world_size = launched_world_size()
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested} but CUDA is not available; use --device cpu")
    if world_size == 1:
        device = torch.device(requested)
        if device.type == "cuda":
            device = torch.device("cuda", device.index or 0)
            torch.cuda.set_device(device)
        return ProcessContext(0, 1, device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if requested.startswith("cuda"):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return ProcessContext(dist.get_rank(), dist.get_world_size(), device)


def launched_world_size() -> int:
    """The number of processes torchrun started for the run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def exit_process(exit_code: int) -> NoReturn:
    """End a torchrun process whose results are written without the interpreter's teardown, in which finished
    ranks have aborted (SIGABRT, "terminate called without an active exception"; docs/reliability.md) and
    torchrun then reported the run failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(value: torch.Tensor, context: ProcessContext) -> torch.Tensor:
    """A per-rank value averaged over the ranks (summed, then divided: gloo has no average reduction)."""
    if not context.distributed:
        return value
    total = value.clone()
    dist.all_reduce(total)
    return total / context.world_size


def barrier(context: ProcessContext) -> None:
    if context.distributed:
        dist.barrier()


def wrap(model: nn.Module, context: ProcessContext, fsdp: bool) -> nn.Module:
    """DDP, or FSDP2 (each block sharded, then the root) for models too large to replicate."""
    if not context.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

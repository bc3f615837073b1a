"""One run, described once: what trains, on what, from which data and code. Written to config.json and
repeated in the header of the results file."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from efficientllm_metrics import RunHeader
from training_harness.distributed import allocator_settings

CONFIG_FILE = "config.json"
_CHECKOUT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, kw_only=True)
class RunDescription:
    """Everything needed to rerun and to read a run: ``config`` holds every flag; the rest is what the flags
    resolved to on this machine."""

    family: str
    display_name: str
    size: str
    preset: str
    shape: dict
    params: int
    vocab_rows: int
    flops_per_token: float
    """Training FLOPs per token (6 x matmul weights + the family's sequence-mixing term), for MFU."""
    kernel_path: str
    context: int
    global_batch: int
    micro_batch_size: int
    accumulation_steps: int
    world_size: int
    device: str
    device_name: str
    host: str
    data: dict
    """The prepared data's tokenizer, vocabulary, EOS id and content hash."""
    versions: dict
    git: dict
    """The checkout's commit and whether its tree had changes, or the reason they are unknown."""
    config: dict

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def header(self, status: str, error: str | None, steps: int, details: dict | None = None) -> RunHeader:
        """The results file's header for this run's outcome."""
        return RunHeader(
            status=status, error=error, details=details or {}, model=self.family, display_name=self.display_name,
            size=self.size, preset=self.preset, context=self.context, steps=steps, global_batch=self.global_batch,
            kernel_path=self.kernel_path, device_name=self.device_name, world_size=self.world_size,
            micro_batch_size=self.micro_batch_size, accumulation_steps=self.accumulation_steps,
            activation_checkpointing=self.config["activation_checkpointing"],
            checkpoint_blocks=self.config.get("checkpoint_blocks"), compile=self.config["compile"],
            attention=self.config["attention"], cuda_graphs=self.config.get("cuda_graphs"))


#: The kernel libraries whose versions a run records. Read from what is installed, never imported here: a
#: family pins its library's kernels at that library's first import (training_harness.kernel_pins), and fla
#: imported first would leave RWKV-7's kernels autotuning for minutes in a later run of the same process.
KERNEL_LIBRARIES = ("transformers", "mamba_ssm", "causal_conv1d", "fla", "triton")


def versions() -> dict:
    """Python, torch, CUDA and its allocator's settings, the platform and each installed kernel library's version
    (None where it is not installed)."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cuda_allocator": allocator_settings(), "platform": platform.platform()}
    providers = importlib.metadata.packages_distributions()  # import name -> the distributions that install it
    for module in KERNEL_LIBRARIES:
        found[module] = _installed_version(module, providers.get(module, []))
    return found


def _installed_version(module: str, distributions: list[str]) -> str | None:
    if module in sys.modules:
        return getattr(sys.modules[module], "__version__", None)
    for distribution in distributions:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(distribution)
    return None


#: For code copied without its .git folder (a cluster's rsync, a container): the commit it was copied from.
SOURCE_COMMIT_VARIABLE = "EFFICIENTLLM_SOURCE_COMMIT"


def git_state() -> dict:
    """{"commit", "dirty"} of the checkout the code runs from; outside one, the commit that
    EFFICIENTLLM_SOURCE_COMMIT names (its changes unknown), else {"commit": None, "reason"}."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=_CHECKOUT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError) as error:
        if os.environ.get(SOURCE_COMMIT_VARIABLE):
            return {"commit": os.environ[SOURCE_COMMIT_VARIABLE], "dirty": None,
                    "reason": f"not a git checkout; the commit is {SOURCE_COMMIT_VARIABLE}'s"}
        return {"commit": None, "reason": f"not a git checkout, or git unavailable ({type(error).__name__}); "
                                          f"set {SOURCE_COMMIT_VARIABLE} to record the commit"}

"""Fixed Triton configurations for a library's autotuned kernels (flash-linear-attention, mamba-ssm's SSD), so
that a run starts in seconds.

These libraries autotune each kernel over many configurations the first time a process runs it (minutes at
8K context for fla; Mamba-2's first step took 85-101 s). ``dump()`` records the configurations that autotuning
chose, and ``kernel_choice()`` imports the library with its autotuners narrowed to those, so a fresh
process only compiles the chosen kernels. Kernels without a pinned entry autotune as usual. A family names
the module it pins (``ModelFamily.pinned_kernels``) and keeps its own tables, one per library and GPU
architecture (``<library>_sm90.json`` for Hopper), in its ``kernel_configs/`` folder, since the best tiles
depend on its shapes; ``scripts/tune_kernels.py`` regenerates them.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import json
import sys
import warnings
from pathlib import Path

TABLES = "kernel_configs"  # the folder of a family's tables, inside its package


def library_of(module: str) -> str:
    return module.split(".")[0]


def config_file(family: str, module: str, compute_capability: tuple[int, int]) -> Path:
    """The family's table for ``module``'s library on one GPU architecture (it may not exist)."""
    package = Path(importlib.import_module(family).__file__).parent
    return package / TABLES / f"{library_of(module)}_sm{compute_capability[0]}{compute_capability[1]}.json"


def _kernel_id(fn) -> str:
    while hasattr(fn, "fn"):  # JITFunction / Heuristics wrappers down to the Python function
        fn = fn.fn
    return f"{fn.__module__}.{fn.__qualname__}"


def _pinned_configs(kernel: str, configs: list, pinned: list[dict]) -> list:
    """The library's own configurations that the table names, pre-hooks included: mamba-ssm's zero the
    gradients its kernels accumulate atomically, and configurations rebuilt without them gave NaN losses. All
    of them, with a warning, where the table names none (written for another version of the library)."""
    wanted = [(entry["kwargs"], entry["num_warps"], entry["num_stages"]) for entry in pinned]
    kept = [c for c in configs if (c.kwargs, c.num_warps, c.num_stages) in wanted]
    if not kept:
        warnings.warn(f"{kernel}: the pinned table names none of its configurations (another library version?); "
                      "it autotunes. Regenerate the table with scripts/tune_kernels.py", stacklevel=2)
    return kept or configs


@contextlib.contextmanager
def _pinned_autotune(table: dict[str, list[dict]]):
    """While active, every Triton autotuner made for a pinned kernel sees only its pinned configurations.
    Patched at triton's ``Autotuner`` itself, not at ``@triton.autotune``: fla builds most of its autotuners
    with its own decorator (``fla_cache_autotune``, a subclass), which the decorator patch missed, so those
    kernels autotuned again in every process."""
    from triton.runtime.autotuner import Autotuner

    original = Autotuner.__init__

    @functools.wraps(original)
    def init(self, fn, arg_names, configs, *args, **kwargs):
        kernel = _kernel_id(fn)
        if table.get(kernel):
            configs = _pinned_configs(kernel, configs, table[kernel])
        original(self, fn, arg_names, configs, *args, **kwargs)

    Autotuner.__init__ = init
    try:
        yield
    finally:
        Autotuner.__init__ = original


def import_with_pinned_configs(family: str, module: str) -> str:
    """Import ``module``, its library's kernels pinned by ``family``'s table for this GPU when there is one;
    returns how kernels were chosen. Pinning happens at the library's first import (both libraries import all
    their kernels from their top package), so one family's table holds per process."""
    import torch

    library = library_of(module)
    if library in sys.modules:
        return f"autotuned ({library} was imported before pinning)"
    path = config_file(family, module, torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
    if path is None or not path.exists():
        importlib.import_module(module)
        return "autotuned (no pinned table for this GPU)"
    table = json.loads(path.read_text())["kernels"]
    with _pinned_autotune(table):
        importlib.import_module(module)
    return f"pinned ({path.name})"


@functools.cache
def kernel_choice(family: str) -> str | None:
    """Import the family's ``pinned_kernels`` module once per process, pinned: how its kernels are chosen
    ("pinned ..." or "autotuned ..."), or None where the library is not installed."""
    from training_harness.registry import get_family

    module = get_family(family).pinned_kernels
    if module is None:
        raise ValueError(f"family {family!r} names no pinned_kernels module")
    try:
        return import_with_pinned_configs(family, module)
    except ImportError:
        return None


def _is_autotuner(obj, autotuner_type: type) -> bool:
    """isinstance() for any object gc holds, where a dead weak proxy raises."""
    try:
        return isinstance(obj, autotuner_type)
    except ReferenceError:
        return False


def dump(path: Path, library: str, extend: Path | None = None) -> int:
    """Write the configurations every autotuner of ``library`` chose in this process; returns the kernel count.
    ``extend`` names a table whose entries are kept for kernels not tuned here (a pinned kernel runs its one
    configuration without tuning, so it leaves nothing to record)."""
    import torch
    import triton
    from triton.runtime.autotuner import Autotuner

    kernels: dict[str, list[dict]] = json.loads(extend.read_text())["kernels"] if extend else {}
    with warnings.catch_warnings():  # isinstance() touches deprecated module attributes among gc's objects
        warnings.simplefilter("ignore", FutureWarning)
        tuners = [obj for obj in gc.get_objects() if _is_autotuner(obj, Autotuner)]
    for tuner in tuners:
        kernel = _kernel_id(tuner.base_fn)
        if not kernel.startswith(f"{library}.") or not tuner.cache:
            continue
        chosen = {json.dumps(c.kwargs, sort_keys=True) + f"{c.num_warps}/{c.num_stages}": c
                  for c in tuner.cache.values()}
        kernels[kernel] = [{"kwargs": c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages,
                            "num_ctas": c.num_ctas, "maxnreg": c.maxnreg} for c in chosen.values()]
    document = {"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                "triton": triton.__version__, "kernels": dict(sorted(kernels.items()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    return len(kernels)
